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

The engine calls :meth:`sent` and :meth:`done` under its own lock; :meth:`columns` is read on
the request path without one (a stale read costs one slightly worse estimate, never a crash).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import repeat

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


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
    """

    def __init__(self, *, alpha: float = 0.05, min_slowness: float = 0.5, max_slowness: float = 4.0,
                 rate_window_s: float = 5.0) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        if rate_window_s <= 0.0:
            raise ValueError("rate_window_s must be > 0")
        self.alpha = alpha
        self.rate_window_s = rate_window_s
        self._rate: dict[str, tuple[float, float]] = {}  # (decayed count / window, as of when)
        self._log_lo, self._log_hi = math.log(min_slowness), math.log(max_slowness)
        self._inflight: dict[str, int] = {}
        self._prefill_due: dict[str, float] = {}  # epoch seconds, in the engine's clock
        self._log_slow: dict[str, float] = {}

    def sent(self, endpoint_id: str, now: float, prefill_s: float) -> None:
        """A request went to ``endpoint_id``; its prompt takes ``prefill_s`` there once it is its turn."""
        self._inflight[endpoint_id] = self._inflight.get(endpoint_id, 0) + 1
        rate, at = self._rate.get(endpoint_id, (0.0, now))
        self._rate[endpoint_id] = (self._decayed(rate, at, now) + 1.0 / self.rate_window_s, now)
        due = self._prefill_due.get(endpoint_id, now)
        self._prefill_due[endpoint_id] = (due if due > now else now) + prefill_s

    def done(self, endpoint_id: str) -> None:
        """A request at ``endpoint_id`` ended (its outcome came, or it timed out)."""
        left = self._inflight.get(endpoint_id, 0) - 1
        if left > 0:
            self._inflight[endpoint_id] = left
        else:
            self._inflight.pop(endpoint_id, None)

    def observed(self, endpoint_id: str, *, expected_ms: float, observed_ms: float, slowness: float) -> None:
        """An outcome: the endpoint's part of the TTFT (no network) was ``observed_ms`` where the
        score stage, already scaled by ``slowness``, expected ``expected_ms``."""
        if not (expected_ms > 0.0 and observed_ms >= 0.0 and slowness > 0.0):
            return
        sample = math.log(slowness * max(observed_ms, 1.0) / max(expected_ms, 1.0))
        old = self._log_slow.get(endpoint_id, 0.0)
        new = old + self.alpha * (sample - old)
        self._log_slow[endpoint_id] = min(max(new, self._log_lo), self._log_hi)

    def inflight(self, endpoint_id: str) -> int:
        return self._inflight.get(endpoint_id, 0)

    def slowness(self, endpoint_id: str) -> float:
        return math.exp(self._log_slow.get(endpoint_id, 0.0))

    def _decayed(self, rate: float, at: float, now: float) -> float:
        return rate * math.exp(-max(now - at, 0.0) / self.rate_window_s)

    def columns(self, endpoint_ids: Sequence[str], now: float
                ) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """In-flight counts, prefill backlog (ms), slowness and arrival rate (per s) of ``endpoint_ids``."""
        n = len(endpoint_ids)
        inflight = np.fromiter(map(self._inflight.get, endpoint_ids, repeat(0)), dtype=np.float64, count=n)
        due = np.fromiter(map(self._prefill_due.get, endpoint_ids, repeat(now)), dtype=np.float64, count=n)
        backlog = np.maximum(due - now, 0.0) * 1000.0
        log_slow = np.fromiter(map(self._log_slow.get, endpoint_ids, repeat(0.0)), dtype=np.float64, count=n)
        no_rate = (0.0, now)
        rate = np.fromiter((self._decayed(*self._rate.get(e, no_rate), now) for e in endpoint_ids), dtype=np.float64,
                           count=n)
        return inflight, backlog, np.exp(log_slow), rate
