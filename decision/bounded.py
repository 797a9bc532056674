"""Bounded memo tables that evict their oldest entries a slice at a time.

The request path keeps many memos (placements, guard verdicts, feature blocks) bounded by entry
count. Starting a full table over frees all of its entries inside whichever request tripped the
bound: at a few thousand entries, each holding lists and tuples, that is a 10-20 ms pause of one
decision. Evicting the oldest 1/256 instead spreads the same work over 256 times as many pauses,
each well under the decision's own time. Tables are plain dicts: insertion order is the age.
"""

from __future__ import annotations

from itertools import islice
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

EVICT_FRACTION = 256  # a full table loses its oldest 1/256


def make_room(table: dict[K, V], limit: int) -> list[K]:
    """Evict the oldest entries if ``table`` holds ``limit`` or more; returns the evicted keys.

    >>> t = {i: str(i) for i in range(512)}
    >>> make_room(t, 512), len(t), next(iter(t))
    ([0, 1], 510, 2)
    >>> make_room(t, 512)
    []
    """
    if len(table) < limit:
        return []
    gone = list(islice(table, max(1, limit // EVICT_FRACTION)))
    for k in gone:
        del table[k]
    return gone


def put_bounded(table: dict[K, V], key: K, value: V, limit: int) -> V:
    """``table[key] = value``, first making room under ``limit`` entries (:func:`make_room`).

    >>> t: dict[int, int] = {}
    >>> for i in range(100):
    ...     _ = put_bounded(t, i, i * i, 32)
    >>> len(t) <= 32, t[99]
    (True, 9801)
    """
    make_room(table, limit)
    table[key] = value
    return value
