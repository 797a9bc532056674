"""Prometheus metrics of the decision service, with conventional names and units."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from decision.errors import NoCandidate, QuotaExceeded

if TYPE_CHECKING:
    from decision.domain import Decision, OutcomeStatus
    from decision.engine import OutcomeResult

_STAGE_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)


class ServiceMetrics:
    """One registry per service instance (tests can build several side by side)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter("infermesh_decisions_total", "Decisions by result.", ["result"], registry=r)
        self.decision_seconds = Histogram("infermesh_decision_duration_seconds",
                                          "In-process decision time.", buckets=_STAGE_BUCKETS, registry=r)
        self.stage_seconds = Histogram("infermesh_stage_duration_seconds", "Pipeline stage time.", ["stage"],
                                       buckets=_STAGE_BUCKETS, registry=r)
        self.denials = Counter("infermesh_guardrail_denials_total", "Requests denied, by removing rule.",
                               ["rule"], registry=r)
        self.outcomes = Counter("infermesh_outcomes_total", "Outcomes reported, by status.", ["status"],
                                registry=r)
        self.reward = Histogram("infermesh_learner_reward", "Rewards given to the acting learner.",
                                buckets=(-1, -0.5, 0, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.telemetry_samples = Counter("infermesh_telemetry_samples_total", "Telemetry samples ingested.",
                                         ["source"], registry=r)
        self.telemetry_age = Histogram("infermesh_telemetry_age_seconds",
                                       "Age of the oldest telemetry value of each chosen endpoint.",
                                       buckets=(0.5, 1, 2, 5, 10, 30, 60, 300), registry=r)
        self.policy_reload_failures = Counter("infermesh_policy_reload_failures_total",
                                              "Policy bundles that failed check or tests on reload.", registry=r)
        self.policy_reloads = Counter("infermesh_policy_reloads_total", "Policy bundles swapped in.", registry=r)
        self.rpc_errors = Counter("infermesh_rpc_errors_total", "RPCs that ended in an error status.",
                                  ["method", "code"], registry=r)

    # -- what every front end (gRPC, Envoy ext_proc) records about the pipeline's answers --
    def record_decision(self, d: Decision) -> None:
        self.decisions.labels("routed").inc()
        self.decision_seconds.observe(d.decision_us / 1e6)
        if d.telemetry_age_s != float("inf"):
            self.telemetry_age.observe(d.telemetry_age_s)

    def record_denial(self, exc: NoCandidate) -> None:
        """A request every candidate of which the guardrails removed (a quota denial included)."""
        self.decisions.labels("quota_denied" if isinstance(exc, QuotaExceeded) else "denied").inc()
        for rule in exc.rules:
            self.denials.labels(rule).inc()

    def record_outcome(self, status: OutcomeStatus, result: OutcomeResult) -> None:
        if result.duplicate:
            return
        self.outcomes.labels(str(status)).inc()
        if result.reward is not None:
            self.reward.observe(result.reward)

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Register a gauge read on scrape (audit queue depth, spool size, pending outcomes...)."""
        g = Gauge(name, doc, registry=self.registry)
        g.set_function(read)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
