"""Warnings that repeat every scrape or push, logged at most once per key and interval.

A bad exporter sends the same bad value every few seconds until someone fixes it; logging each
one would bury the rest of the log (500 targets scraped every 5 s is 100 warnings a second).
The first warning of a key is logged at once; the same key within ``interval_s`` is counted, and
the count rides on the next warning logged for that key. The counts themselves stay exact in
the metrics (``infermesh_telemetry_rejected_total``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable


class ThrottledWarnings:
    """``logger.warning`` at most once per key every ``interval_s`` seconds.

    Parameters
    ----------
    logger : logging.Logger
        Where the warnings go.
    interval_s : float
        The shortest gap between two warnings of one key.
    clock : callable, optional
        Monotonic seconds (tests pass their own).
    max_keys : int
        Keys remembered at most; past that the memory starts afresh (every key may warn once more).

    Examples
    --------
    >>> import logging
    >>> now = [0.0]
    >>> w = ThrottledWarnings(logging.getLogger("example"), interval_s=60, clock=lambda: now[0])
    >>> [w.warning("target-a", "bad value %s", 1) for _ in range(3)]
    [True, False, False]
    >>> now[0] = 61.0
    >>> w.warning("target-a", "bad value %s", 1)  # logged, with "(2 more like it ...)"
    True
    """

    def __init__(self, logger: logging.Logger, *, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._seen: dict[Hashable, tuple[float, int]] = {}  # key -> (last logged at, held back since)
        self._lock = threading.Lock()

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval_s`` ago; whether it was logged."""
        now = self._clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last[0] < self.interval_s:
                self._seen[key] = (last[0], last[1] + 1)
                return False
            if last is None and len(self._seen) >= self._max_keys:
                self._seen.clear()
            self._seen[key] = (now, 0)
        if last is not None and last[1]:
            msg += " (%d more like it in the last %.0f s, not logged)"
            args = (*args, last[1], now - last[0])
        self.logger.warning(msg, *args)
        return True
