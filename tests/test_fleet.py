"""Inventory loading and validation: the demo fleet's shape, and errors that name file:line: field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from decision.fleet import InventoryError, load_fleet, load_fleet_text

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).resolve().parent.parent


def _plain(field: str) -> str:
    """`sites[1](id=s1).tier` -> `sites[1].tier`."""
    return re.sub(r"\(id=[^)]*\)", "", field)


def test_demo_fleet_has_three_tiers_regions_jurisdictions_and_model_kinds(demo_fleet):  # type: ignore[no-untyped-def]
    assert set(demo_fleet.tiers()) == {"datacenter", "edge", "device"}
    assert len({s.region for s in demo_fleet.sites.values()}) >= 3
    assert len({s.jurisdiction for s in demo_fleet.sites.values()}) >= 2
    assert 50 <= len(demo_fleet.endpoints) <= 70
    modalities = {m.modality for m in demo_fleet.models.values()}
    assert {"text", "image", "multimodal"} <= modalities
    assert len({m.family for m in demo_fleet.models.values()}) >= 3


def test_index_by_model_and_family_matches_a_full_scan(demo_fleet):  # type: ignore[no-untyped-def]
    for model in demo_fleet.models:
        assert set(demo_fleet.by_model[model]) == {e for e in demo_fleet.endpoints if e.model == model}
    for family, eps in demo_fleet.by_family.items():
        assert set(eps) == {e for e in demo_fleet.endpoints if e.family == family}


def test_revision_is_a_content_hash(demo_fleet):  # type: ignore[no-untyped-def]
    text = (Path(__file__).parent.parent / "deploy/demo/fleet.yaml").read_text()
    assert load_fleet_text(text).revision == demo_fleet.revision
    changed = text.replace("max_concurrency: 64", "max_concurrency: 65", 1)
    assert load_fleet_text(changed).revision != demo_fleet.revision


def test_every_problem_is_reported_with_its_line_and_field() -> None:
    with pytest.raises(InventoryError) as err:
        load_fleet(DATA / "bad_fleet.yaml")
    found = {(i.line, _plain(i.field)) for i in err.value.issues}
    # pydantic-level errors come first (field types and values)
    assert (10, "sites[1].tier") in found
    assert (20, "nodes[1].gpu_type") in found
    assert (37, "deployments[1].address") in found
    assert (38, "deployments[1].max_concurrency") in found
    assert all(i.path.endswith("bad_fleet.yaml") for i in err.value.issues)


def test_reference_errors_name_the_line_of_the_bad_reference(tmp_path: Path) -> None:
    text = (DATA / "bad_fleet.yaml").read_text().replace("tier: orbit", "tier: edge").replace(
        "TPUv9", "L4").replace("not an address", "10.0.0.2:8000").replace("max_concurrency: 0", "max_concurrency: 4")
    p = tmp_path / "refs.yaml"
    p.write_text(text)
    with pytest.raises(InventoryError) as err:
        load_fleet(p)
    msgs = {(i.line, _plain(i.field), i.message) for i in err.value.issues}
    assert (7, "sites[1].id", "duplicate id 's1'") in msgs
    assert (19, "nodes[1].site", "unknown site 'nowhere'") in msgs
    assert (36, "deployments[1].model", "unknown model 'm-missing'") in msgs


@pytest.mark.parametrize("key", ["2024-01-01", "2.5", "null", "7"])
def test_a_key_yaml_reads_as_a_non_string_is_reported_at_its_own_line(tmp_path: Path, key: str) -> None:
    # pydantic names a date, float or null key by its repr: the line must still be the key's, not
    # the enclosing mapping's (or the document's first line, for a top-level key).
    lines = (ROOT / "deploy/demo/fleet.yaml").read_text().splitlines()
    at = lines.index("  certifications: [iso27001, hipaa]") + 1
    lines[at:at] = [f"  {key}: x"]
    lines.append(f"{key}: y")
    p = tmp_path / "keys.yaml"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(InventoryError) as err:
        load_fleet(p)
    assert sorted(i.line for i in err.value.issues) == [at + 1, len(lines)]
    assert all("Keys should be strings" in i.message for i in err.value.issues)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("version: 1\nsites:\n  - id: [unclosed\n")
    with pytest.raises(InventoryError) as err:
        load_fleet(p)
    assert err.value.issues[0].line >= 3
    assert err.value.issues[0].field == "(syntax)"


def test_device_sites_must_name_their_owner(tmp_path: Path) -> None:
    p = tmp_path / "dev.yaml"
    p.write_text("sites:\n  - {id: d, region: r, jurisdiction: EU, tier: device}\nnodes: []\nmodels: []\n"
                 "deployments: []\n")
    with pytest.raises(InventoryError, match="owner_tenant"):
        load_fleet(p)


@pytest.mark.parametrize(("old", "new", "field", "message"), [
    # A NUL in an id would route decisions the audit log cannot store (PostgreSQL refuses NUL).
    ("id: eu-west-dc1-n0/llama-3.1-70b", 'id: "eu-west-dc1-n0/llama\\0-3.1-70b"', "deployments[0].id",
     "printable text on one line"),
    ("gpu_hour_usd: 3.2", "gpu_hour_usd: .inf", "nodes[0].gpu_hour_usd", "finite"),  # made every TTFT NaN
    ("gpu_hour_usd: 3.2", "gpu_hour_usd: 1.0e+300", "nodes[0].gpu_hour_usd", "less than or equal"),
    ("params_b: 70.0", "params_b: .inf", "models[1].params_b", "finite"),  # crashed fleet check itself
    # No guessing at a mistyped value: a quoted "no" was once read as true, "8" or 8.5 GPUs as 8.
    ("max_concurrency: 64, warm: true}", 'max_concurrency: 64, warm: "no"}', "deployments[0].warm",
     "valid boolean"),
    ("gpu_count: 8,", 'gpu_count: "8",', "nodes[0].gpu_count", "valid integer"),
    ("gpu_count: 8,", "gpu_count: 8.5,", "nodes[0].gpu_count", "valid integer"),
    ("gpu_hour_usd: 3.2", 'gpu_hour_usd: "3.2"', "nodes[0].gpu_hour_usd", "valid number"),
])
def test_unusable_names_and_numbers_are_refused(tmp_path: Path, old: str, new: str, field: str, message: str) -> None:
    text = (Path(__file__).parent.parent / "deploy/demo/fleet.yaml").read_text()
    assert old in text
    p = tmp_path / "fleet.yaml"
    p.write_text(text.replace(old, new, 1))
    with pytest.raises(InventoryError) as err:
        load_fleet(p)
    (issue,) = err.value.issues
    assert _plain(issue.field) == field and message in issue.message and "\0" not in str(issue)
    assert issue.line == 1 + text[:text.index(old)].count("\n")


def test_fleet_check_cli_exit_codes_and_messages() -> None:
    ok = subprocess.run([sys.executable, "-m", "decision.cli", "fleet", "check", "deploy/demo/fleet.yaml"],
                        capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert ok.returncode == 0, ok.stderr
    assert "56 endpoints" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "decision.cli", "fleet", "check", "tests/data/bad_fleet.yaml"],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert bad.returncode == 1
    assert "tests/data/bad_fleet.yaml:10: sites[1](id=s1).tier:" in bad.stderr


def test_topology_rtt_prefers_direct_links_then_region_links(demo_fleet) -> None:  # type: ignore[no-untyped-def]
    topo = demo_fleet.topology
    assert topo.rtt_ms("eu-west", "eu-west-edge1") == 2.0
    assert topo.rtt_ms("eu-west", "us-east-dc1") == 85.0  # via the transatlantic region link
    assert topo.rtt_ms("eu-west", "eu-central-dc1") == 18.0
    assert topo.rtt_ms("mars", "eu-west-dc1") == 120.0  # unknown client: the configured default


def _first_address_refused(tmp_path: Path, address: str) -> tuple[str, int]:
    """The demo fleet with its first deployment at ``address``: (the one issue's message, its line),
    after checking that the issue names that deployment's address and line."""
    text = (Path(__file__).parent.parent / "deploy/demo/fleet.yaml").read_text()
    first = re.search(r"address: '[^']+'", text)
    assert first is not None
    p = tmp_path / "fleet.yaml"
    p.write_text(text.replace(first.group(0), f"address: '{address}'", 1))
    with pytest.raises(InventoryError) as err:
        load_fleet(p)
    [issue] = err.value.issues
    assert _plain(issue.field) == "deployments[0].address"
    assert issue.line == text[:first.start()].count("\n") + 1
    return issue.message, issue.line


def test_an_address_port_outside_the_tcp_range_is_refused(tmp_path: Path) -> None:
    message, _ = _first_address_refused(tmp_path, "10.0.10.1:99999")
    assert "port 99999 is outside 1-65535" in message


@pytest.mark.parametrize("host", ["...", "::", "999.1.1.1", "-gpu.example", "[not-v6]"])
def test_an_address_host_must_be_an_ip_or_a_host_name(tmp_path: Path, host: str) -> None:
    """Such addresses passed fleet check, then nothing could dial them."""
    message, _ = _first_address_refused(tmp_path, f"{host}:80")
    assert "neither an IP address" in message


def test_an_address_port_takes_ascii_digits_and_is_compared_as_a_number(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "deploy/demo/fleet.yaml").read_text()
    found = re.findall(r"address: '?([^':\s]+):(\d+)", text)
    (host0, port0), (host1, port1) = found[0], found[1]
    p = tmp_path / "port.yaml"
    p.write_text(text.replace(f"{host0}:{port0}", f"{host0}:{chr(0x0668)}000", 1))
    with pytest.raises(InventoryError) as err:  # an Arabic-Indic digit would have passed as port 8000
        load_fleet(p)
    assert _plain(err.value.issues[0].field) == "deployments[0].address"
    same = text.replace(f"{host1}:{port1}", f"{host0.upper()}:0{port0}", 1)
    p.write_text(same)
    with pytest.raises(InventoryError) as err:
        load_fleet(p)
    assert any(f"address {host0.lower()}:{port0} already used" in i.message for i in err.value.issues)


def test_conflicting_or_self_links_and_an_empty_inventory_are_refused(tmp_path: Path) -> None:
    import yaml

    text = (Path(__file__).parent.parent / "deploy/demo/fleet.yaml").read_text()
    doc = yaml.safe_load(text)
    a, b = doc["links"][0]["a"], doc["links"][0]["b"]
    doc["links"] += [{**doc["links"][0], "rtt_ms": 900.0}, {**doc["links"][0], "a": b, "b": b}]
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(InventoryError) as exc:
        load_fleet(path)
    message = str(exc.value)
    assert f"a second link between {a!r} and {b!r} (first: links[0])" in message
    assert f"a link from {b!r} to itself" in message
    doc = yaml.safe_load(text)
    doc["deployments"] = []
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(InventoryError, match="no deployments: nothing could ever be routed"):
        load_fleet(path)


def test_a_site_may_not_be_named_as_another_region(tmp_path: Path) -> None:
    """A client at region r1 would otherwise be read as at site r1 (in r2): 120 ms to its own region's site."""
    p = tmp_path / "fleet.yaml"
    p.write_text("sites:\n"
                 "  - {id: s1, region: r1, jurisdiction: EU, tier: datacenter}\n"
                 "  - {id: r1, region: r2, jurisdiction: US, tier: edge}\n"
                 "nodes:\n  - {id: n1, site: s1, gpu_type: H100, gpu_count: 1, gpu_hour_usd: 1.0, watts_per_gpu: 100}\n"
                 "models:\n  - {name: m, family: f, params_b: 8.0}\n"
                 "deployments:\n  - {id: d1, node: n1, model: m, address: '10.0.0.1:8000', max_concurrency: 8}\n")
    with pytest.raises(InventoryError) as err:
        load_fleet(p)
    (issue,) = err.value.issues
    assert (issue.line, _plain(issue.field)) == (3, "sites[1].id") and "must not name another region" in issue.message
