"""The discrete-event engine: one run of one strategy over one workload on one fleet.

Events live in a binary heap keyed by (simulated time, sequence number), so ties resolve in
insertion order and a seeded run is reproducible. A request's life:

arrive -> (router decides; its measured decision time passes) -> travels half an RTT plus the
prompt's transfer time -> waits for a batch slot -> prefill -> first token (the client sees it
half an RTT later) -> decode in the shared batch -> done (half an RTT later at the client) ->
the outcome report reaches the router (``CLIENT_TO_ROUTER_S`` after the client is done).

The router's count of copies outstanding per endpoint (``RouterView.outstanding``: what
``least_load`` and ``power_of_two`` read, and the cells' load in a hierarchical candidate search)
rises when a copy is sent and drops when the router learns the copy ended: at the same moment an
outcome report reaches it (the response's end or the endpoint's refusal reaching the client, plus
``CLIENT_TO_ROUTER_S``), or, for a losing hedge copy, when the router cancels it on seeing the
winner's first token. In a run where nothing reads the count it drops at once, without an event,
so such runs are event for event what they were before the count was delayed. The cancel itself
reaches the loser's endpoint half an RTT later (a CANCEL event): until then the endpoint queues
and admits the copy as any other.

A strategy that decides in worker processes (the pipeline, ``serve --workers N``) has
``RunConfig.workers`` single-server FIFO queues: a request goes to one worker uniformly at random
(the kernel's SO_REUSEPORT hash over many client connections), waits while that worker decides
the requests before it, and is decided when the worker is free, on the state of that moment; its
measured decision time is the worker's service time. The worker process also serves its requests'
outcome reports and its learner's syncs (same process, one GIL): they join the same FIFO, each
occupying the worker for its measured wall time (with a fixed decision time: ``OUTCOME_SHARE`` and
``SYNC_SHARE`` of it). Other strategies decide on arrival, and their outcomes cost no time; one
without workers that learns nothing from outcomes (it keeps ``Strategy.on_complete``'s no-op) gets
no report event at all.

Conservation holds by construction and is checked by the tests: every request ends completed,
dropped with a reason, or still in flight when the run stops.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from typing import cast

import numpy as np

from sim.metrics import Collector
from sim.model import (
    C_CANCELLED,
    C_DONE,
    C_PREFILL,
    C_TRAVEL,
    C_WAITING,
    DONE,
    DROPPED,
    FIRST_TOKEN,
    MAX_WORKERS,
    ROUTED,
    Copy,
    Request,
)
from sim.node import Node
from sim.rules import breaks_rules
from sim.strategies.base import RouterView, Strategy
from sim.telemetry_view import TelemetryView
from sim.workload import RequestSpec, Tenant
from sim.world import World

ARRIVE, REACH, FIRST, NODE, SCRAPE, DELIVER, HEDGE, DEGRADE, WORKER, SYNC, REPORT, RELEASE, CANCEL = range(13)
# What a decision worker does, in its FIFO: decide a request, take an outcome report, sync its learner.
JOB_DECIDE, JOB_OUTCOME, JOB_SYNC = range(3)
# With a fixed decision time (--decision-time US), what an outcome report and a learner sync occupy a
# worker, as a share of that time: their mean measured wall time over choose()'s, mesh-512 with 128
# and 512 endpoints, 4 workers, LinUCB (twenty-first session: report_outcome 78-98 µs against choose
# 461-519 µs, 0.17-0.19; a sync 276-316 µs, 0.6). With measured times each job's own wall time counts.
OUTCOME_SHARE = 0.18
SYNC_SHARE = 0.6
# The router sits at the client's edge: a request is decided at its arrival and its dispatch travels
# the client's half RTT to the endpoint, so the client-to-router leg takes no time. An outcome report
# therefore reaches the router when the response's end (or an error) reaches the client, plus this.
CLIENT_TO_ROUTER_S = 0.0
KV_TOO_BIG = "exceeds KV capacity"  # drop reason: prompt + completion larger than the endpoint's whole KV cache


@dataclass(frozen=True, slots=True)
class Degradation:
    """A hidden change (``factor`` x throughput) of one endpoint from ``start`` on (``thermal`` shows a warm GPU)."""

    endpoint: int
    start: float
    factor: float
    thermal: bool


@dataclass(frozen=True, slots=True)
class RunConfig:
    duration_s: float
    drain_s: float = 120.0
    telemetry_period_s: float = 1.0
    telemetry_delay_s: tuple[float, float] = (0.0, 0.0)
    family: str = "llama"
    decision_time: str = "measured"  # or a fixed number of microseconds, for bit-reproducible runs
    seed: int = 0
    workers: int = 1  # decision workers of a strategy that models them (the pipeline's serve --workers)

    def __post_init__(self) -> None:
        # A period <= 0 schedules the next scrape at the same instant forever: the run never ends.
        if not self.telemetry_period_s > 0.0 or not math.isfinite(self.telemetry_period_s):
            raise ValueError(f"telemetry period must be a positive number of seconds, got {self.telemetry_period_s}")
        for name, v in (("duration", self.duration_s), ("drain", self.drain_s)):
            if not v >= 0.0 or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {v}")
        lo, hi = self.telemetry_delay_s
        if not 0.0 <= lo <= hi or not math.isfinite(hi):
            raise ValueError(f"telemetry delay must be 0 <= low <= high, got {self.telemetry_delay_s}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be an integer from 1 to {MAX_WORKERS}, got {self.workers!r}")
        if self.decision_time != "measured":
            us = float(self.decision_time)
            if not us >= 0.0 or not math.isfinite(us):
                raise ValueError(f"decision time must be 'measured' or microseconds >= 0, got {self.decision_time!r}")


class Simulation:
    """Runs ``strategy`` on ``world`` for the requests of ``workload``."""

    def __init__(self, world: World, workload: Iterable[RequestSpec], tenants: Sequence[Tenant],
                 strategy: Strategy, cfg: RunConfig, degradations: Sequence[Degradation] = ()) -> None:
        self.world = world
        self.nodes: list[Node] = world.make_nodes()
        self.tenants = tuple(tenants)
        self.strategy = strategy
        self.cfg = cfg
        self.tele = TelemetryView(world)
        self.view = RouterView(world, self.tele, cfg.seed)
        self.metrics = Collector()
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object, int]] = []
        self._seq = count()
        self._specs: Iterator[RequestSpec] = iter(workload)
        self._inflight = 0
        self._arrivals_done = False
        self._rid = 0
        self._rng = np.random.default_rng(cfg.seed + 7)
        self._fixed_us = -1.0 if cfg.decision_time == "measured" else float(cfg.decision_time)
        self.degradations = tuple(degradations)
        self.requests_log: list[Request] | None = None  # tests ask for every request
        # Decision workers (0: the strategy decides on arrival): when each is next free, and the jobs
        # waiting for it in the order they came (decisions, outcome reports, learner syncs).
        self.n_workers = cfg.workers if strategy.modelled_workers else 0
        self._free_at = [0.0] * self.n_workers
        self._queues: list[deque[tuple[int, object, float]]] = [deque() for _ in range(self.n_workers)]
        self._queued = 0  # requests waiting for a worker to decide them (they count in flight: the run goes on)
        self._jobs_queued = 0  # every job waiting for a worker (outcomes too: the run goes on until they are taken)
        self._reports_due = 0  # outcome reports still on their way to the router (the run goes on for them)
        # Whether anything reads the router's outstanding counts (set by run(), from the strategy and the
        # router view): only then does a count wait for the router to learn a copy ended (a RELEASE event).
        self._counts_read = False
        self._releases_due = 0  # copy ends still on their way to the router (the run goes on for them)
        self._cancels_due = 0  # cancels of losing hedge copies still on their way to the endpoint
        # Losing hedge copies still prefilling (a prefill runs to its end): their GPU time is billed as it ends.
        self._losers: dict[Copy, None] = {}  # in the order they lost (reproducible sums)
        # Tests ask for every job a worker ran: (worker, JOB_*, when it came, when it started, service µs).
        self.jobs_log: list[tuple[int, int, float, float, float]] | None = None
        self._assign_rng = np.random.default_rng(cfg.seed + 23)  # its own stream: the others are unchanged

    # -- scheduling --
    def _push(self, t: float, kind: int, a: object, b: int = 0) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, a, b))

    def _next_arrival(self) -> None:
        spec = next(self._specs, None)
        if spec is None or spec.t >= self.cfg.duration_s:
            self._arrivals_done = True
            return
        self._push(spec.t, ARRIVE, spec)

    def _reschedule(self, i: int, nd: Node) -> None:
        nd.version += 1
        t = nd.next_completion(self.now)
        if t >= 0.0:
            self._push(t, NODE, i, nd.version)

    # -- the run --
    def run(self, progress: Callable[[float], None] | None = None) -> Collector:
        strategy, cfg = self.strategy, self.cfg
        if self.n_workers:
            strategy.set_workers(self.n_workers)
        strategy.bind(self.view)
        self._counts_read = strategy.reads_outstanding or self.view.ranks_cells(cfg.family)
        if strategy.needs_store:
            self.tele.store = getattr(strategy, "store", None)
        self._next_arrival()
        self._push(0.0, SCRAPE, None)
        period = strategy.sync_interval_s if self.n_workers > 1 else 0.0
        for w in range(self.n_workers if period > 0.0 else 0):
            self._push(period * (1.0 + w / self.n_workers), SYNC, None, w)  # each process's own phase
        for d in self.degradations:
            self._push(d.start, DEGRADE, d)
        end = cfg.duration_s + cfg.drain_s
        heap, pop = self._heap, heapq.heappop
        events = 0
        next_tick = 0.0
        wall0 = time.perf_counter()
        while heap:
            t, _, kind, a, b = pop(heap)
            if t > end:
                break
            self.now = t
            self.view.now = t
            events += 1
            if kind == NODE:
                self._on_node(a, b)  # type: ignore[arg-type]
            elif kind == FIRST:
                self._on_first(a)  # type: ignore[arg-type]
            elif kind == REACH:
                self._on_reach(a)  # type: ignore[arg-type]
            elif kind == ARRIVE:
                self._on_arrive(a)  # type: ignore[arg-type]
                self._next_arrival()
            elif kind == SCRAPE:
                snap = self.tele.scrape(self.nodes, t)
                lo, hi = cfg.telemetry_delay_s
                delay = lo if hi <= lo else float(self._rng.uniform(lo, hi))
                self._push(t + delay, DELIVER, snap)
                if not self._finished():
                    self._push(t + cfg.telemetry_period_s, SCRAPE, None)
            elif kind == DELIVER:
                self.tele.deliver(a)  # type: ignore[arg-type]
            elif kind == HEDGE:
                self._on_hedge(a)  # type: ignore[arg-type]
            elif kind == DEGRADE:
                self._on_degrade(a)  # type: ignore[arg-type]
            elif kind == WORKER:
                self._on_worker(b)
            elif kind == SYNC:
                self._submit(b, JOB_SYNC, None)  # the learner's sync thread shares its worker's GIL
                self._push(t + period, SYNC, None, b)
            elif kind == REPORT:
                self._on_report(a)  # type: ignore[arg-type]
            elif kind == RELEASE:
                self._releases_due -= 1
                self.view.outstanding[b] -= 1
            elif kind == CANCEL:
                self._on_cancel(a)  # type: ignore[arg-type]
            if progress is not None and t >= next_tick:
                progress(t)
                next_tick = t + 1.0
            if self._finished() and kind != DELIVER:
                break
        m = self.metrics
        m.events = events + self.tele.samples
        m.heap_events = events
        m.workers = self.n_workers
        m.wall_s = time.perf_counter() - wall0
        m.end_time = min(self.now, end)
        # Fleet-wide measures ($, energy, utilisation) use one window for every strategy: the whole
        # fleet is provisioned for duration + drain whenever a strategy's last request ends.
        m.window_s = end
        self._record_undecided()
        for nd in self.nodes:
            nd.advance(m.end_time)
        for c in self._losers:  # cut off mid-prefill by the end of the window: billed up to it
            self._lost(c)
        self._losers.clear()
        return m

    def _finished(self) -> bool:
        """No arrival to come, no request in flight, no outcome report or copy's end on its way to the router
        or waiting for a decision worker, no losing hedge copy still prefilling (the GPU is still busy with it)
        or still to be reached by its cancel."""
        return (self._arrivals_done and self._inflight == 0 and self._jobs_queued == 0 and self._reports_due == 0
                and self._releases_due == 0 and self._cancels_due == 0 and not self._losers)

    def _record_undecided(self) -> None:
        """Tell the metrics which requests the run ended with still waiting for a decision worker (their
        wait so far counts in ``decision_wait_ms`` as a lower bound, as a missing TTFT does in ``ttft_ms``)."""
        for q in self._queues:
            for kind, job, _ in q:
                if kind == JOB_DECIDE:
                    self.metrics.record_undecided(cast(Request, job))

    def busy_seconds(self) -> np.ndarray:
        """Each endpoint's GPU busy time so far.

        Returns
        -------
        numpy.ndarray
            Seconds per endpoint during which it prefilled or decoded, each second counted once.
        """
        return np.array([nd.busy_s for nd in self.nodes])

    # -- handlers --
    def _on_arrive(self, spec: RequestSpec) -> None:
        ten = self.tenants[spec.tenant]
        req = Request(self._rid, spec.t, spec.in_tokens, spec.out_tokens, ten.name,
                      self.world.region_index.get(spec.region, 0), spec.session, spec.hashes,
                      ten.ttft_target_ms, ten.jurisdictions, ten.data_class)
        req.tag = ten.user_tier
        self._rid += 1
        self.metrics.record_arrival(req)
        if self.requests_log is not None:
            self.requests_log.append(req)
        n = self.n_workers
        if not n:
            self._decide(req)
            return
        w = int(self._assign_rng.integers(n)) if n > 1 else 0
        req.worker = w
        self._submit(w, JOB_DECIDE, req)

    def _submit(self, w: int, kind: int, job: object) -> None:
        """Worker ``w`` runs ``job`` now if it is idle, else after the jobs before it (FIFO)."""
        q = self._queues[w]
        if not q and self._free_at[w] <= self.now:
            self._run_job(w, kind, job, self.now)
            return
        q.append((kind, job, self.now))  # the worker is busy with an earlier job: wait for it
        self._jobs_queued += 1
        if kind == JOB_DECIDE:
            self._queued += 1
        if len(q) == 1:  # the first in line: wake the worker when it is free (one pending wake-up each)
            self._push(self._free_at[w], WORKER, None, w)

    def _on_worker(self, w: int) -> None:
        """Worker ``w`` finished a job: it takes the next one in its queue."""
        q = self._queues[w]
        kind, job, came = q.popleft()
        self._jobs_queued -= 1
        if kind == JOB_DECIDE:
            self._queued -= 1
        self._run_job(w, kind, job, came)
        if q:
            self._push(self._free_at[w], WORKER, None, w)

    def _run_job(self, w: int, kind: int, job: object, came: float) -> None:
        """Worker ``w`` runs ``job`` (given it at ``came``) now; it is busy until its service time has passed."""
        if kind == JOB_DECIDE:
            self._decide(job)  # type: ignore[arg-type]
            return
        t0 = time.perf_counter()
        if kind == JOB_OUTCOME:
            req, node, ok = cast(tuple[Request, int, bool], job)
            self.strategy.on_complete(req, node, ok)
            us = self._charged_us(t0, OUTCOME_SHARE)
            self.metrics.outcome_us.append(us)
        else:
            self.strategy.sync(w)
            us = self._charged_us(t0, SYNC_SHARE)
        self._free_at[w] = self.now + us / 1e6
        if self.jobs_log is not None:
            self.jobs_log.append((w, kind, came, self.now, us))

    def _outcome(self, req: Request, node: int, ok: bool, at_client: float) -> None:
        """``req``'s response ended (or it failed) and the client knows at ``at_client``: its outcome report
        reaches the router ``CLIENT_TO_ROUTER_S`` later, not when the endpoint finished (half an RTT before)."""
        if not self.n_workers and not self.strategy.hears_outcomes:
            return  # nothing to tell and no worker to occupy: no event (the peers' event counts are unchanged)
        self._reports_due += 1
        self._push(at_client + CLIENT_TO_ROUTER_S, REPORT, (req, node, ok))

    def _release(self, node: int, at_client: float) -> None:
        """The router learns at ``at_client`` + ``CLIENT_TO_ROUTER_S`` that a copy on ``node`` ended: its
        outstanding count for ``node`` drops then (when an outcome report sent at ``at_client`` arrives),
        not when the endpoint finished. Where nothing reads the counts it drops now, without an event."""
        if not self._counts_read:
            self.view.outstanding[node] -= 1  # unread: an event would only change the run's event count
            return
        self._releases_due += 1
        self._push(at_client + CLIENT_TO_ROUTER_S, RELEASE, None, node)

    def _on_report(self, report: tuple[Request, int, bool]) -> None:
        """An outcome report reached the router: the strategy hears of it, through its worker if it has one."""
        self._reports_due -= 1
        req, node, ok = report
        if self.n_workers and req.worker >= 0:
            self._submit(req.worker, JOB_OUTCOME, report)
        else:
            self.strategy.on_complete(req, node, ok)

    def _decide(self, req: Request) -> None:
        """The strategy decides ``req`` now; with workers, the decision occupies ``req.worker`` while it runs."""
        req.decided_at = self.now
        # The simulator's own narrowing (NAME+guard's rule filter) is not charged: see Strategy.narrow.
        cands = self.strategy.narrow(req, self.view.candidates(req, self.cfg.family))
        t0 = time.perf_counter()
        node = self.strategy.choose(req, cands)
        req.decision_us = self._charged_us(t0)
        self.metrics.decision_us.append(req.decision_us)
        if self.n_workers:
            self._free_at[req.worker] = self.now + req.decision_us / 1e6
            self.metrics.decision_wait_ms.append((self.now - req.arrival) * 1000.0)
            if self.jobs_log is not None:
                self.jobs_log.append((req.worker, JOB_DECIDE, req.arrival, self.now, req.decision_us))
        if node < 0:
            req.state = DROPPED
            self.metrics.dropped[req.drop_reason or "no route"] += 1
            return
        self._inflight += 1
        req.state = ROUTED
        self._check_guardrails(req, node)
        self._send(req, node, self.now + req.decision_us / 1e6)
        hf = self.strategy.hedge_fraction
        if hf > 0.0:
            self._push(self.now + hf * req.ttft_target_ms / 1000.0, HEDGE, req)

    def _charged_us(self, t0: float, share: float = 1.0) -> float:
        """Wall time since ``perf_counter()`` was ``t0``, or ``share`` of a reproducible run's fixed decision time."""
        return (time.perf_counter() - t0) * 1e6 if self._fixed_us < 0 else self._fixed_us * share

    def _check_guardrails(self, req: Request, node: int) -> None:
        """Count a routed copy that breaks a hard rule: residency, data class, another tenant's device.

        This is the simulator's own audit (:mod:`sim.rules`), written independently of the policy
        bundle, with the same intent as the default bundle's rules.
        """
        if breaks_rules(self.world, req, node):
            req.violations += 1
            self.metrics.violations += 1

    def _send(self, req: Request, node: int, t_leave: float) -> None:
        c = Copy(req, node)
        c.kv_need = req.in_tokens + req.out_tokens
        req.copies.append(c)
        w = self.world
        r = req.region
        travel = w.rtt_ms[r, node] / 2000.0 + req.in_tokens * w.bytes_per_token / w.bandwidth_Bps[r, node]
        self.view.outstanding[node] += 1
        self.strategy.on_dispatch(req, node)
        self._push(t_leave + travel, REACH, c)

    def _on_reach(self, c: Copy) -> None:
        cancelled = c.state == C_CANCELLED
        if cancelled and self.now >= c.cancel_at:
            return
        i = c.node
        nd = self.nodes[i]
        self.tele.dirty.add(i)
        if nd.never_fits(c):
            if cancelled:  # a refusal the router no longer waits for: it has cancelled the copy
                c.cancel_at = self.now
            else:
                self._refuse(c, KV_TOO_BIG)
        elif not nd.waiting and nd.fits(c):
            self._admit(nd, c)
        else:
            nd.enqueue(c)
            if cancelled:
                c.state = C_CANCELLED  # queued all the same: the endpoint does not know yet

    def _refuse(self, c: Copy, reason: str) -> None:
        """The endpoint cannot serve copy ``c``: drop it; the request fails if no other copy is alive."""
        c.state = C_CANCELLED
        req = c.req
        # The endpoint refused it on arrival: the error travels back to the client as a response would.
        at_client = self.now + self.world.rtt_ms[req.region, c.node] / 2000.0
        self._release(c.node, at_client)
        if any(o.state not in (C_DONE, C_CANCELLED) for o in req.copies):
            return  # a hedge copy elsewhere may still serve it
        req.state = DROPPED
        req.drop_reason = reason
        self._inflight -= 1
        self.metrics.dropped[reason] += 1
        self._outcome(req, c.node, False, at_client)
        req.copies = []  # no cycle left for the collector (as in _complete)

    def _admit(self, nd: Node, c: Copy) -> None:
        req = c.req
        lost = c.state == C_CANCELLED  # a hedge loser its cancel has not reached yet: it prefills in vain
        cached = nd.cached_prefix(req.hashes) if req.hashes else 0
        cached = min(cached, req.in_tokens - 1)
        req.cached_tokens = max(req.cached_tokens, cached)
        t_first = nd.admit(c, self.now, req.in_tokens - cached)
        if lost:
            c.state = C_CANCELLED
            self._losers[c] = None
        self._push(t_first, FIRST, c)

    def _admit_waiting(self, i: int, nd: Node) -> None:
        w = nd.waiting
        while w:
            c = w[0]
            if c.state == C_CANCELLED and self.now >= c.cancel_at:
                w.popleft()
                continue
            if not nd.fits(c):
                break
            w.popleft()
            self._admit(nd, c)

    def _on_first(self, c: Copy) -> None:
        i = c.node
        nd = self.nodes[i]
        self.tele.dirty.add(i)
        req = c.req
        if c.state == C_CANCELLED:  # lost a hedge race while prefilling: the prefill was wasted
            nd.advance(self.now)  # its GPU time is charged as it runs: complete only now
            self._losers.pop(c, None)
            self._lost(c)
            nd.release(c)
            self._admit_waiting(i, nd)
            return
        if req.hashes:
            nd.remember_prefix(req.hashes)
        req.first_token_at = self.now + self.world.rtt_ms[req.region, i] / 2000.0
        req.state = FIRST_TOKEN
        # TTFT counts here, not at completion: a request still decoding when the run stops was served.
        self.metrics.record_first(req)
        req.winner = i
        if len(req.copies) > 1:
            self._cancel_others(req, c)
        nd.start_decode(c, self.now, req.out_tokens)
        self._reschedule(i, nd)

    def _cancel_others(self, req: Request, keep: Copy) -> None:
        if keep is not req.copies[0]:
            self.metrics.hedge_wins += 1
        for o in req.copies:
            if o is keep or o.state in (C_DONE, C_CANCELLED):
                continue
            prev = o.state
            o.state = C_CANCELLED
            # The router cancels the loser when it sees the winner's first token (at the client's edge).
            self._release(o.node, req.first_token_at)
            # A prefilling copy runs to its end (its GPU time counted and billed then, in _on_first).
            if prev == C_PREFILL:
                self._losers[o] = None
            elif prev in (C_TRAVEL, C_WAITING):
                # The cancel reaches the endpoint half an RTT later: until then the copy travels on,
                # waits, and may be admitted (then its prefill is wasted GPU time).
                o.cancel_at = req.first_token_at + self.world.rtt_ms[req.region, o.node] / 2000.0
                self._cancels_due += 1
                self._push(o.cancel_at, CANCEL, o)
            else:
                raise AssertionError(f"cancelling a copy in state {prev}")

    def _on_cancel(self, c: Copy) -> None:
        """A losing hedge copy's cancel reached its endpoint: a copy still queued there leaves the
        queue now (those behind it may fit); one admitted meanwhile prefills to its end."""
        self._cancels_due -= 1
        nd = self.nodes[c.node]
        if nd.waiting and nd.waiting[0] is c:
            self._admit_waiting(c.node, nd)

    def _lost(self, c: Copy) -> None:
        """A losing copy's prefill ended (or the run did): count its GPU time as cancelled, and bill
        its request what it ran since the request was billed (at its completion), if it completed."""
        self.metrics.cancelled_gpu_s += c.gpu_s
        req = c.req
        extra = c.gpu_s - c.billed_s
        if req.state == DONE and extra > 0.0:
            usd = extra * float(self.world.usd_per_s[c.node])
            req.cost_usd += usd
            self.metrics.cost_usd += usd
            c.billed_s = c.gpu_s

    def _on_node(self, i: int, version: int) -> None:
        nd = self.nodes[i]
        if version != nd.version:
            return
        now = self.now
        nd.advance(now)
        self.tele.dirty.add(i)
        for c in nd.pop_finished():
            nd.stop_decode(c)
            nd.release(c)
            c.state = C_DONE
            self._complete(c, now + self.world.rtt_ms[c.req.region, i] / 2000.0)
        self._admit_waiting(i, nd)
        self._reschedule(i, nd)

    def _complete(self, c: Copy, t_client: float) -> None:
        req = c.req
        w = self.world
        req.done_at = t_client
        req.state = DONE
        cost = 0.0
        for o in req.copies:
            cost += o.gpu_s * w.usd_per_s[o.node]
            o.billed_s = o.gpu_s  # a loser still prefilling bills the rest when it ends (_lost)
        egress = w.egress_usd_per_gb[req.region, c.node] * (req.in_tokens + req.out_tokens) * w.bytes_per_token / 1e9
        req.cost_usd = cost + egress
        self._inflight -= 1
        self._release(c.node, t_client)  # before the report: the router sees the response end, then reports
        self.metrics.record_done(req)
        self._outcome(req, c.node, True, t_client)
        # Copy.req points back here: dropping the copies lets reference counting free a finished
        # request at once instead of leaving the cycle to the cyclic collector (~13% of a run's time).
        req.copies = []

    def _on_hedge(self, req: Request) -> None:
        if req.state != ROUTED or len(req.copies) > 1:
            return  # first token already out (or already hedged): nothing to do
        first = req.copies[0].node
        cands = self.strategy.narrow(req, self.view.candidates(req, self.cfg.family))
        t0 = time.perf_counter()
        alt = self.strategy.hedge_target(req, cands, first)
        us = self._charged_us(t0)  # the copy leaves once its target is picked, as the first did
        if alt < 0:
            return
        self.metrics.hedges += 1
        self._check_guardrails(req, alt)
        self._send(req, alt, self.now + us / 1e6)

    def _on_degrade(self, d: Degradation) -> None:
        nd = self.nodes[d.endpoint]
        nd.advance(self.now)
        nd.slow *= d.factor  # on top of any hidden throughput error the endpoint started with
        if d.thermal:
            self.tele.thermal[d.endpoint] = True
        self._reschedule(d.endpoint, nd)


def pick_degradations(world: World, fraction: float, duration: float, seed: int,
                      slow_site_factor: float = 0.4, thermal_factor: float = 0.5,
                      throughput_error: float = 0.0) -> list[Degradation]:
    """``fraction`` of endpoints degrade at a random time in the run's first half.

    Half of the budget is one whole slow site (telemetry shows nothing); the rest are single
    GPUs throttling (telemetry shows a warm, but not alarming, temperature).

    ``throughput_error`` > 0 also makes every endpoint's real throughput differ from the
    inventory's nominal figure from the start, by a hidden factor ``exp(N(0, sigma))``: the
    datasheet numbers the scorer ranks by are then wrong, as they are on a real fleet.
    """
    out = throughput_errors(world.n, throughput_error, seed)
    if fraction <= 0:
        return out
    rng = np.random.default_rng(seed + 11)
    budget = round(fraction * world.n)
    sites = np.unique(world.node_site)
    site_sizes = {int(s): int((world.node_site == s).sum()) for s in sites}
    fitting = [s for s, k in site_sizes.items() if k <= budget // 2]
    taken: set[int] = set()
    if fitting:
        s = int(rng.choice(fitting))
        start = float(rng.uniform(0.0, duration / 2))
        for i in np.flatnonzero(world.node_site == s).tolist():
            out.append(Degradation(i, start, slow_site_factor, False))
            taken.add(i)
    rest = [i for i in range(world.n) if i not in taken]
    for i in rng.choice(rest, size=max(0, budget - len(taken)), replace=False).tolist():
        out.append(Degradation(int(i), float(rng.uniform(0.0, duration / 2)), thermal_factor, True))
    return out


def throughput_errors(n: int, sigma: float, seed: int) -> list[Degradation]:
    """A hidden throughput factor ``exp(N(0, sigma))`` per endpoint, in force from the start.

    Its own random stream, so the degradations picked with it are those picked without it.
    """
    if sigma <= 0.0:
        return []
    factors = np.exp(np.random.default_rng(seed + 13).normal(0.0, sigma, n))
    return [Degradation(i, 0.0, float(f), False) for i, f in enumerate(factors.tolist())]
