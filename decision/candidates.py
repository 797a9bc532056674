"""The locate stage's output as columns: endpoints, RTTs and telemetry for n candidates.

A :class:`CandidateSet` is a ``Sequence[Candidate]``, so every stage and test can treat it as
one, but the request path reads its arrays instead: the guard builds memo keys from the
telemetry matrix, the score stage computes on it, and a :class:`~decision.domain.Candidate`
(with its :class:`~decision.domain.TelemetryReading`) is only built for the candidates someone
reads one by one (a rule evaluation that missed its memo, the chosen route, the trace).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from decision.domain import BuiltOnRead, Candidate, Endpoint
from decision.telemetry import TelemetryBatch

FloatArray = NDArray[np.float64]
_T = TypeVar("_T", bound=np.generic)


NUMBERS = 6  # width of endpoint_numbers


def endpoint_numbers(ep: Endpoint) -> tuple[float, float, float, float, float, float]:
    """What the score stage reads of an endpoint: (concurrency, prefill tok/s, decode tok/s at
    batch 1, cold start ms (0 when warm), nominal $ per 1K tokens, decode batch_half (0: unknown))."""
    return (float(ep.max_concurrency), float(ep.prefill_tokens_per_s), float(ep.decode_tokens_per_s),
            0.0 if ep.warm else float(ep.cold_start_ms), float(ep.nominal_cost_per_1k), float(ep.batch_half))


@dataclass(frozen=True, eq=False)
class Placement:
    """Where a (model or family, client region) can go, per inventory revision: the endpoints the
    index lists, their RTT from the client and egress $/GB to it. Built once, shared by every
    decision with the same key; feature builders may cache per-placement blocks keyed on it."""

    endpoints: tuple[Endpoint, ...]
    rtt_ms: FloatArray
    egress_per_gb: FloatArray
    # Row numbers in the telemetry store (TelemetryStore.rows_of), when the placement was made for one.
    telemetry_rows: NDArray[np.intp] | None = None
    endpoint_ids: tuple[str, ...] = field(init=False)
    numbers: FloatArray = field(init=False)  # endpoint_numbers of each endpoint

    def __post_init__(self) -> None:
        eps = self.endpoints
        object.__setattr__(self, "endpoint_ids", tuple(e.endpoint_id for e in eps))
        numbers = np.array([endpoint_numbers(e) for e in eps], dtype=np.float64).reshape(len(eps), NUMBERS)
        for a in (numbers, self.rtt_ms, self.egress_per_gb):
            a.setflags(write=False)
        object.__setattr__(self, "numbers", numbers)


class CandidateSet(BuiltOnRead[Candidate]):
    """Candidates ``rows`` of a :class:`Placement`, with their telemetry at decision time."""

    __slots__ = ("_items", "placement", "rows", "telemetry")

    def __init__(self, placement: Placement, telemetry: TelemetryBatch, rows: NDArray[np.intp] | None = None) -> None:
        n = len(placement.endpoints) if rows is None else len(rows)
        if len(telemetry) != n:
            raise ValueError(f"{n} candidates but telemetry for {len(telemetry)}")
        self.placement = placement
        self.telemetry = telemetry
        self.rows = np.arange(n, dtype=np.intp) if rows is None else rows
        self._items: list[Candidate | None] = [None] * n

    @property
    def endpoint_ids(self) -> Sequence[str]:
        return self.telemetry.endpoint_ids

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        eps = self.placement.endpoints
        if len(self.rows) == len(eps):
            return eps
        return [eps[i] for i in self.rows.tolist()]

    def column(self, values: NDArray[_T]) -> NDArray[_T]:
        """Rows of a per-placement array (RTT, egress, numbers...) for these candidates."""
        if len(self.rows) == len(self.placement.endpoints):
            return values
        return values[self.rows]

    def take(self, positions: Sequence[int]) -> CandidateSet:
        """The candidates at ``positions`` (in this set), in that order; built ones are kept."""
        out = CandidateSet(self.placement, self.telemetry.take(positions), self.rows[np.asarray(positions,
                                                                                                 dtype=np.intp)])
        items = self._items
        out._items = [items[p] for p in positions]
        return out

    def __len__(self) -> int:
        return len(self._items)

    def _item(self, i: int) -> Candidate:
        c = self._items[i]
        if c is None:
            p = self.placement
            k = int(self.rows[i])
            c = self._items[i] = Candidate(p.endpoints[k], self.telemetry.reading(i), float(p.rtt_ms[k]))
        return c

    def __repr__(self) -> str:
        return f"CandidateSet({len(self)} of {len(self.placement.endpoints)}: {list(self.endpoint_ids)[:4]}...)"


def endpoints_of(candidates: Sequence[Any]) -> Sequence[Endpoint]:
    """The candidates' endpoints, without building candidates where they are columns."""
    if isinstance(candidates, CandidateSet):
        return candidates.endpoints
    return [c.endpoint for c in candidates]


def max_age_of(candidates: Sequence[Any], i: int) -> float:
    """Candidate ``i``'s oldest telemetry age (s; inf: none), without building the candidate."""
    if isinstance(candidates, CandidateSet):
        return float(candidates.telemetry.max_age_s()[i])
    return float(candidates[i].telemetry.max_age_s)


def endpoint_ids_of(candidates: Sequence[Any]) -> Sequence[str]:
    """The candidates' endpoint ids, without building candidates where they are columns."""
    if isinstance(candidates, CandidateSet):
        return candidates.endpoint_ids
    return [c.endpoint.endpoint_id for c in candidates]
