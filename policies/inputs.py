"""What a rule sees: plain JSON-like views of the request, an endpoint and its telemetry.

Each rule receives only what its manifest entry declares. That is what makes memoising sound:
a rule cannot read an undeclared request field or metric (it is not there: a CEL error, an undefined
Rego value; :mod:`policies.declared` refuses such a read when the bundle compiles), so its verdict is
a function of the declared values, which form the memo key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from decision import _kernels
from decision.domain import Endpoint, TelemetryReading
from decision.telemetry import CANONICAL, TelemetryBatch

METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def endpoint_view(ep: Endpoint) -> dict[str, Any]:
    """The static inventory facts of an endpoint a rule may read (``owner_tenant`` '' if none).

    >>> from learners.testing import toy_endpoint
    >>> endpoint_view(toy_endpoint(0))["jurisdiction"]
    'EU'
    """
    return {
        "id": ep.endpoint_id, "model": ep.model, "family": ep.family, "modality": ep.modality,
        "safety_tier": ep.safety_tier, "runtime": ep.runtime, "node_id": ep.node_id,
        "gpu_type": ep.gpu_type, "site_id": ep.site_id, "region": ep.region,
        "jurisdiction": ep.jurisdiction, "tier": ep.tier, "certifications": sorted(ep.certifications),
        "owner_tenant": ep.owner_tenant or "", "warm": ep.warm,
    }


def request_view(request: Mapping[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """Only the declared request fields (as in ``RequestContext.as_dict``)."""
    return {f: request[f] for f in fields if f in request}


def freeze(value: Any) -> Any:
    """A hashable stand-in for a JSON-like value, for memo keys."""
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    return value


def ceil_age(age: float | None) -> int | None:
    """Ages reach rules in whole seconds, rounded up: never fresher than they are.

    Whole seconds keep memo keys stable between telemetry updates; rounding up means a rule
    ``age_s <= limit`` with a whole-second limit decides exactly as on the true age.

    >>> ceil_age(3.2), ceil_age(3.0), ceil_age(None)
    (4, 3, None)
    """
    if age is None:
        return None
    if math.isinf(age) or math.isnan(age):
        return 2**62
    return math.ceil(age)


def telemetry_view(reading: TelemetryReading, metrics: Sequence[str]) -> dict[str, float]:
    """Known values of the declared metrics (stale or never-reported ones are absent)."""
    vals = reading.values
    return {m: float(vals[m]) for m in metrics if m in vals}


def ages_view(reading: TelemetryReading, metrics: Sequence[str]) -> dict[str, int]:
    """Ages, in whole seconds rounded up, of the declared metrics ever reported."""
    ages = reading.ages_s
    out: dict[str, int] = {}
    for m in metrics:
        a = ceil_age(ages.get(m))
        if a is not None:
            out[m] = a
    return out


def telemetry_key(reading: TelemetryReading, metrics: Sequence[str], age_metrics: Sequence[str]) -> tuple[Any, ...]:
    """Everything a telemetry-reading rule may see of one reading, as a memo key part.

    >>> r = TelemetryReading("ep0", {"gpu_temp_c": 70.0}, {"gpu_temp_c": 2.5})
    >>> telemetry_key(r, ("gpu_temp_c", "xid_errors"), ("gpu_temp_c", "xid_errors"))
    (70.0, None, 3, None)
    """
    vals, ages = reading.values, reading.ages_s
    return (*[vals.get(m) for m in metrics], *[ceil_age(ages.get(m)) for m in age_metrics])


def compile_telemetry_key(metrics: Sequence[str],
                          age_metrics: Sequence[str]) -> Callable[[TelemetryReading], tuple[Any, ...]]:
    """A fast equivalent of :func:`telemetry_key` for fixed metric lists.

    It runs once per candidate per decision, so the lookups are unrolled into straight-line
    code (names are validated identifiers, inserted as string literals); a missing age or an
    infinite one falls back to :func:`telemetry_key`.

    >>> key = compile_telemetry_key(("gpu_temp_c",), ("gpu_temp_c", "queue_waiting"))
    >>> r = TelemetryReading("ep0", {"gpu_temp_c": 70.0}, {"gpu_temp_c": 2.5})
    >>> key(r) == telemetry_key(r, ("gpu_temp_c",), ("gpu_temp_c", "queue_waiting")) == (70.0, 3, None)
    True
    """
    for m in (*metrics, *age_metrics):
        if not METRIC_NAME.fullmatch(m):
            raise ValueError(f"bad metric name {m!r}")
    parts = [f"v({m!r})" for m in metrics] + [f"ceil(a[{m!r}])" for m in age_metrics]
    src = ("def key(reading):\n    v = reading.values.get\n    a = reading.ages_s\n    try:\n"
           f"        return ({', '.join(parts)}{',' if parts else ''})\n"
           "    except (KeyError, OverflowError, ValueError):\n"
           "        return slow(reading, metrics, age_metrics)\n")
    scope: dict[str, Any] = {"ceil": math.ceil, "slow": telemetry_key, "metrics": tuple(metrics),
                             "age_metrics": tuple(age_metrics)}
    exec(src, scope)
    fn: Callable[[TelemetryReading], tuple[Any, ...]] = scope["key"]
    return fn


def dense_telemetry_block(metrics: Sequence[str],
                          age_metrics: Sequence[str]) -> Callable[[TelemetryBatch], tuple[bytes, int]] | None:
    """What telemetry rules see of a whole :class:`~decision.telemetry.TelemetryBatch`, as bytes.

    One row per endpoint: the declared values, then the declared ages rounded up (as
    :func:`ceil_age`), NaN where unknown or never reported; returns (bytes, row width in bytes).
    Equal rows mean equal inputs. None when a metric is not a canonical one (no column).
    """
    cols = {name: i for i, name in enumerate(CANONICAL)}
    if any(m not in cols for m in (*metrics, *age_metrics)):
        return None
    vcols = np.array([cols[m] for m in metrics], dtype=np.intp)
    acols = np.array([cols[m] for m in age_metrics], dtype=np.intp)
    width = 8 * (len(vcols) + len(acols))

    ncols = len(CANONICAL)

    def block(batch: TelemetryBatch) -> tuple[bytes, int]:
        # One pass in C; every NaN comes out as one bit pattern, so "unknown" compares equal as bytes.
        return _kernels.telemetry_block(batch.values, batch.stamps, ncols, batch.at, vcols, acols), width

    return block


def split_rows(raw: bytes, width: int, n: int) -> list[bytes]:
    """The ``n`` rows of a :func:`dense_telemetry_block` (empty ones when nothing is declared)."""
    if width == 0:
        return [b""] * n
    return [raw[i:i + width] for i in range(0, len(raw), width)]


def dense_telemetry_key(metrics: Sequence[str],
                        age_metrics: Sequence[str]) -> Callable[[TelemetryBatch], list[bytes]] | None:
    """:func:`telemetry_key` for each endpoint of a batch: its row of :func:`dense_telemetry_block`.

    The bytes never equal a tuple key of :func:`telemetry_key`, so both can share a memo.

    >>> from decision.telemetry import TelemetryStore
    >>> store = TelemetryStore({"ep0": "n0", "ep1": "n1"})
    >>> store.update_node("n0", {"gpu_temp_c": 70.0}, ts=100.0)
    >>> store.update_node("n1", {"gpu_temp_c": 70.0}, ts=100.2)
    >>> key = dense_telemetry_key(("gpu_temp_c",), ("gpu_temp_c",))
    >>> a, b = key(store.batch(["ep0", "ep1"], now=102.5))
    >>> a == b, a == key(store.batch(["ep0"], now=102.9))[0]  # ages 3 s (rounded up) in all three
    (True, True)
    """
    block = dense_telemetry_block(metrics, age_metrics)
    if block is None:
        return None
    fn = block

    def key(batch: TelemetryBatch) -> list[bytes]:
        return split_rows(*fn(batch), len(batch))

    return key
