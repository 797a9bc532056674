"""Scenarios: YAML files under ``sim/scenarios/`` (or any path) describing fleet, load and telemetry."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sim.model import MAX_WORKERS
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
    # sigma of every endpoint's hidden log-normal throughput error (0: the datasheet is exact).
    throughput_error: float = 0.0
    # ``server.workers``: the pipeline's decision worker processes (the service config's key, as
    # ``serve --workers``; 1 by default there and here).
    workers: int = 1
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it was loaded from ("" when built in code)
    locator: Any = field(default=None, repr=False, compare=False)  # line numbers for error messages


class ScenarioError(ValueError):
    """A scenario that cannot run; the message names the file and, where known, the line."""


KNOWN_KEYS = frozenset({"name", "description", "seed", "duration_s", "drain_s", "family", "fleet", "workload",
                        "tenants", "telemetry", "degradations", "strategies", "guardrails", "decision",
                        "server"})
ARRIVAL_TYPES = ("poisson", "mmpp")
FLEET_GENERATORS = ("cells", "tiers")


class _Locator:
    """Line numbers of a parsed YAML document (PyYAML node marks), for error messages."""

    def __init__(self, path: Path, root: yaml.Node | None) -> None:
        self.path = path
        self.root = root

    def line(self, keys: tuple[str | int, ...]) -> int | None:
        """1-based line of the deepest node on ``keys`` (a path of mapping keys and list indexes)."""
        node = self.root
        if node is None:
            return None
        line = node.start_mark.line + 1
        for k in keys:
            nxt: yaml.Node | None = None
            if isinstance(node, yaml.MappingNode):
                nxt = next((v for kn, v in node.value if getattr(kn, "value", None) == k), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(k, int) and 0 <= k < len(node.value):
                nxt = node.value[k]
            if nxt is None:
                break
            node = nxt
            line = node.start_mark.line + 1
        return line

    def error(self, keys: tuple[str | int, ...], msg: str) -> ScenarioError:
        line = self.line(keys)
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        field_name = ".".join(f"[{k}]" if isinstance(k, int) else k for k in keys).replace(".[", "[")
        return ScenarioError(f"{where}: {field_name + ': ' if field_name else ''}{msg}")


def available() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def resolve(name_or_path: str) -> Path:
    """The scenario file: a path, else ``sim/scenarios/NAME.yaml``; unknown names fail, listing the shipped ones."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if name_or_path and "/" not in name_or_path and (SCENARIO_DIR / f"{name_or_path}.yaml").is_file():
        return SCENARIO_DIR / f"{name_or_path}.yaml"
    raise ScenarioError(f"no scenario {name_or_path!r} (neither a file nor a shipped name); "
                        f"shipped: {', '.join(available())}")


def load_scenario(name_or_path: str) -> Scenario:
    """Load ``sim/scenarios/NAME.yaml`` or a YAML file path.

    Parameters
    ----------
    name_or_path
        A shipped scenario's name or a YAML file.

    Returns
    -------
    Scenario
        The parsed, validated scenario.

    Raises
    ------
    ScenarioError
        The file is missing, is not valid YAML, or a field is missing, of the wrong type or out of
        range (telemetry ``period_s`` <= 0, negative durations, an unknown ``arrival.type``...);
        the message names the file, the line and the field.
    """
    p = resolve(name_or_path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{p}: cannot read: {exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ScenarioError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{p}: YAML error: {exc}") from None
    loc = _Locator(p, root)
    if not isinstance(raw, dict):
        raise loc.error((), "a scenario is a mapping")
    unknown = sorted(str(k) for k in raw if k not in KNOWN_KEYS)
    if unknown:
        raise loc.error((unknown[0],), f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_KEYS))}")
    tel = _mapping(loc, raw, "telemetry")
    delay = tel.get("delay_s", 0.0)
    if isinstance(delay, list):
        if len(delay) != 2:
            raise loc.error(("telemetry", "delay_s"), f"a number or a [low, high] pair, got {delay!r}")
        lo = _number(loc, ("telemetry", "delay_s", 0), delay[0], minimum=0.0)
        hi = _number(loc, ("telemetry", "delay_s", 1), delay[1], minimum=lo)
    else:
        lo = hi = _number(loc, ("telemetry", "delay_s"), delay, minimum=0.0)
    for key in ("fleet", "workload"):
        if key not in raw:
            raise loc.error((), f"missing key {key!r}")
    fleet = _mapping(loc, raw, "fleet")
    if fleet.get("generator", "cells") not in FLEET_GENERATORS:
        raise loc.error(("fleet", "generator"), f"unknown generator {fleet.get('generator')!r}; "
                                                f"known: {', '.join(FLEET_GENERATORS)}")
    strategies = raw.get("strategies", [])
    if not isinstance(strategies, list) or not all(isinstance(x, str) for x in strategies):
        raise loc.error(("strategies",), f"a list of strategy names, got {strategies!r}")
    degr = _mapping(loc, raw, "degradations")
    stray = sorted(str(k) for k in degr if k not in ("fraction", "throughput_error"))
    if stray:
        raise loc.error(("degradations", stray[0]), f"unknown key {stray[0]!r}; known: fraction, throughput_error")
    guardrails = _mapping(loc, raw, "guardrails")
    server = _mapping(loc, raw, "server")
    stray = sorted(str(k) for k in server if k != "workers")
    if stray:  # the service's other server keys (ports, threads) mean nothing to the simulator
        raise loc.error(("server", stray[0]), f"unknown key {stray[0]!r}; known: workers")
    workers = _integer(loc, ("server", "workers"), server.get("workers", 1))
    if not 1 <= workers <= MAX_WORKERS:
        raise loc.error(("server", "workers"), f"must be from 1 to {MAX_WORKERS}, got {workers}")
    if "duration_s" not in raw:
        raise loc.error((), "missing key 'duration_s'")
    return Scenario(
        name=str(raw.get("name", p.stem)), seed=_integer(loc, ("seed",), raw.get("seed", 0)),
        duration_s=_number(loc, ("duration_s",), raw["duration_s"], minimum=0.0),
        drain_s=_number(loc, ("drain_s",), raw.get("drain_s", 120.0), minimum=0.0),
        family=str(raw.get("family", "llama")), fleet=dict(fleet), workload=_workload(loc, raw),
        tenants=_tenants(loc, raw.get("tenants", [{"name": "default"}])),
        # A period <= 0 would re-scrape at the same instant forever: the run would never end.
        telemetry_period_s=_number(loc, ("telemetry", "period_s"), tel.get("period_s", 1.0), above=0.0),
        telemetry_delay_s=(lo, hi),
        degraded_fraction=_number(loc, ("degradations", "fraction"), degr.get("fraction", 0.0), minimum=0.0,
                                  maximum=1.0),
        throughput_error=_number(loc, ("degradations", "throughput_error"), degr.get("throughput_error", 0.0),
                                 minimum=0.0, maximum=2.0),
        strategies=list(strategies), guardrails=dict(guardrails),
        decision=_decision(p, raw.get("decision") or {}), workers=workers,
        description=str(raw.get("description", "")), raw=raw, source=str(p), locator=loc)


def _mapping(loc: _Locator, raw: dict[str, Any], key: str) -> dict[str, Any]:
    v = raw.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise loc.error((key,), f"a mapping, got {v!r}")
    return v


def _number(loc: _Locator, keys: tuple[str | int, ...], v: Any, *, minimum: float | None = None,
            above: float | None = None, maximum: float | None = None) -> float:
    """A finite number within the bounds, else a :class:`ScenarioError` at its line."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise loc.error(keys, f"a finite number, got {v!r}")
    x = float(v)
    if minimum is not None and x < minimum:
        raise loc.error(keys, f"must be >= {minimum:g}, got {v!r}")
    if above is not None and not x > above:
        raise loc.error(keys, f"must be > {above:g}, got {v!r}")
    if maximum is not None and x > maximum:
        raise loc.error(keys, f"must be <= {maximum:g}, got {v!r}")
    return x


def _integer(loc: _Locator, keys: tuple[str | int, ...], v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise loc.error(keys, f"an integer, got {v!r}")
    return v


def _workload(loc: _Locator, raw: dict[str, Any]) -> dict[str, Any]:
    """The ``workload`` section: arrival process and token distributions, checked by their own samplers."""
    import random

    from sim.workload import token_sampler

    wl = _mapping(loc, raw, "workload")
    arr = wl.get("arrival", {"type": "poisson"})
    if not isinstance(arr, dict):
        raise loc.error(("workload", "arrival"), f"a mapping, got {arr!r}")
    kind = arr.get("type", "poisson")
    if kind not in ARRIVAL_TYPES:
        raise loc.error(("workload", "arrival", "type"), f"unknown arrival type {kind!r}; "
                                                         f"known: {', '.join(ARRIVAL_TYPES)}")
    if ("rps" in arr) == ("load" in arr):
        raise loc.error(("workload", "arrival"), "give exactly one of rps (requests/s) or load (fraction of capacity)")
    rate_key = "rps" if "rps" in arr else "load"
    _number(loc, ("workload", "arrival", rate_key), arr[rate_key], above=0.0)
    if kind == "mmpp":
        lists = []
        for key in ("rate_multipliers", "dwell_s"):
            v = arr.get(key)
            if not isinstance(v, list) or not v:
                raise loc.error(("workload", "arrival", key), f"a non-empty list of positive numbers, got {v!r}")
            lists.append([_number(loc, ("workload", "arrival", key, i), x, above=0.0) for i, x in enumerate(v)])
        if len(lists[0]) != len(lists[1]):
            raise loc.error(("workload", "arrival"), "rate_multipliers and dwell_s must have the same length")
    for key in ("input_tokens", "output_tokens"):
        spec = wl.get(key)
        if not isinstance(spec, dict):
            raise loc.error(("workload", key), f"a mapping such as {{dist: lognormal, mu: 3.8, sigma: 0.6}}, "
                                               f"got {spec!r}")
        try:
            draw, mean = token_sampler(spec, random.Random(0))
            draw()
        except KeyError as exc:
            raise loc.error(("workload", key), f"missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise loc.error(("workload", key), str(exc)) from None
        if not mean > 0 or not math.isfinite(mean):
            raise loc.error(("workload", key), f"mean token count must be a positive number, got {mean}")
    return dict(wl)


def _tenants(loc: _Locator, rows: Any) -> list[Tenant]:
    if not isinstance(rows, list) or not rows:
        raise loc.error(("tenants",), f"a non-empty list of tenants, got {rows!r}")
    out: list[Tenant] = []
    for i, m in enumerate(rows):
        if not isinstance(m, dict):
            raise loc.error(("tenants", i), f"a mapping, got {m!r}")
        try:
            out.append(Tenant.from_mapping(m))
        except KeyError as exc:
            raise loc.error(("tenants", i), f"missing key {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise loc.error(("tenants", i), str(exc)) from None
    names = [t.name for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise loc.error(("tenants", names.index(dup, names.index(dup) + 1)), f"duplicate tenant name {dup!r}")
    if not sum(t.weight for t in out) > 0:
        raise loc.error(("tenants",), "the tenants' weights must not all be 0")
    return out


def check_world(sc: Scenario, regions: Sequence[str], families: Collection[str]) -> None:
    """Check the scenario against its built fleet: the family is served, tenant regions exist.

    Raises
    ------
    ScenarioError
        Naming the file and line when the scenario came from one. Without this a tenant region the
        fleet does not have silently became the first region.
    """
    loc = sc.locator if isinstance(sc.locator, _Locator) else _Locator(Path(sc.source or f"<scenario {sc.name}>"),
                                                                        None)
    if sc.family not in families:
        raise loc.error(("family",), f"no endpoint of the fleet serves family {sc.family!r}; "
                                     f"the fleet serves: {', '.join(sorted(families))}")
    known = set(regions)
    for i, t in enumerate(sc.tenants):
        bad = [r for r in t.regions if r not in known]
        if bad:
            raise loc.error(("tenants", i, "regions"), f"tenant {t.name!r}: region(s) {', '.join(bad)} not in the "
                                                      f"fleet; regions: {', '.join(regions)}")


def _decision(path: Path, section: Any) -> dict[str, Any]:
    """The scenario's ``decision`` section, validated as the service config's (unknown keys fail)."""
    from pydantic import ValidationError

    from decision.config import DecisionSection

    try:
        return DecisionSection.model_validate(section).model_dump(include=set(section))
    except ValidationError as exc:
        raise ScenarioError(f"{path}: decision: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None
