"""Scenarios: YAML files under ``sim/scenarios/`` (or any path) describing fleet, load and telemetry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sim.workload import Tenant

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"


@dataclass
class Scenario:
    """A parsed scenario; ``raw`` keeps the YAML mapping for the fleet and workload sections."""

    name: str
    seed: int
    duration_s: float
    drain_s: float
    family: str
    fleet: dict[str, Any]
    workload: dict[str, Any]
    tenants: list[Tenant]
    telemetry_period_s: float
    telemetry_delay_s: tuple[float, float]
    degraded_fraction: float
    strategies: list[str]
    guardrails: dict[str, Any] = field(default_factory=dict)
    # The operator's ``decision`` settings for pipeline strategies (the service config's section:
    # decision.config.DecisionSection), e.g. the price of cost ``cost_weight_ms``.
    decision: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def available() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def load_scenario(name_or_path: str) -> Scenario:
    """Load ``sim/scenarios/NAME.yaml`` or a YAML file path; missing keys fail fast, naming them."""
    p = Path(name_or_path)
    if not p.exists():
        p = SCENARIO_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        raise FileNotFoundError(f"no scenario {name_or_path!r}; shipped: {', '.join(available())}")
    raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{p}: a scenario is a mapping")
    try:
        tel = raw.get("telemetry", {})
        delay = tel.get("delay_s", 0.0)
        lo, hi = (float(delay[0]), float(delay[1])) if isinstance(delay, list) else (float(delay), float(delay))
        return Scenario(
            name=str(raw.get("name", p.stem)), seed=int(raw.get("seed", 0)),
            duration_s=float(raw["duration_s"]), drain_s=float(raw.get("drain_s", 120.0)),
            family=str(raw.get("family", "llama")), fleet=dict(raw["fleet"]), workload=dict(raw["workload"]),
            tenants=[Tenant.from_mapping(t) for t in raw.get("tenants", [{"name": "default"}])],
            telemetry_period_s=float(tel.get("period_s", 1.0)), telemetry_delay_s=(lo, hi),
            degraded_fraction=float(raw.get("degradations", {}).get("fraction", 0.0)),
            strategies=list(raw.get("strategies", [])), guardrails=dict(raw.get("guardrails", {})),
            decision=_decision(p, raw.get("decision") or {}), description=str(raw.get("description", "")), raw=raw)
    except KeyError as exc:
        raise ValueError(f"{p}: missing key {exc.args[0]!r}") from None


def _decision(path: Path, section: Any) -> dict[str, Any]:
    """The scenario's ``decision`` section, validated as the service config's (unknown keys fail)."""
    from pydantic import ValidationError

    from decision.config import DecisionSection

    try:
        return DecisionSection.model_validate(section).model_dump(include=set(section))
    except ValidationError as exc:
        raise ValueError(f"{path}: decision: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
