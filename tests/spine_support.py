"""Helpers for the spine's tests: engines on the demo fleet and small scripted guards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc

from decision.domain import Candidate, Decision, GuardResult, Outcome, RequestContext, Verdict
from decision.edge import EdgeInterceptor
from decision.engine import DecisionEngine
from decision.fleet import Fleet
from decision.grpc_aio import AioDecisionServer
from decision.grpc_server import DecisionServicer, build_server
from decision.health_guard import BuiltinHealthGuard
from decision.metrics import ServiceMetrics
from decision.split_server import SplitDecisionServer
from decision.telemetry import TelemetryStore
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc
from learners.least_ttft import LeastExpectedTtft


class ScriptedGuard:
    """A guard that denies by endpoint-id substring or denies everything as a quota rule."""

    def __init__(self, deny_substring: str = "", quota_tenant: str = "") -> None:
        self.deny_substring = deny_substring
        self.quota_tenant = quota_tenant
        self.commits = 0
        self.releases = 0

    @property
    def revision(self) -> str:
        return "scripted-1"

    def prefetch(self, ctx: RequestContext) -> Mapping[str, Any]:
        return {"quota_used": 1 if ctx.tenant == self.quota_tenant else 0}

    def evaluate(self, ctx: RequestContext, candidates: Sequence[Candidate], state: Mapping[str, Any]) -> GuardResult:
        if state["quota_used"]:
            v = Verdict("quota.rpm", "test", "quota", False, "tenant over its requests/minute", self.revision)
            return GuardResult((), (v,), self.revision, quota_denied=True)
        verdicts, allowed = [], []
        for c in candidates:
            ok = not (self.deny_substring and self.deny_substring in c.endpoint.endpoint_id)
            verdicts.append(Verdict("test.deny-substring", "test", "other", ok, "scripted", self.revision,
                                    c.endpoint.endpoint_id))
            if ok:
                allowed.append(c)
        return GuardResult(tuple(allowed), tuple(verdicts), self.revision)

    def commit(self, ctx: RequestContext, decision: Decision) -> None:
        self.commits += 1

    def release(self, ctx: RequestContext, state: Mapping[str, Any]) -> None:
        self.releases += 1

    def settle(self, ctx: RequestContext, outcome: Outcome, decided_at: float) -> None:
        return None


def demo_engine(fleet: Fleet, guard: Any = None, **kwargs: Any) -> DecisionEngine:
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints})
    return DecisionEngine(fleet, store, guard or BuiltinHealthGuard(), kwargs.pop("learner", LeastExpectedTtft()),
                          **kwargs)


@contextlib.contextmanager
def edge_served(fleet: Fleet, kind: str) -> Iterator[tuple[DecisionEngine, ServiceMetrics, Any]]:
    """(engine, metrics, stub): a demo engine's servicer behind the production edge, on a server of
    ``kind`` (``threads``, ``asyncio`` or ``split``), stopped on exit."""
    engine = demo_engine(fleet)
    metrics = ServiceMetrics()
    servicer = DecisionServicer(engine, metrics)
    edge = EdgeInterceptor(metrics=metrics)
    stop: Any
    if kind == "threads":
        srv, port, _ = build_server(servicer, address="127.0.0.1:0", threads=4, interceptors=[edge])
        srv.start()
        stop = lambda: srv.stop(0).wait()  # noqa: E731
    elif kind == "split":
        split = SplitDecisionServer(servicer, address="127.0.0.1:0", edge=edge)
        port = split.port
        stop = lambda: split.stop(0)  # noqa: E731
    else:
        aio = AioDecisionServer(servicer, address="127.0.0.1:0", edge=edge)
        port = aio.port
        stop = lambda: aio.stop(0)  # noqa: E731
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield engine, metrics, pb_grpc.DecisionServiceStub(channel)
    finally:
        channel.close()
        stop()
