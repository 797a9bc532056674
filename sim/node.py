"""One endpoint's service model: continuous batching with exact processor sharing of decode.

- Admission: a request takes a batch slot when fewer than ``max_concurrency`` run and its prompt
  plus completion fit in the free KV cache; otherwise it waits (FIFO). Slots and KV free on
  completion or cancellation. A request larger than the whole KV cache is refused on arrival
  (the engine drops it), never queued.
- Prefill (time to first token): compute-bound, done one request at a time at the node's full
  prefill rate, slowed by the decode batch sharing the GPU; prefix-cache hits skip cached tokens.
- Decode: every running sequence advances at the same per-sequence rate ``r(b)``, which falls as
  the batch ``b`` grows. We keep a virtual clock ``V`` (tokens decoded per sequence so far) and
  a heap of each sequence's finishing ``V``, so only the earliest completion is ever scheduled;
  when ``b`` changes the node's completion event is re-issued (stale ones carry an old version).
- Accounting of GPU time: the GPU is busy while it prefills or decodes, and each busy second is
  charged once. A prefill admitted beside ``b`` decoding sequences runs ``1 + 0.5 b / max_concurrency``
  times slower than alone (above): it has ``frac = 1 / (1 + 0.5 b / max_concurrency)`` of the GPU, so
  while a batch decodes beside it the prefill is charged ``frac dt`` and the batch ``(1 - frac) dt``
  (a prefill overlapped throughout costs what it would alone); a prefill alone is charged all of
  ``dt``, a batch alone all of it. ``S`` integrates the batch's part over ``b`` so a sequence's share
  is ``S_end - S_start``; ``busy_s`` is the time with either, the utilisation's numerator.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque

from sim.model import C_DECODE, C_PREFILL, C_WAITING, Copy
from sim.service import ServiceParams

BLOCK_TOKENS = 512  # prefix-cache block size (the Mooncake trace's hash_ids granularity)
PREFILL_DECODE_INTERFERENCE = 0.5  # prefill slows by up to 50% when the batch is full


class Node:
    """Mutable state of one endpoint. Times are simulated seconds."""

    __slots__ = (
        "S",
        "V",
        "bh",
        "busy_s",
        "cache",
        "cache_blocks",
        "d1",
        "dec_b",
        "fin",
        "kv_used",
        "last_t",
        "p",
        "pq",
        "prefill_free_at",
        "prefill_s",
        "running",
        "seq",
        "slow",
        "version",
        "waiting",
        "warm",
    )

    def __init__(self, p: ServiceParams) -> None:
        self.p = p
        self.d1 = p.decode_tps1  # r(b) = d1 / (1 + (b - 1) / bh), inlined on the hot path
        self.bh = p.batch_half
        self.running = 0  # admitted: prefilling or decoding
        self.waiting: deque[Copy] = deque()
        self.kv_used = 0
        self.prefill_free_at = 0.0
        self.dec_b = 0
        self.V = 0.0
        self.S = 0.0
        self.last_t = 0.0
        self.fin: list[tuple[float, int, Copy]] = []
        self.seq = 0
        self.version = 0
        self.busy_s = 0.0  # time the GPU prefilled or decoded (each second once)
        self.prefill_s = 0.0  # time a prefill ran (alone or beside a batch)
        # Admitted prefills not yet accounted to their end, in order (they run one after another):
        # (start, end, the GPU share it has beside a decoding batch, the copy).
        self.pq: deque[tuple[float, float, float, Copy]] = deque()
        self.slow = 1.0  # hidden degradation: throughput multiplier (1 = healthy)
        self.warm = p.warm
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.cache_blocks = max(16, p.kv_capacity_tokens // (2 * BLOCK_TOKENS))

    def advance(self, now: float) -> None:
        """Move the processor-sharing clocks to ``now`` and charge the GPU time since the last call.

        The batch size is constant in between (it changes only at events, which advance first);
        prefills start and end anywhere in between, so the interval is cut at their bounds.
        """
        t = self.last_t
        if now <= t:
            return
        b = self.dec_b
        pq = self.pq
        if b:
            self.V += self.d1 / (1.0 + (b - 1) / self.bh) * self.slow * (now - t)
        if not pq:  # the common case: no prefill in the interval
            if b:
                self.S += (now - t) / b
                self.busy_s += now - t
            self.last_t = now
            return
        while t < now:
            if pq and pq[0][0] <= t:  # a prefill runs from t
                _, end, frac, c = pq[0]
                stop = end if end < now else now
                dt = stop - t
                if b:
                    c.gpu_s += frac * dt
                    self.S += (1.0 - frac) * dt / b
                else:
                    c.gpu_s += dt
                self.busy_s += dt
                self.prefill_s += dt
                if end <= now:
                    pq.popleft()
            else:  # no prefill until the next one starts
                stop = pq[0][0] if pq and pq[0][0] < now else now
                if b:
                    self.S += (stop - t) / b
                    self.busy_s += stop - t
            t = stop
        self.last_t = now

    def fits(self, c: Copy) -> bool:
        """Whether ``c`` can be admitted now (a free slot and room in the KV cache)."""
        return self.running < self.p.max_concurrency and self.kv_used + c.kv_need <= self.p.kv_capacity_tokens

    def never_fits(self, c: Copy) -> bool:
        """Whether ``c`` needs more KV cache than this endpoint has even when idle.

        Such a copy must not wait: at the head of the FIFO it would block every copy behind it forever.
        """
        return c.kv_need > self.p.kv_capacity_tokens

    def cached_prefix(self, hashes: tuple[int, ...]) -> int:
        """Tokens of the prompt's leading blocks already in this node's prefix cache (LRU)."""
        n = 0
        cache = self.cache
        for h in hashes:
            if h not in cache:
                break
            cache.move_to_end(h)
            n += 1
        return n * BLOCK_TOKENS

    def remember_prefix(self, hashes: tuple[int, ...]) -> None:
        cache = self.cache
        for h in hashes:
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > self.cache_blocks:
            cache.popitem(last=False)

    def admit(self, c: Copy, now: float, in_tokens: int) -> float:
        """Take a slot and schedule prefill; returns the first-token time on the node."""
        self.running += 1
        self.kv_used += c.kv_need
        p = self.p
        start = now if now > self.prefill_free_at else self.prefill_free_at
        slowdown = 1.0 + PREFILL_DECODE_INTERFERENCE * self.dec_b / p.max_concurrency
        dur = in_tokens / (p.prefill_tps * self.slow) * slowdown
        if not self.warm:
            dur += p.cold_start_s
            self.warm = True
        self.prefill_free_at = start + dur
        # Charged as it runs (advance): its share of the GPU beside a batch is what slows it.
        self.pq.append((start, start + dur, 1.0 / slowdown, c))
        c.state = C_PREFILL
        c.prefill_end = start + dur
        return start + dur

    def start_decode(self, c: Copy, now: float, out_tokens: int) -> None:
        self.advance(now)
        c.state = C_DECODE
        c.share_start = self.S
        c.vfinish = self.V + out_tokens
        self.seq += 1
        heapq.heappush(self.fin, (c.vfinish, self.seq, c))
        self.dec_b += 1

    def release(self, c: Copy) -> None:
        """Free the slot and KV-cache reservation of a copy that finished or was cancelled."""
        self.running -= 1
        self.kv_used -= c.kv_need

    def stop_decode(self, c: Copy) -> None:
        """Account a decoding copy's share (``advance`` must have run) and leave the batch."""
        c.gpu_s += self.S - c.share_start
        self.dec_b -= 1

    def next_completion(self, now: float) -> float:
        """Simulated time of the earliest decode completion, or -1 when nothing decodes."""
        fin = self.fin
        while fin and fin[0][2].state != C_DECODE:
            heapq.heappop(fin)  # cancelled copies leave lazily
        if not fin or not self.dec_b:
            return -1.0
        rate = self.d1 / (1.0 + (self.dec_b - 1) / self.bh) * self.slow
        return now + max(0.0, fin[0][0] - self.V) / rate

    def pop_finished(self) -> list[Copy]:
        out: list[Copy] = []
        fin = self.fin
        limit = self.V + 1e-6
        while fin and fin[0][0] <= limit:
            c = heapq.heappop(fin)[2]
            if c.state == C_DECODE:
                out.append(c)
        return out

    def occupancy(self) -> float:
        return self.running / self.p.max_concurrency

    def enqueue(self, c: Copy) -> None:
        c.state = C_WAITING
        self.waiting.append(c)
