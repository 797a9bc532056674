"""deploy/FLEET.md documents every field of the inventory schema (decision.fleet)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from decision.fleet import DeploymentSpec, FleetSpec, LinkSpec, ModelSpec, NodeSpec, SiteSpec
from decision.gpu_profiles import PROFILES

DOC = (Path(__file__).resolve().parent.parent / "deploy/FLEET.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = DOC.index(f"## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start:end if end >= 0 else None]


def _documented(section: str) -> set[str]:
    """Field names in the first column of the section's table (`a`, `b` counts as two)."""
    names: set[str] = set()
    for row in re.findall(r"^\| (`[^|]+`) \|", section, flags=re.MULTILINE):
        names.update(re.findall(r"`([^`]+)`", row))
    return names


@pytest.mark.parametrize(("title", "spec"), [
    ("Top level", FleetSpec), ("`sites`", SiteSpec), ("`links`", LinkSpec), ("`nodes`", NodeSpec),
    ("`models`", ModelSpec), ("`deployments`", DeploymentSpec),
])
def test_every_schema_field_is_documented_and_nothing_else(title: str, spec: type[BaseModel]) -> None:
    assert _documented(_section(title)) == set(spec.model_fields)


def test_the_gpu_types_listed_are_the_profiles() -> None:
    row = next(line for line in _section("`nodes`").splitlines() if line.startswith("| `gpu_type` |"))
    assert set(re.findall(r"`([^`]+)`", row.split("|")[2])) == set(PROFILES)
