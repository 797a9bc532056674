"""Prometheus metrics of the decision service, with conventional names and units."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from decision.errors import NoCandidate, QuotaExceeded

if TYPE_CHECKING:
    from decision.domain import Decision, OutcomeStatus
    from decision.engine import OutcomeResult

_STAGE_BUCKETS = (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 5e-2)


class FastHistogram(Collector):
    """A Prometheus histogram for the request path: ``observe`` is one bisect and two additions.

    ``prometheus_client.Histogram.observe`` walks its buckets in Python and takes a lock per
    value updated; the decision path records six values per decision, which cost more than some
    of its stages. This keeps plain per-bucket counts (non-cumulative) under one lock and builds
    the exposition (cumulative ``le`` buckets, ``_sum``, ``_count``) when scraped.

    Parameters
    ----------
    name, documentation : str
        As for ``prometheus_client.Histogram`` (``name`` without the ``_bucket`` suffix).
    buckets : sequence of float
        Upper bounds, ascending; ``+Inf`` is added.
    label : str, optional
        The name of the one label, if any (values are created on first use).
    registry : CollectorRegistry, optional
        Where to register.

    Examples
    --------
    >>> r = CollectorRegistry()
    >>> h = FastHistogram("stage_seconds", "Stage time.", (0.001, 0.01), label="stage", registry=r)
    >>> h.observe_many({"guard": 0.0005, "score": 0.02})
    >>> r.get_sample_value("stage_seconds_bucket", {"stage": "guard", "le": "0.001"})
    1.0
    >>> r.get_sample_value("stage_seconds_bucket", {"stage": "score", "le": "0.01"})
    0.0
    >>> r.get_sample_value("stage_seconds_count", {"stage": "score"})
    1.0
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], *, label: str | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("buckets must be strictly ascending")
        self.name = name
        self.documentation = documentation
        self.label = label
        self._bounds = bounds
        # The ``le`` labels as prometheus_client writes them (untyped there).
        self._les = [*(str(floatToGoString(b)) for b in bounds), "+Inf"]  # type: ignore[no-untyped-call]
        self._lock = threading.Lock()
        # label value -> [count per bucket (the last: +Inf)..., sum]
        self._series: dict[str, list[float]] = {}
        if registry is not None:
            registry.register(self)

    def _row(self, value: str) -> list[float]:
        row = self._series.get(value)
        if row is None:
            row = self._series.setdefault(value, [0.0] * (len(self._bounds) + 2))
        return row

    def observe(self, amount: float, label_value: str = "") -> None:
        self.observe_many({label_value: amount})

    def observe_many(self, amounts: Mapping[str, float], scale: float = 1.0) -> None:
        """One value per label value (``amount * scale`` each), under one lock."""
        bounds = self._bounds
        with self._lock:
            for value, amount in amounts.items():
                row = self._row(value)
                amount *= scale
                row[bisect_left(bounds, amount)] += 1
                row[-1] += amount

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation,
                                     labels=[self.label] if self.label is not None else None)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = self._family()
        with self._lock:
            series = {k: list(v) for k, v in self._series.items()}
        if self.label is None and not series:
            series[""] = [0.0] * (len(self._bounds) + 2)
        for value, row in sorted(series.items()):
            cumulative, total = [], 0.0
            for bound, n in zip(self._les, row[:-1], strict=True):
                total += n
                cumulative.append((bound, total))
            family.add_metric([value] if self.label is not None else [], cumulative, row[-1])
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield self._family()


class ServiceMetrics:
    """One registry per service instance (tests can build several side by side)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter("infermesh_decisions_total", "Decisions by result.", ["result"], registry=r)
        self._routed = self.decisions.labels("routed")
        self.decision_seconds = FastHistogram("infermesh_decision_duration_seconds", "In-process decision time.",
                                              _STAGE_BUCKETS, registry=r)
        self.stage_seconds = FastHistogram("infermesh_stage_duration_seconds", "Pipeline stage time.",
                                           _STAGE_BUCKETS, label="stage", registry=r)
        self.denials = Counter("infermesh_guardrail_denials_total", "Requests denied, by removing rule.",
                               ["rule"], registry=r)
        self.outcomes = Counter("infermesh_outcomes_total", "Outcomes reported, by status.", ["status"],
                                registry=r)
        self.reward = Histogram("infermesh_learner_reward", "Rewards given to the acting learner.",
                                buckets=(-1, -0.5, 0, 0.25, 0.5, 0.75, 0.9, 1.0), registry=r)
        self.telemetry_samples = Counter("infermesh_telemetry_samples_total", "Telemetry samples ingested.",
                                         ["source"], registry=r)
        self.telemetry_age = FastHistogram("infermesh_telemetry_age_seconds",
                                           "Age of the oldest telemetry value of each chosen endpoint.",
                                           (0.5, 1, 2, 5, 10, 30, 60, 300), registry=r)
        self.policy_reload_failures = Counter("infermesh_policy_reload_failures_total",
                                              "Policy bundles that failed check or tests on reload.", registry=r)
        self.policy_reloads = Counter("infermesh_policy_reloads_total", "Policy bundles swapped in.", registry=r)
        self.rpc_errors = Counter("infermesh_rpc_errors_total", "RPCs that ended in an error status.",
                                  ["method", "code"], registry=r)

    # -- what every front end (gRPC, Envoy ext_proc) records about the pipeline's answers --
    def record_decision(self, d: Decision) -> None:
        self._routed.inc()
        self.decision_seconds.observe(d.decision_us / 1e6)
        if d.telemetry_age_s != float("inf"):
            self.telemetry_age.observe(d.telemetry_age_s)

    def record_stages(self, timings_us: Mapping[str, float]) -> None:
        """One decision's stage times (µs), as the engine's ``on_stages`` hook gives them."""
        self.stage_seconds.observe_many(timings_us, 1e-6)

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

    def counter(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Register a counter read on scrape from a count kept elsewhere (``name`` ends in ``_total``)."""
        self.registry.register(_CountReader(name.removesuffix("_total"), doc, read))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _CountReader(Collector):
    """A counter whose value a component keeps itself (the telemetry store, the scraper)."""

    def __init__(self, name: str, doc: str, read: Callable[[], float]) -> None:
        self._name, self._doc, self._read = name, doc, read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self._name, self._doc, value=float(self._read()))
