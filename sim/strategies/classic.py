"""The founding whitepaper's seven strategies, re-implemented from their published definitions.

Source: redbco/infermesh, ``crates/mesh-sim/src/router.rs`` and ``docs/SIMULATOR.md``. The
scores below keep upstream's weights and terms (lower is better), mapped onto what our router
can see: ``work_left`` = running + waiting requests, ``vram_pressure`` = KV-cache usage,
``utilization`` = GPU utilisation, all from (stale) telemetry; ``network_penalty`` applies when
the endpoint is outside the client's region (upstream: "another cell"). Two upstream bugs are
not reproduced: ``baseline_rr`` is a true round robin (upstream iterates a hash map, so its order
is arbitrary), and ``mesh_hedge`` really hedges and cancels (upstream only records a hedge).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from sim.model import Request
from sim.strategies.base import Strategy
from sim.world import I64


class BaselineRoundRobin(Strategy):
    """Strict rotation over the endpoints serving the request's model."""

    name = "baseline_rr"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, req: Request, cands: I64) -> int:
        i = self._next % len(cands)
        self._next += 1
        return int(cands[i])


class _Scored(Strategy):
    """Pick the endpoint with the lowest score (random tie-break)."""

    def scores(self, req: Request, cands: I64) -> np.ndarray:
        raise NotImplementedError

    def choose(self, req: Request, cands: I64) -> int:
        s = self.scores(req, cands) + self.view.jitter(len(cands))
        return int(cands[int(np.argmin(s))])

    def _common(self, cands: I64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = self.view.tele
        return t.obs_running[cands] + t.obs_waiting[cands], t.obs_kv[cands], t.obs_util[cands]

    def _remote(self, req: Request, cands: I64) -> np.ndarray:
        return np.asarray(self.view.world.node_region[cands] != req.region, dtype=np.float64)


class Heuristic(_Scored):
    """``alpha * work_left + beta * vram_pressure + gamma * utilization``."""

    name = "heuristic"

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, gamma: float = 0.3) -> None:
        self.alpha, self.beta, self.gamma = alpha, beta, gamma

    def scores(self, req: Request, cands: I64) -> np.ndarray:
        work, vram, util = self._common(cands)
        return np.asarray(self.alpha * work + self.beta * vram + self.gamma * util)


class Mesh(_Scored):
    """``0.4 work + 0.3 vram + 0.2 util + 0.1 * 10 * remote``."""

    name = "mesh"

    def scores(self, req: Request, cands: I64) -> np.ndarray:
        work, vram, util = self._common(cands)
        return 0.4 * work + 0.3 * vram + 0.2 * util + 1.0 * self._remote(req, cands)


class MeshHedge(Mesh):
    """``mesh``, plus a second copy after 35% of the TTFT target if no first token; the loser is cancelled."""

    name = "mesh_hedge"
    hedge_fraction = 0.35


class AdaptiveMesh(_Scored):
    """Upstream's load-aware weights: performance vs balance flips at a mean utilisation threshold."""

    name = "adaptive_mesh"

    def __init__(self, load_threshold: float = 0.7) -> None:
        self.load_threshold = load_threshold

    def scores(self, req: Request, cands: I64) -> np.ndarray:
        work, vram, util = self._common(cands)
        system = float(util.mean()) if len(util) else 0.0
        perf_w, bal_w = (0.8, 0.2) if system > self.load_threshold else (0.4, 0.6)
        perf = 0.4 * work + 0.3 * vram + 0.3 * util
        return perf_w * perf + bal_w * util + 0.5 * self._remote(req, cands)


class PredictiveMesh(_Scored):
    """Adds the router's own dispatches in the last window as predicted load; penalises hot GPUs."""

    name = "predictive_mesh"

    def __init__(self, window_s: float = 1.0, congestion_threshold: float = 0.8) -> None:
        self.window_s = window_s
        self.congestion_threshold = congestion_threshold
        self._recent: deque[tuple[float, int]] = deque()
        self._counts: np.ndarray | None = None

    def scores(self, req: Request, cands: I64) -> np.ndarray:
        if self._counts is None:
            self._counts = np.zeros(self.view.world.n)
        cutoff = self.view.now - self.window_s
        recent, counts = self._recent, self._counts
        while recent and recent[0][0] <= cutoff:
            counts[recent.popleft()[1]] -= 1
        work, vram, util = self._common(cands)
        congestion = 100.0 * np.maximum(0.0, util - self.congestion_threshold)
        return np.asarray(0.4 * (work + counts[cands]) + 0.3 * vram + 0.2 * util
                          + 0.15 * self._remote(req, cands) + 0.05 * congestion)

    def on_dispatch(self, req: Request, node: int) -> None:
        if self._counts is None:
            self._counts = np.zeros(self.view.world.n)
        self._recent.append((self.view.now, node))
        self._counts[node] += 1


class HybridMesh(_Scored):
    """Upstream's multi-objective score: latency, balance (variance change), cost and throughput.

    Upstream's weight "adaptation" is kept as published: every 10 decisions the latency weight
    grows by 0.01 (to 0.8) and balance shrinks by 1%, then the weights are renormalised.
    """

    name = "hybrid_mesh"

    def __init__(self) -> None:
        self.w = {"latency": 0.4, "balance": 0.3, "cost": 0.2, "throughput": 0.1}
        self._n = 0

    def scores(self, req: Request, cands: I64) -> np.ndarray:
        w = self.view.world
        work, _, util = self._common(cands)
        tps = w.decode_capacity[cands]
        latency = work / (tps / 1000.0) / 500.0
        n = len(cands)
        mean = float(util.mean()) if n else 0.0
        d = 0.1  # upstream simulates adding 0.1 utilisation to the endpoint
        dvar = (2 * d * (util - mean) + d * d) / max(n, 1) - d * d / max(n, 1) ** 2
        var = float(util.var()) if n else 0.0
        balance = (var + dvar) / 0.1
        cost = (1.0 / (tps / np.maximum(w.memory_gb[cands], 1e-9))) / 0.001
        throughput = 1000.0 / np.maximum((1.0 - util) * tps, 1.0)
        return (self.w["latency"] * latency + self.w["balance"] * balance + self.w["cost"] * cost
                + self.w["throughput"] * throughput + 0.1 * self._remote(req, cands))

    def on_dispatch(self, req: Request, node: int) -> None:
        self._n += 1
        if self._n % 10 == 0:
            self.w["latency"] = min(0.8, self.w["latency"] + 0.01)
            self.w["balance"] = max(0.1, self.w["balance"] * 0.99)
            total = sum(self.w.values())
            self.w = {k: v / total for k, v in self.w.items()}
