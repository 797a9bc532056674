"""Support for the Envoy end-to-end tests: a three-backend test fleet and a residency guard.

The fleet's deployment addresses are the real local backends (``127.0.0.1:port``), so the address
InferMesh picks is the one Envoy dials. Backend ``eu-fast`` answers JSON quickly, ``eu-stream``
streams SSE at a middling pace, ``us-stream`` streams slowly and sits in the US jurisdiction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from decision.domain import Candidate, Decision, GuardResult, Outcome, RequestContext, Verdict
from decision.engine import DecisionEngine
from decision.fleet import Fleet
from decision.health_guard import BuiltinHealthGuard
from decision.telemetry import QUEUE_RUNNING, QUEUE_WAITING, TelemetryStore
from learners.least_ttft import LeastExpectedTtft

MODEL = "tiny-llm-1b"
FAMILY = "tiny"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    site: str
    ttft_ms: float
    token_ms: float
    streaming: bool


BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("eu-fast", "eu-dc1", 2.0, 0.5, False),
    BackendSpec("eu-stream", "eu-dc2", 15.0, 2.0, True),
    BackendSpec("us-stream", "us-dc1", 40.0, 5.0, True),
)


def build_fleet(addresses: Mapping[str, str]) -> Fleet:
    """A fleet of one model on three endpoints, one per backend, ``addresses`` by backend name."""
    sites = [
        {"id": "eu-dc1", "region": "eu-west", "jurisdiction": "EU", "tier": "datacenter"},
        {"id": "eu-dc2", "region": "eu-central", "jurisdiction": "EU", "tier": "datacenter"},
        {"id": "us-dc1", "region": "us-east", "jurisdiction": "US", "tier": "datacenter"},
    ]
    nodes = [{"id": f"{b.name}-n0", "site": b.site, "gpu_type": "A100", "gpu_count": 1, "gpu_hour_usd": 2.0,
              "watts_per_gpu": 400.0} for b in BACKENDS]
    deployments = [{"id": b.name, "node": f"{b.name}-n0", "model": MODEL, "address": addresses[b.name],
                    "max_concurrency": 8} for b in BACKENDS]
    return Fleet.from_mapping({
        "sites": sites, "nodes": nodes, "deployments": deployments,
        "models": [{"name": MODEL, "family": FAMILY, "params_b": 1.0}],
        "links": [{"a": "eu-west", "b": "us-east", "rtt_ms": 80.0, "bandwidth_gbps": 10.0},
                  {"a": "eu-central", "b": "us-east", "rtt_ms": 80.0, "bandwidth_gbps": 10.0}],
    }, "tests/envoy_support.py")


class ResidencyGuard:
    """Data residency plus a request quota, behind the :class:`decision.contracts.Guard` contract.

    Removes candidates whose jurisdiction is not in the request's ``allowed_jurisdictions`` (when
    given), and denies the whole request for tenants listed in ``over_quota``. Health is checked by
    the built-in rule first.
    """

    RESIDENCY = "test.residency"
    QUOTA = "test.quota"

    def __init__(self, over_quota: Sequence[str] = ()) -> None:
        self.over_quota = frozenset(over_quota)
        self.health = BuiltinHealthGuard()
        self.commits = 0
        self.releases = 0

    @property
    def revision(self) -> str:
        return "test-residency-1"

    def prefetch(self, ctx: RequestContext) -> Mapping[str, Any]:
        return {}

    def evaluate(self, ctx: RequestContext, candidates: Sequence[Candidate],
                 state: Mapping[str, Any]) -> GuardResult:
        if ctx.tenant in self.over_quota:
            v = Verdict(self.QUOTA, "test", "quota", False, f"tenant {ctx.tenant} over quota", self.revision)
            return GuardResult((), (v,), self.revision, quota_denied=True)
        healthy = self.health.evaluate(ctx, candidates, state)
        allowed: list[Candidate] = []
        verdicts = list(healthy.verdicts)
        for c in healthy.allowed:
            ok = not ctx.allowed_jurisdictions or c.endpoint.jurisdiction in ctx.allowed_jurisdictions
            verdicts.append(Verdict(self.RESIDENCY, "test", "residency", ok,
                                    f"{c.endpoint.jurisdiction} {'in' if ok else 'not in'} "
                                    f"{','.join(ctx.allowed_jurisdictions) or 'any'}",
                                    self.revision, c.endpoint.endpoint_id))
            if ok:
                allowed.append(c)
        return GuardResult(tuple(allowed), tuple(verdicts), self.revision)

    def commit(self, ctx: RequestContext, decision: Decision) -> None:
        self.commits += 1

    def release(self, ctx: RequestContext, state: Mapping[str, Any]) -> None:
        self.releases += 1

    def settle(self, ctx: RequestContext, outcome: Outcome, decided_at: float) -> None:
        return None


class RecordingEngine(DecisionEngine):
    """A :class:`DecisionEngine` that also keeps every decision and outcome it saw, for assertions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decisions: dict[str, Decision] = {}
        self.outcomes: dict[str, Any] = {}

    def decide(self, ctx: RequestContext, *, alive: Callable[[], bool] | None = None) -> Decision:
        d = super().decide(ctx, alive=alive)
        self.decisions[d.decision_id] = d
        return d

    def report_outcome(self, outcome: Any) -> Any:
        res = super().report_outcome(outcome)
        self.outcomes[outcome.decision_id] = outcome
        return res


def make_engine(fleet: Fleet, guard: ResidencyGuard) -> RecordingEngine:
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints})
    return RecordingEngine(fleet, store, guard, LeastExpectedTtft(), max_fallbacks=2)


def set_load(engine: DecisionEngine, busy: Mapping[str, float]) -> None:
    """Queue depth per endpoint, so the least-TTFT learner prefers the idle ones."""
    for endpoint_id, waiting in busy.items():
        engine.telemetry.update_endpoint(endpoint_id, {QUEUE_RUNNING: 8.0, QUEUE_WAITING: waiting})
