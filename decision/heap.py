"""Keeping the cyclic garbage collector away from the long-lived heap.

A service holds its fleet inventory, compiled policies and learners for its whole life; at 65,536
endpoints that is millions of objects, and each full (generation 2) collection walks all of them:
a 0.1-0.8 s stall of whichever decision triggered it. Freezing what is alive once start-up is done
moves it to a permanent generation the collector never scans. Objects still die by reference
counting as usual; only cycles among frozen objects would stay (start-up state has none that die).
"""

from __future__ import annotations

import gc


def settle() -> int:
    """Collect once, then freeze every object alive now; returns how many are frozen.

    >>> settle() > 0 and gc.get_freeze_count() > 0
    True
    >>> gc.unfreeze()  # a doctest run is not a service: give the objects back to the collector
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
