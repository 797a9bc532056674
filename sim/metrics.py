"""Per-strategy measurements and the summary in the schema of issue 6."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sim.model import Request
from sim.service import IDLE_POWER_FRACTION
from sim.world import World


def _pcts(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q}": float("nan") for q in qs}
    arr = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(arr, q)), 3) for q in qs}


@dataclass
class Collector:
    """Everything measured in one run of one strategy."""

    requests: int = 0
    completed: int = 0
    first_tokens: int = 0  # requests whose first token was produced (ttft_ms has one entry each)
    dropped: Counter[str] = field(default_factory=Counter)
    ttft_ms: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    arrival_s: list[float] = field(default_factory=list)
    decision_us: list[float] = field(default_factory=list)
    # With decision workers: each decision's start minus its request's arrival (the queueing delay).
    decision_wait_ms: list[float] = field(default_factory=list)
    # With decision workers: the arrival of each request still waiting for its worker when the run ended.
    undecided_arrival_s: list[float] = field(default_factory=list)
    workers: int = 0  # decision workers modelled (0: the strategy decides on arrival)
    # With decision workers: the time each outcome report occupied its worker.
    outcome_us: list[float] = field(default_factory=list)
    cost_usd: float = 0.0
    out_tokens: int = 0
    in_tokens: int = 0
    slo_met: int = 0
    violations: int = 0
    hedges: int = 0
    hedge_wins: int = 0
    cancelled_gpu_s: float = 0.0
    events: int = 0  # heap events plus per-endpoint telemetry samples (upstream: SignalUpdate(NodeId))
    heap_events: int = 0
    wall_s: float = 0.0
    end_time: float = 0.0  # the last event's time (capped at duration + drain)
    window_s: float = 0.0  # duration + drain: the window of fleet cost, energy and util_std
    arrival_by_rid: list[float] = field(default_factory=list)  # every request's arrival, by its rid
    served: bytearray = field(default_factory=bytearray)  # 1 where the request (by rid) got a first token
    finished: bytearray = field(default_factory=bytearray)  # 1 where the request (by rid) completed

    def record_arrival(self, req: Request) -> None:
        """Count a request as it arrives (rids are 0, 1, 2, ... in arrival order)."""
        self.requests += 1
        self.arrival_by_rid.append(req.arrival)
        self.served.append(0)
        self.finished.append(0)

    def _window_end(self) -> float:
        return self.window_s if self.window_s > 0.0 else self.end_time

    def _censored_ms(self, flags: bytearray) -> list[float]:
        end = self._window_end()
        return [max(0.0, (end - a) * 1000.0) for a, s in zip(self.arrival_by_rid, flags, strict=True) if not s]

    def record_undecided(self, req: Request) -> None:
        """Count a request still waiting for its decision worker when the run ended (never decided)."""
        self.undecided_arrival_s.append(req.arrival)

    def censored_decision_wait_ms(self) -> list[float]:
        """For each request still waiting for its decision worker at the end, its wait so far (arrival to the
        end of the window): a lower bound on a decision wait it never finished."""
        end = self._window_end()
        return [max(0.0, (end - a) * 1000.0) for a in self.undecided_arrival_s]

    def censored_ttft_ms(self) -> list[float]:
        """For each request without a first token (dropped, or still waiting when the run stopped), the
        time from its arrival to the end of the window: a lower bound on a TTFT it never had."""
        return self._censored_ms(self.served)

    def censored_latency_ms(self) -> list[float]:
        """The same lower bound for each request that did not complete, on the latency it never had."""
        return self._censored_ms(self.finished)

    def record_first(self, req: Request) -> None:
        """Count a request's first token: TTFT and SLO are known now, whether or not it completes."""
        ttft = (req.first_token_at - req.arrival) * 1000.0
        if req.rid < len(self.served):
            self.served[req.rid] = 1
        self.first_tokens += 1
        self.ttft_ms.append(ttft)
        self.arrival_s.append(req.arrival)
        if ttft <= req.ttft_target_ms:
            self.slo_met += 1

    def record_done(self, req: Request) -> None:
        """Count a completed request (its TTFT was recorded by :meth:`record_first`)."""
        self.completed += 1
        if req.rid < len(self.finished):
            self.finished[req.rid] = 1
        self.latency_ms.append((req.done_at - req.arrival) * 1000.0)
        self.cost_usd += req.cost_usd
        self.out_tokens += req.out_tokens
        self.in_tokens += req.in_tokens

    def summary(self, world: World, nodes_busy_s: np.ndarray) -> dict[str, Any]:
        """The per-strategy object of ``summary.json``.

        Per-1K-token measures are NaN when no output token was produced (nothing to divide by).
        Fleet cost, energy and ``util_std`` use the fixed window ``window_s`` (duration + drain),
        the same for every strategy; ``end_time`` only when no window was set.
        """
        t = max(self.window_s if self.window_s > 0.0 else self.end_time, 1e-9)
        k_tokens = self.out_tokens / 1000.0 if self.out_tokens > 0 else float("nan")
        fleet_usd = float(world.usd_per_s.sum()) * t
        util = np.clip(nodes_busy_s / t, 0.0, 1.0)
        watts = np.array([p.watts for p in world.params])
        joules = float((watts * (IDLE_POWER_FRACTION * t + (1 - IDLE_POWER_FRACTION) * util * t)).sum())
        censored = self.censored_ttft_ms()
        return {
            # Every request: one without a first token counts at the lower bound of its TTFT (arrival to
            # the end of the window), so a strategy cannot improve its percentiles by dropping requests.
            "ttft_ms": _pcts(self.ttft_ms + censored),
            # The same for latency: a request that never completed counts at its lower bound.
            "latency_ms": _pcts(self.latency_ms + self.censored_latency_ms()),
            "cost_per_1k_tokens": self.cost_usd / k_tokens,
            "fleet_cost_per_1k_tokens": fleet_usd / k_tokens,
            "energy_wh_per_1k_tokens": joules / 3600.0 / k_tokens,
            "util_std": round(float(util.std()), 4),
            "requests": self.requests,
            "completed": self.completed,
            "completion_rate": self.completed / max(self.requests, 1),
            "slo_attainment": self.slo_met / max(self.requests, 1),
            "guardrail_violations": self.violations,
            "decision_us": _pcts(self.decision_us, (50, 99)),
            # Time waiting for a busy decision worker (null for strategies that model none). A request
            # still queued when the run ended counts at its wait so far (a lower bound, as in ttft_ms), so
            # a queue that never drains cannot hide; decision_wait_ms_decided leaves those out.
            "decision_wait_ms": (_pcts(self.decision_wait_ms + self.censored_decision_wait_ms())
                                 if self.workers else None),
            "decision_wait_ms_decided": _pcts(self.decision_wait_ms) if self.workers else None,
            "decision_queued_at_end": len(self.undecided_arrival_s) if self.workers else None,
            "workers": self.workers,
            # What each outcome report occupied its decision worker (null without workers).
            "outcome_us": _pcts(self.outcome_us, (50, 99)) if self.workers else None,
            # Beyond the schema: what else a reader needs to trust the row.
            "dropped": dict(self.dropped),
            "in_flight_at_end": self.requests - self.completed - sum(self.dropped.values()),
            # The requests without a first token (dropped, or still waiting or prefilling when the run
            # stopped) miss the SLO and count in ttft_ms at a lower bound; ttft_ms_served leaves them out.
            "first_tokens": self.first_tokens,
            "no_first_token": self.requests - self.first_tokens,
            "ttft_ms_served": _pcts(self.ttft_ms),
            "latency_ms_completed": _pcts(self.latency_ms),
            "hedges": self.hedges,
            "hedge_wins": self.hedge_wins,
            "events": self.events,
            "heap_events": self.heap_events,
            "wall_s": round(self.wall_s, 2),
            "events_per_s": round(self.events / max(self.wall_s, 1e-9)),
            "simulated_s": round(self.end_time, 3),
            "window_s": round(t, 3),
        }

    def learning_curve(self, bucket_s: float) -> list[tuple[float, float, int]]:
        """(bucket start s, P95 TTFT ms, first tokens) per arrival-time bucket."""
        if not self.arrival_s:
            return []
        a = np.asarray(self.arrival_s)
        v = np.asarray(self.ttft_ms)
        b = (a // bucket_s).astype(int)
        out = []
        for k in range(int(b.max()) + 1):
            sel = v[b == k]
            if len(sel):
                out.append((k * bucket_s, float(np.percentile(sel, 95)), len(sel)))
        return out
