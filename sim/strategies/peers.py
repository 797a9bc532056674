"""Strong, widely deployed peers: least outstanding requests, power of two choices, and a
scheduler in the style of the Kubernetes Gateway API inference extension (GIE).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from sim.model import Request
from sim.node import BLOCK_TOKENS
from sim.strategies.base import Strategy
from sim.world import I64


class LeastLoad(Strategy):
    """Fewest outstanding requests per batch slot (Envoy's weighted least-request, exhaustive).

    The router counts its own in-flight requests, so this signal is exact and never stale: a request
    counts until its response's end reaches the router (``Strategy.reads_outstanding``).
    """

    name = "least_load"
    reads_outstanding = True

    def choose(self, req: Request, cands: I64) -> int:
        v = self.view
        s = v.outstanding[cands] / v.world.conc[cands] + v.jitter(len(cands))
        return int(cands[int(np.argmin(s))])


class PowerOfTwo(Strategy):
    """Two endpoints at random; the one with fewer outstanding requests per slot wins."""

    name = "power_of_two"
    reads_outstanding = True

    def choose(self, req: Request, cands: I64) -> int:
        v = self.view
        if len(cands) == 1:
            return int(cands[0])
        a, b = v.rng.choice(len(cands), size=2, replace=False)
        ia, ib = int(cands[a]), int(cands[b])
        la = v.outstanding[ia] / v.world.conc[ia]
        lb = v.outstanding[ib] / v.world.conc[ib]
        return ia if la < lb or (la == lb and v.rng.random() < 0.5) else ib


class GieLike(Strategy):
    """Weighted scorers over scraped metrics, as the inference extension's scheduler does.

    - queue scorer: ``1 - waiting / max waiting`` among the candidates (min-max normalised);
    - KV-cache scorer: ``1 - kv_cache_usage``;
    - prefix scorer: fraction of the prompt's leading 512-token blocks that the router's own
      approximate index says this endpoint has seen (an LRU per endpoint, as GIE's prefix plugin).
    The highest weighted sum wins (weights: queue 2, KV 2, prefix 3; ties random). GIE is not
    told about network distance or price, so neither is this peer.
    """

    name = "gie_like"

    def __init__(self, w_queue: float = 2.0, w_kv: float = 2.0, w_prefix: float = 3.0,
                 index_blocks: int = 4096) -> None:
        self.w_queue, self.w_kv, self.w_prefix = w_queue, w_kv, w_prefix
        self.index_blocks = index_blocks
        self._index: dict[int, OrderedDict[int, None]] = {}
        self._owners: dict[int, set[int]] = {}

    def choose(self, req: Request, cands: I64) -> int:
        t = self.view.tele
        waiting = t.obs_waiting[cands]
        top = float(waiting.max()) if len(waiting) else 0.0
        queue = 1.0 - waiting / top if top > 0 else np.ones(len(cands))
        score = self.w_queue * queue + self.w_kv * (1.0 - t.obs_kv[cands])
        if req.hashes:
            score = score + self.w_prefix * self._prefix_scores(req, cands)
        score = score + self.view.jitter(len(cands))
        return int(cands[int(np.argmax(score))])

    def _prefix_scores(self, req: Request, cands: I64) -> np.ndarray:
        out = np.zeros(len(cands))
        first = req.hashes[0]
        owners = self._owners.get(first)
        if not owners:
            return out
        pos = {int(c): k for k, c in enumerate(cands.tolist())}
        n = len(req.hashes)
        for ep in owners:
            k = pos.get(ep)
            if k is None:
                continue
            idx = self._index[ep]
            m = 0
            for h in req.hashes:
                if h not in idx:
                    break
                m += 1
            out[k] = m / n
        return out

    def on_dispatch(self, req: Request, node: int) -> None:
        if not req.hashes:
            return
        idx = self._index.setdefault(node, OrderedDict())
        for h in req.hashes:
            idx[h] = None
            idx.move_to_end(h)
            self._owners.setdefault(h, set()).add(node)
        while len(idx) > self.index_blocks:
            h, _ = idx.popitem(last=False)
            s = self._owners.get(h)
            if s is not None:
                s.discard(node)


def prefix_blocks(tokens: int) -> int:
    return tokens // BLOCK_TOKENS
