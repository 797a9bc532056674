"""Telemetry as the router sees it: sampled every period, delivered late, partly blind.

Every ``period_s`` the scraper reads each endpoint's state (running and waiting requests, KV-cache
usage, GPU utilisation over the period, temperature, power); the snapshot reaches the router
``delay_s`` later. Strategies read the ``obs_*`` arrays (stale by construction); the ``infermesh``
strategy also gets every delivery in a real :class:`decision.telemetry.TelemetryStore` stamped
with the sampling time, so the service computes the same ages it would in production.

Hidden degradations are only partly visible: a throttling GPU reports a warm temperature
that stays under the usual 85 C limit, and a slow site reports nothing at all (only its queues
grow, one period late).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from decision.telemetry import (
    GPU_TEMP_C,
    GPU_UTIL,
    KV_CACHE_USAGE,
    POWER_W,
    QUEUE_RUNNING,
    QUEUE_WAITING,
    XID_ERRORS,
    TelemetryStore,
)
from sim.node import Node
from sim.service import IDLE_POWER_FRACTION
from sim.world import F64, I64, World


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float
    idx: I64
    running: F64
    waiting: F64
    kv: F64
    util: F64
    temp: F64
    power: F64


class TelemetryView:
    """Observed (stale) per-endpoint state, plus the scraper that produces it."""

    def __init__(self, world: World, *, full_scrape_limit: int = 8192, refresh_periods: int = 10) -> None:
        n = world.n
        self.world = world
        self.obs_running = np.zeros(n)
        self.obs_waiting = np.zeros(n)
        self.obs_kv = np.zeros(n)
        self.obs_util = np.zeros(n)
        self.obs_temp = np.full(n, 40.0)
        self.sampled_at = np.full(n, -1.0)
        self.obs_taken_at = np.full(n, -np.inf)  # sampling time of the obs_* values delivered so far
        self.thermal = np.zeros(n, dtype=bool)  # set by the engine when throttling starts
        self._kv_cap = np.array([p.kv_capacity_tokens for p in world.params], dtype=np.float64)
        self._last_t = 0.0
        self._full = n <= full_scrape_limit
        self._cursor = 0
        self._slice = max(1, n // refresh_periods)
        self.dirty: set[int] = set()
        self.store: TelemetryStore | None = None
        self._store_full_at = -1e9
        self.samples = 0  # endpoint samples taken (one per endpoint per scrape)
        self._sent: dict[int, tuple[float, float, float]] = {}
        self._eids = [e.endpoint_id for e in world.endpoints]
        self._nids = [e.node_id for e in world.endpoints]
        self._watts = np.array([p.watts for p in world.params])

    def scrape(self, nodes: Sequence[Node], now: float) -> Snapshot:
        """Read the endpoints due this period: all of them for small fleets, else changed ones plus a slice."""
        if self._full:
            idx = np.arange(len(nodes), dtype=np.int64)
        else:
            end = self._cursor + self._slice
            rot = set(range(self._cursor, min(end, len(nodes))))
            self._cursor = 0 if end >= len(nodes) else end
            idx = np.array(sorted(self.dirty | rot), dtype=np.int64)
        dirty, self.dirty = self.dirty, set()
        self.samples += len(idx)
        sel = [nodes[i] for i in idx.tolist()] if not self._full else nodes
        running = np.array([nd.running for nd in sel], dtype=np.float64)
        waiting = np.array([len(nd.waiting) for nd in sel], dtype=np.float64)
        kv = np.array([nd.kv_used for nd in sel], dtype=np.float64) / self._kv_cap[idx]
        # DCGM's GPU_UTIL is the fraction of time a kernel ran: an endpoint that had work during the
        # period reads busy (1), an untouched idle one reads exactly 0.
        touched = np.zeros(len(idx), dtype=bool)
        if self._full and dirty:
            touched[np.fromiter(dirty, dtype=np.int64)] = True
        util = np.maximum((running > 0).astype(np.float64), touched)
        self.sampled_at[idx] = now
        temp = 40.0 + 40.0 * util
        temp = np.where(self.thermal[idx], np.maximum(temp, 82.0), temp)
        power = self._watts[idx] * (IDLE_POWER_FRACTION + (1 - IDLE_POWER_FRACTION) * util)
        return Snapshot(now, idx, running, waiting, kv, util * 100.0, temp, power)

    def deliver(self, s: Snapshot) -> None:
        """Apply snapshot ``s`` where it is newer than what the router already has.

        With a delay spread larger than the period, snapshots arrive out of order; an older one
        must not overwrite a newer reading (per endpoint: a partial scrape covers only some).
        """
        newer = s.taken_at > self.obs_taken_at[s.idx]
        if not newer.all():
            s = Snapshot(s.taken_at, s.idx[newer], s.running[newer], s.waiting[newer], s.kv[newer],
                         s.util[newer], s.temp[newer], s.power[newer])
        idx = s.idx
        self.obs_taken_at[idx] = s.taken_at
        self.obs_running[idx] = s.running
        self.obs_waiting[idx] = s.waiting
        self.obs_kv[idx] = s.kv
        self.obs_util[idx] = s.util / 100.0
        self.obs_temp[idx] = s.temp
        store = self.store
        if store is None:
            return
        # The service ingests what an exporter sends: changed serving metrics every period, every
        # series at least once a second (so ages stay honest), DCGM GPU metrics once a second.
        eids, nids, ts = self._eids, self._nids, s.taken_at
        full = ts - self._store_full_at >= 1.0
        if full:
            self._store_full_at = ts
        last = self._sent
        for k, i in enumerate(idx.tolist()):
            vals = (float(s.running[k]), float(s.waiting[k]), float(s.kv[k]))
            if full or last.get(i) != vals:
                last[i] = vals
                store.update_endpoint(eids[i], {QUEUE_RUNNING: vals[0], QUEUE_WAITING: vals[1],
                                                KV_CACHE_USAGE: vals[2]}, ts)
            if full:
                store.update_node(nids[i], {GPU_UTIL: float(s.util[k]), GPU_TEMP_C: float(s.temp[k]),
                                            POWER_W: float(s.power[k]), XID_ERRORS: 0.0}, ts)
