"""What a router knows of each endpoint from its own traffic, ahead of any telemetry.

Scraped telemetry is seconds old; the requests this router has just sent are not in it yet, so a
burst would herd onto whatever looked idle at the last scrape. :class:`EndpointLedger` keeps,
per endpoint:

- **in flight**: requests routed and without an outcome yet (a lower bound on the load);
- **prefill backlog**: when the prompts it sent will have been prefilled. An endpoint prefills one
  prompt after another, so a burst of long prompts queues there long before a batch slot is
  short; the estimate drains by itself as the clock passes it;
- **arrival rate**: how many requests a second it has been sending there lately (an exponentially
  decayed count, time constant ``rate_window_s``), which says how many later requests a prompt
  added to the endpoint's prefill will hold up;
- **slowness**: how much slower than estimated the endpoint has turned out to be, from the
  outcomes' TTFT (a log-domain moving average of observed over expected, clipped). It catches
  what telemetry shows only partly or not at all (a throttling GPU, a slow site) and scales the
  endpoint's service times in the score stage.

The engine calls :meth:`sent`, :meth:`done` and :meth:`observed` under its own lock; the score
stage reads :meth:`state_of` on the request path without one (a stale read costs one slightly
worse estimate, never a crash) and its kernel does the arithmetic; :meth:`columns` is the same
arithmetic in numpy, for reading the ledger outside the request path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import repeat

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]
_INFLIGHT, _DUE, _LOG_SLOW, _RATE, _RATE_AT = range(5)  # rows of EndpointLedger's state
_WIDTH = 5


class EndpointLedger:
    """Per-endpoint in-flight counts, prefill backlog and outcome-calibrated slowness.

    Parameters
    ----------
    alpha : float
        Weight of one outcome in the slowness average (log domain).
    min_slowness, max_slowness : float
        Bounds of the slowness factor (1: as estimated).
    rate_window_s : float
        Time constant of the arrival-rate average.
    routers : float
        How many routers split the traffic to these endpoints at random (``serve --workers N``, and
        replicas), each keeping a ledger of its own: one request this router sends stands for
        ``routers`` sent by all of them (in flight, prefill backlog, arrival rate), an unbiased
        estimate of the endpoint's whole load where counting its own would undercount it ``routers``
        times.

    Examples
    --------
    >>> led = EndpointLedger(alpha=0.5)
    >>> led.sent("a", now=10.0, prefill_s=0.2); led.sent("a", now=10.0, prefill_s=0.3)
    >>> inflight, backlog, slow, rate = led.columns(["a", "b"], now=10.1)
    >>> inflight.tolist(), backlog.round(1).tolist(), slow.tolist(), rate.round(2).tolist()
    ([2.0, 0.0], [400.0, 0.0], [1.0, 1.0], [0.39, 0.0])
    >>> led.done("a"); led.observed("a", expected_ms=100.0, observed_ms=400.0, slowness=1.0)
    >>> led.inflight("a"), round(led.slowness("a"), 2)
    (1, 2.0)
    >>> one_of_four = EndpointLedger(routers=4)
    >>> one_of_four.sent("a", now=10.0, prefill_s=0.2)
    >>> inflight, backlog, _, _ = one_of_four.columns(["a"], now=10.0)
    >>> inflight.tolist(), backlog.round(1).tolist()
    ([4.0], [800.0])
    """

    def __init__(self, *, alpha: float = 0.05, min_slowness: float = 0.5, max_slowness: float = 4.0,
                 rate_window_s: float = 5.0, routers: float = 1.0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if rate_window_s <= 0.0:
            raise ValueError("rate_window_s must be > 0")
        if not 1.0 <= routers <= 4096.0:
            raise ValueError("routers must be in [1, 4096]")
        self.alpha = alpha
        self.rate_window_s = rate_window_s
        self.routers = float(routers)
        self._log_lo, self._log_hi = math.log(min_slowness), math.log(max_slowness)
        # One column of numbers per endpoint (rows _INFLIGHT.._RATE_AT), so that the request path
        # reads a candidate set's columns with one lookup and one fancy index. Column 0 stands for
        # an endpoint never sent to: nothing in flight, no backlog, slowness 1, no arrivals.
        self._row: dict[str, int] = {}
        self._state = np.zeros((_WIDTH, 64), dtype=np.float64)
        self._state[_DUE, 0] = -math.inf

    def _row_of(self, endpoint_id: str) -> int:
        row = self._row.get(endpoint_id)
        if row is None:
            row = len(self._row) + 1
            size = self._state.shape[1]
            if row >= size:  # grow before the row is published: readers take no lock
                grown = np.zeros((_WIDTH, 2 * size), dtype=np.float64)
                grown[:, :size] = self._state
                self._state = grown
            self._state[_DUE, row] = -math.inf
            self._row[endpoint_id] = row
        return row

    def sent(self, endpoint_id: str, now: float, prefill_s: float) -> None:
        """A request went to ``endpoint_id``; its prompt takes ``prefill_s`` there once it is its turn."""
        row = self._row_of(endpoint_id)
        st = self._state
        share = self.routers  # this request and the ones the other routers are sending meanwhile
        st[_INFLIGHT, row] += share
        decay = math.exp(-max(now - st[_RATE_AT, row], 0.0) / self.rate_window_s)
        st[_RATE, row] = st[_RATE, row] * decay + share / self.rate_window_s
        st[_RATE_AT, row] = now
        st[_DUE, row] = max(st[_DUE, row], now) + share * prefill_s

    def done(self, endpoint_id: str) -> None:
        """A request at ``endpoint_id`` ended (its outcome came, or it timed out)."""
        row = self._row.get(endpoint_id)
        if row is not None:
            self._state[_INFLIGHT, row] = max(self._state[_INFLIGHT, row] - self.routers, 0.0)

    def observed(self, endpoint_id: str, *, expected_ms: float, observed_ms: float, slowness: float) -> None:
        """An outcome: the endpoint's part of the TTFT (no network) was ``observed_ms`` where the
        score stage, already scaled by ``slowness``, expected ``expected_ms``."""
        if not (expected_ms > 0.0 and observed_ms >= 0.0 and slowness > 0.0):
            return
        sample = math.log(slowness * max(observed_ms, 1.0) / max(expected_ms, 1.0))
        row = self._row_of(endpoint_id)
        old = self._state[_LOG_SLOW, row]
        self._state[_LOG_SLOW, row] = min(max(old + self.alpha * (sample - old), self._log_lo), self._log_hi)

    def inflight(self, endpoint_id: str) -> int:
        return int(self._state[_INFLIGHT, self._row.get(endpoint_id, 0)])

    def slowness(self, endpoint_id: str) -> float:
        return math.exp(float(self._state[_LOG_SLOW, self._row.get(endpoint_id, 0)]))

    def state_of(self, endpoint_ids: Sequence[str]) -> FloatArray:
        """The raw state of ``endpoint_ids``: 5 rows (in flight, prefill due, log slowness, arrival
        rate, when it was last updated) x one column per endpoint, C-contiguous; what the score
        stage's kernel (``decision._kernels.estimate``) reads."""
        rows = np.fromiter(map(self._row.get, endpoint_ids, repeat(0)), dtype=np.intp, count=len(endpoint_ids))
        return np.take(self._state, rows, axis=1)  # one reference to the state: a concurrent growth leaves it whole

    def columns(self, endpoint_ids: Sequence[str], now: float
                ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """In-flight counts, prefill backlog (ms), slowness and arrival rate (per s) of ``endpoint_ids``
        at ``now`` (the kernel computes the same from :meth:`state_of`)."""
        st = self.state_of(endpoint_ids)
        backlog = np.maximum(st[_DUE] - now, 0.0) * 1000.0
        rate = st[_RATE] * np.exp(np.minimum(st[_RATE_AT] - now, 0.0) / self.rate_window_s)
        return st[_INFLIGHT], backlog, np.exp(st[_LOG_SLOW]), rate
