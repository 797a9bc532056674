"""Small statistics shared by the benchmarks and the demo."""

from __future__ import annotations

from collections.abc import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 1]; NaN for no values.

    >>> percentile([3.0, 1.0, 2.0, 4.0], 0.5)
    3.0
    """
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")
