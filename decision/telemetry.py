"""Live telemetry: Prometheus exposition parsing, canonical metric names, and a store with ages.

Three exporters feed it: NVIDIA dcgm-exporter (per GPU, attributed to a node), vLLM and Triton
(per serving endpoint). Each sample is mapped to a canonical name below and kept with its
timestamp; a snapshot reports each value's age, and a value older than ``stale_after_s`` is
reported as unknown (absent from ``values``, present in ``ages_s``), never silently trusted.

Every canonical metric is a count, size, fraction, temperature, power or duration, so a usable
value is finite and >= 0 (:func:`usable_value`); NaN means "no value" (exporters write it for a
gauge they lack) and is skipped without complaint. A negative or infinite value, or a timestamp
more than :data:`MAX_CLOCK_SKEW_S` ahead of the store's clock, is dropped and counted
(``TelemetryStore.rejected``), never stored: one such value would otherwise steer routing (a
negative queue makes an endpoint look faster than idle) or, stamped in the future, stay pinned.

The TTFT and queue-time means come from counters that run from the server's start; the store
reports the mean over the interval since the endpoint's previous counters (the first reading, or
one after a restart, gives the mean since the counters began).
"""

from __future__ import annotations

import gc
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from decision import _kernels
from decision.domain import TelemetryReading
from decision.log_throttle import ThrottledWarnings

log = logging.getLogger("infermesh.telemetry")

# Canonical names: (what, unit)
GPU_UTIL = "gpu_util"  # percent 0-100, mean over the node's GPUs
FB_USED_MIB = "fb_used_mib"  # sum over GPUs
FB_FREE_MIB = "fb_free_mib"
GPU_TEMP_C = "gpu_temp_c"  # hottest GPU
POWER_W = "power_w"  # sum over GPUs
XID_ERRORS = "xid_errors"  # last XID error code seen (dcgm reports the code; 0 = none)
QUEUE_RUNNING = "queue_running"  # requests in the running batch
QUEUE_WAITING = "queue_waiting"  # requests waiting for a batch slot
KV_CACHE_USAGE = "kv_cache_usage"  # fraction 0-1
TTFT_MEAN_S = "ttft_mean_s"  # mean observed TTFT since the previous scrape (histogram sum/count deltas)
QUEUE_DURATION_US = "queue_duration_us"  # Triton: mean queue time per request since the previous scrape

CANONICAL: tuple[str, ...] = (GPU_UTIL, FB_USED_MIB, FB_FREE_MIB, GPU_TEMP_C, POWER_W, XID_ERRORS,
                              QUEUE_RUNNING, QUEUE_WAITING, KV_CACHE_USAGE, TTFT_MEAN_S,
                              QUEUE_DURATION_US)

# Exporter name -> (canonical name, how samples of several series combine)
_NODE_METRICS: dict[str, tuple[str, str]] = {
    "DCGM_FI_DEV_GPU_UTIL": (GPU_UTIL, "mean"),
    "DCGM_FI_DEV_FB_USED": (FB_USED_MIB, "sum"),
    "DCGM_FI_DEV_FB_FREE": (FB_FREE_MIB, "sum"),
    "DCGM_FI_DEV_GPU_TEMP": (GPU_TEMP_C, "max"),
    "DCGM_FI_DEV_POWER_USAGE": (POWER_W, "sum"),
    "DCGM_FI_DEV_XID_ERRORS": (XID_ERRORS, "max"),
}
_ENDPOINT_METRICS: dict[str, tuple[str, str]] = {
    "vllm:num_requests_running": (QUEUE_RUNNING, "sum"),
    "vllm:num_requests_waiting": (QUEUE_WAITING, "sum"),
    "vllm:gpu_cache_usage_perc": (KV_CACHE_USAGE, "max"),
    "vllm:kv_cache_usage_perc": (KV_CACHE_USAGE, "max"),
    "nv_inference_pending_request_count": (QUEUE_WAITING, "sum"),
}
# Exporter series combined into means (sum / count) by canonicalize
_RATIO_METRICS: frozenset[str] = frozenset({"vllm:time_to_first_token_seconds_sum",
                                            "vllm:time_to_first_token_seconds_count",
                                            "nv_inference_queue_duration_us", "nv_inference_request_success"})
# Every exporter series the store takes a value from (the rest of an exposition, e.g. histogram
# buckets, may hold anything, +Inf included).
KEPT_EXPORTER_METRICS: frozenset[str] = frozenset(_NODE_METRICS) | frozenset(_ENDPOINT_METRICS) | _RATIO_METRICS
NODE_LEVEL: frozenset[str] = frozenset(c for c, _ in _NODE_METRICS.values())

MAX_CLOCK_SKEW_S = 5.0
"""How far ahead of the store's clock a sample's timestamp may be (the sender's clock running
fast). Within it the stamp is clamped to now; beyond it the sample is refused, because a stamp
in the future would outrank every honest sample after it and never go stale."""
VALUE_RULE = "must be finite and >= 0"
_INF = math.inf


def usable_value(value: float) -> bool:
    """Whether a metric value may be stored: finite and >= 0 (NaN, "no value", is not either).

    >>> [usable_value(v) for v in (0.0, 3.5, -1.0, math.inf, -math.inf, math.nan)]
    [True, True, False, False, False, False]
    """
    return 0.0 <= value < _INF


# Metrics with a ceiling: a fraction, a percentage. Beyond it a value is a broken exporter or pusher,
# and a KV cache "500% full" would steer routing away for good. Declared once per canonical name; the
# exporter series that feed one get its ceiling too (values are checked under either name).
_CEILINGS: dict[str, float] = {GPU_UTIL: 100.0, KV_CACHE_USAGE: 1.0}
_UPPER: dict[str, float] = {**_CEILINGS, **{series: _CEILINGS[canonical]
                                            for series, (canonical, _) in {**_NODE_METRICS, **_ENDPOINT_METRICS}.items()
                                            if canonical in _CEILINGS}}


def usable_for(name: str, value: float) -> bool:
    """:func:`usable_value`, and within the metric's ceiling if it has one.

    >>> usable_for("kv_cache_usage", 0.9), usable_for("kv_cache_usage", 5.0), usable_for("queue_waiting", 5.0)
    (True, False, True)
    """
    bound = _UPPER.get(name)
    return usable_value(value) if bound is None else 0.0 <= value <= bound


def value_rule(name: str) -> str:
    """What a value of metric ``name`` must be, for messages.

    >>> value_rule("gpu_util"), value_rule("power_w")
    ('must be between 0 and 100', 'must be finite and >= 0')
    """
    bound = _UPPER.get(name)
    return VALUE_RULE if bound is None else f"must be between 0 and {bound:g}"


def refused_value(value: float, name: str = "") -> bool:
    """Whether a value is there but unusable: negative, infinite or over the metric's ceiling (NaN is
    "no value", not refused).

    >>> [refused_value(v) for v in (0.0, -1.0, math.inf, math.nan)], refused_value(1.5, "kv_cache_usage")
    ([False, True, True, False], True)
    """
    return value == value and not usable_for(name, value)


def timestamp_problem(ts: float, now: float, max_skew_s: float = MAX_CLOCK_SKEW_S) -> str | None:
    """Why ``ts`` (seconds since the epoch) cannot stamp a sample received at ``now``; None if it can.

    >>> timestamp_problem(100.0, 100.0), timestamp_problem(104.0, 100.0), timestamp_problem(106.0, 100.0)
    (None, None, 'more than 5 s in the future')
    """
    if not ts >= 0.0:
        return "must not be negative"
    if not ts <= now + max_skew_s:  # also NaN and +inf
        return f"more than {max_skew_s:g} s in the future"
    return None


def unusable_samples(samples: Iterable[Sample]) -> list[Sample]:
    """The samples of series the store keeps whose value is negative or infinite (NaN is "no value": not listed).

    >>> [s.value for s in unusable_samples(parse_exposition(
    ...     'vllm:num_requests_waiting -1\\nvllm:num_requests_running NaN\\nx_bucket{le="+Inf"} +Inf'))]
    [-1.0]
    """
    return [s for s in samples if s.name in KEPT_EXPORTER_METRICS and refused_value(s.value, s.name)]


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float
    timestamp_ms: int | None = None


class ExpositionError(ValueError):
    def __init__(self, line_no: int, message: str) -> None:
        super().__init__(f"line {line_no}: {message}")
        self.line_no = line_no


_SAMPLE_RE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:[ \t]*\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+(?P<ts>-?\d+))?\s*$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


_ESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)


def _unescape(v: str) -> str:
    r"""A label value's escapes (``\\``, ``\"``, ``\n``) decoded in one pass, left to right.

    >>> _unescape(r'C:\\new') == 'C:' + chr(92) + 'new'
    True
    >>> _unescape(r'a\nb') == 'a' + chr(10) + 'b'
    True
    >>> _unescape(r'say \"hi\"')
    'say "hi"'
    """
    return _ESCAPE_RE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), v) if "\\" in v else v


def _parse_value(text: str, line_no: int) -> float:
    try:
        return float(text)  # accepts NaN, +Inf, -Inf as Prometheus writes them
    except ValueError:
        raise ExpositionError(line_no, f"bad sample value {text!r}") from None


def parse_exposition(text: str) -> list[Sample]:
    """Parse Prometheus text exposition format (version 0.0.4) into samples.

    >>> parse_exposition('vllm:num_requests_waiting{engine="0"} 6.0')[0].value
    6.0
    """
    samples: list[Sample] = []
    # Lines end at "\n" only: str.splitlines would also split at characters a label value may hold
    # unescaped (U+2028, U+0085, form feed, ...).
    for line_no, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if m is None:
            raise ExpositionError(line_no, f"not a sample line: {line[:80]!r}")
        labels: dict[str, str] = {}
        body = m.group("labels")
        if body:
            pos = 0
            while pos < len(body):
                lm = _LABEL_RE.match(body, pos)
                if lm is None:
                    raise ExpositionError(line_no, f"bad label set near {body[pos:pos + 30]!r}")
                labels[lm.group(1)] = _unescape(lm.group(2))
                pos = lm.end()
        ts = m.group("ts")
        stamp = int(ts) if ts else None
        if stamp is not None and not -(2**63) <= stamp < 2**63:  # Prometheus stamps are int64 milliseconds
            raise ExpositionError(line_no, f"timestamp {ts[:24]}{'...' if len(ts) > 24 else ''} is not an "
                                           "int64 of milliseconds")
        samples.append(Sample(m.group("name"), labels, _parse_value(m.group("value"), line_no), stamp))
    return samples


def _combine(values: Sequence[float], how: str) -> float:
    if how == "sum":
        return float(sum(values))
    if how == "max":
        return float(max(values))
    return float(sum(values) / len(values))


def canonicalize(samples: Iterable[Sample], counters: Mapping[str, tuple[float, float]] | None = None
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Reduce exporter samples to (node-level, endpoint-level) canonical values.

    Histograms and counters that only make sense as ratios (vLLM TTFT, Triton queue time) are
    turned into means: ``sum / count`` over all series (lifetime means: see :func:`cumulative_means`;
    ``counters`` is its result when the caller has it already).
    """
    node: dict[str, list[float]] = {}
    endpoint: dict[str, list[float]] = {}
    node_how: dict[str, str] = {}
    ep_how: dict[str, str] = {}
    gpus_seen: set[tuple[str, str, str]] = set()
    for s in samples:
        if not usable_for(s.name, s.value):  # NaN: no value; else unusable (see unusable_samples)
            continue
        if s.name in _NODE_METRICS:
            # dcgm-exporter repeats a GPU's series once per pod sharing it (time-slicing, virtual
            # GPUs): one GPU counts once, by its UUID (or index) and MIG instance.
            gpu = s.labels.get("UUID") or s.labels.get("gpu")
            if gpu is not None:
                key = (s.name, gpu, s.labels.get("GPU_I_ID", ""))
                if key in gpus_seen:
                    continue
                gpus_seen.add(key)
            canon, how = _NODE_METRICS[s.name]
            node.setdefault(canon, []).append(s.value)
            node_how[canon] = how
        elif s.name in _ENDPOINT_METRICS:
            canon, how = _ENDPOINT_METRICS[s.name]
            endpoint.setdefault(canon, []).append(s.value)
            ep_how[canon] = how
    node_out = {k: _combine(v, node_how[k]) for k, v in node.items()}
    ep_out = {k: _combine(v, ep_how[k]) for k, v in endpoint.items()}
    for canon, (total, count) in (cumulative_means(samples) if counters is None else counters).items():
        if count > 0:
            ep_out[canon] = total / count
    return node_out, ep_out


Series = tuple[tuple[str, str], ...]  # a series' labels, sorted


def series_counters(samples: Iterable[Sample]) -> dict[str, dict[Series, tuple[float, float]]]:
    r"""The (sum, count) counters behind each mean value, per series (vLLM's TTFT histogram per
    engine; Triton's queue time and successes per model and version).

    Per series, because each counts from its own server's start: one engine of several restarting
    sends its counters back while the others' grow, which their totals would hide.

    >>> series_counters(parse_exposition('vllm:time_to_first_token_seconds_sum{engine="0"} 12\n'
    ...                                  'vllm:time_to_first_token_seconds_count{engine="0"} 40'))
    {'ttft_mean_s': {(('engine', '0'),): (12.0, 40.0)}}
    """
    out: dict[str, dict[Series, tuple[float, float]]] = {}
    ttft: dict[Series, tuple[float, float]] = {}
    for s in samples:
        if s.name in ("vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count") \
                and usable_value(s.value):
            key = tuple(sorted(s.labels.items()))
            total, count = ttft.get(key, (0.0, 0.0))
            ttft[key] = (total + s.value, count) if s.name.endswith("_sum") else (total, count + s.value)
    if ttft:
        out[TTFT_MEAN_S] = ttft
    queued = _triton_queue_series(samples)
    if queued:
        out[QUEUE_DURATION_US] = queued
    return out


def _totals(counters: Mapping[str, Mapping[Series, tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """Per mean value, the (sum, count) over all its series."""
    return {canon: (sum(p[0] for p in series.values()), sum(p[1] for p in series.values()))
            for canon, series in counters.items()}


def cumulative_means(samples: Iterable[Sample]) -> dict[str, tuple[float, float]]:
    r"""The (sum, count) counters behind each mean value, over every series.

    They count from the server's start: their ratio is a lifetime mean. The store divides the
    differences between two scrapes instead, for the mean over the interval between them.

    >>> cumulative_means(parse_exposition('vllm:time_to_first_token_seconds_sum 12\n'
    ...                                   'vllm:time_to_first_token_seconds_count 40'))
    {'ttft_mean_s': (12.0, 40.0)}
    """
    return _totals(series_counters(samples))


def interval_mean(before: Mapping[Series, tuple[float, float]] | None,
                  now: Mapping[Series, tuple[float, float]]) -> float | None:
    """The mean over the interval between two readings of per-series (sum, count) counters.

    ``None`` when nothing was counted in between (no request: no mean, the last one ages). A
    series seen for the first time, or whose counters went back (its server restarted), counts
    from its start.

    >>> a, b = (("engine", "0"),), (("engine", "1"),)
    >>> interval_mean({a: (10.0, 100.0)}, {a: (16.0, 110.0)}), interval_mean({a: (10.0, 100.0)}, {a: (10.0, 100.0)})
    (0.6, None)
    >>> interval_mean(None, {a: (10.0, 100.0)})
    0.1
    >>> # engine 1 restarted (0.1 s since) while engine 0 served 10 requests at 0.05 s
    >>> interval_mean({a: (400.0, 100.0), b: (800.0, 100.0)}, {a: (400.5, 110.0), b: (0.1, 1.0)})
    0.05454545454545454
    """
    total = count = 0.0
    for key, (s, c) in now.items():
        prev = before.get(key) if before is not None else None
        if prev is not None and c >= prev[1] and s >= prev[0]:
            s, c = s - prev[0], c - prev[1]
        total, count = total + s, count + c
    return total / count if count > 0 else None


_CANONICAL_OF: dict[str, str] = {
    **{m: c for m, (c, _) in _NODE_METRICS.items()}, **{m: c for m, (c, _) in _ENDPOINT_METRICS.items()},
    "vllm:time_to_first_token_seconds_sum": TTFT_MEAN_S, "vllm:time_to_first_token_seconds_count": TTFT_MEAN_S,
    "nv_inference_queue_duration_us": QUEUE_DURATION_US, "nv_inference_request_success": QUEUE_DURATION_US,
}


def line_stamps(samples: Iterable[Sample]) -> dict[str, float]:
    """The oldest per-line timestamp (seconds) among the samples behind each canonical value.

    >>> line_stamps(parse_exposition('vllm:num_requests_waiting{engine="0"} 1 5000\\n'
    ...                              'vllm:num_requests_waiting{engine="1"} 2 4000\\nDCGM_FI_DEV_GPU_TEMP 60'))
    {'queue_waiting': 4.0}
    """
    out: dict[str, float] = {}
    for s in samples:
        if s.timestamp_ms is not None:
            canon = _CANONICAL_OF.get(s.name)
            if canon is not None:
                stamp = s.timestamp_ms / 1000.0
                if stamp < out.get(canon, _INF):
                    out[canon] = stamp
    return out


def _by_stamp(values: Mapping[str, float], lines: Mapping[str, float],
              base: float | None) -> list[tuple[float | None, dict[str, float]]]:
    """``values`` grouped by the stamp each gets: ``base``, or its lines' own when older."""
    if not lines:
        return [(base, dict(values))]
    groups: dict[float | None, dict[str, float]] = {}
    for name, value in values.items():
        line = lines.get(name)
        stamp = base if line is None or base is None or line >= base else line
        groups.setdefault(stamp, {})[name] = value
    return list(groups.items())


def _triton_queue_series(samples: Iterable[Sample]) -> dict[Series, tuple[float, float]]:
    r"""Triton's queue time and the successes of the same (model, version), per (model, version):
    their ratio is the mean queue time per request.

    A server with an ensemble counts its requests twice, once for the ensemble (which reports no
    queue time) and once for its composing model: dividing by every model's successes halves it.

    >>> _triton_queue_series(parse_exposition(
    ...     'nv_inference_request_success{model="ensemble",version="1"} 10\n'
    ...     'nv_inference_request_success{model="llm",version="1"} 10\n'
    ...     'nv_inference_queue_duration_us{model="llm",version="1"} 5000'))
    {(('model', 'llm'), ('version', '1')): (5000.0, 10.0)}
    """
    queue: dict[tuple[str, str], float] = {}
    success: dict[tuple[str, str], float] = {}
    for s in samples:
        if s.name == "nv_inference_queue_duration_us" or s.name == "nv_inference_request_success":
            if not 0.0 <= s.value < _INF:
                continue
            key = (s.labels.get("model", ""), s.labels.get("version", ""))
            into = queue if s.name == "nv_inference_queue_duration_us" else success
            into[key] = into.get(key, 0.0) + s.value
    return {(("model", k[0]), ("version", k[1])): (q, success.get(k, 0.0)) for k, q in queue.items()}


class _Ages(Mapping[str, float]):
    """Ages computed on read from timestamps, so a snapshot costs O(1) per endpoint."""

    __slots__ = ("_now", "_stamps")

    def __init__(self, stamps: Mapping[str, float], now: float) -> None:
        self._stamps = stamps
        self._now = now

    def __getitem__(self, key: str) -> float:
        return self._now - self._stamps[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._stamps)

    def __len__(self) -> int:
        return len(self._stamps)

    def values(self) -> list[float]:  # type: ignore[override]
        """All ages at once (the Mapping default would go key by key through ``__getitem__``)."""
        now = self._now
        return [now - st for st in self._stamps.values()]

    @property
    def stamps(self) -> Mapping[str, float]:
        """The timestamps themselves (the store replaces, never mutates, these maps)."""
        return self._stamps

    def as_dict(self) -> dict[str, float]:
        now = self._now
        return {k: now - st for k, st in self._stamps.items()}


def dense_row(values: Mapping[str, float]) -> tuple[float, ...]:
    """``values`` in :data:`CANONICAL` order, NaN where unknown (what the score stage reads)."""
    get = values.get
    return tuple(get(k, math.nan) for k in CANONICAL)


Merged = tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...], float]
"""An endpoint's node and endpoint values merged: (metric names, their values, their timestamps,
the oldest timestamp), in name order.

Plain tuples of strings and floats on purpose: the collector untracks such tuples the first
time it looks at them (see :meth:`TelemetryStore._collect_young`), so a fleet's worth of
telemetry updates leaves nothing for later collections to scan (with per-endpoint objects or
dicts, collections after each refresh of 65,536 endpoints paused decisions for hundreds of
milliseconds). Mappings are built from it only where someone reads one endpoint's values."""

_EMPTY: Merged = ((), (), (), math.inf)
_NONE: dict[str, float] = {}
YOUNG_BATCH = 2048  # merged readings made between the store's own young-generation collections


def merged_values(m: Merged) -> dict[str, float]:
    """The metric -> value map of a merged reading."""
    return dict(zip(m[0], m[1], strict=True))


def merged_stamps(m: Merged) -> dict[str, float]:
    """The metric -> timestamp map of a merged reading."""
    return dict(zip(m[0], m[2], strict=True))


def dense_rows(m: Merged) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A merged reading's values and timestamps as rows in :data:`CANONICAL` order (NaN: none)."""
    return dense_row(merged_values(m)), dense_row(merged_stamps(m))


def _known(m: Merged, t: float, stale_after_s: float) -> dict[str, float]:
    """The values still known at ``t``: older than the limit is unknown."""
    names, values, stamps, oldest = m
    if t - oldest <= stale_after_s:
        return dict(zip(names, values, strict=True))
    limit = t - stale_after_s
    return {k: v for k, v, st in zip(names, values, stamps, strict=True) if st >= limit}


def _reading(endpoint_id: str, m: Merged, t: float, stale_after_s: float) -> TelemetryReading:
    """One endpoint's reading at ``t``: values older than ``stale_after_s`` are unknown."""
    values = _known(m, t, stale_after_s)
    return TelemetryReading(endpoint_id, values, _Ages(merged_stamps(m), t), dense_row(values),
                            t - m[3] if m[0] else math.inf)


def mask_stale(values: npt.NDArray[np.float64], stamps: npt.NDArray[np.float64], at: float,
               stale_after_s: float) -> npt.NDArray[np.float64]:
    """Blank (NaN) the values older than ``stale_after_s`` at ``at``, in place; freeze both arrays.

    Returns each row's oldest value's age, stale ones included (inf: nothing ever reported). One
    pass in C (:func:`decision._kernels.mask_stale`).

    >>> values, stamps = np.array([[1.0, 2.0], [np.nan, np.nan]]), np.array([[90.0, 99.0], [np.nan, np.nan]])
    >>> mask_stale(values, stamps, 100.0, 5.0).tolist(), values[0].tolist()
    ([10.0, inf], [nan, 2.0])
    """
    ages = np.empty(len(values), dtype=np.float64)
    _kernels.mask_stale(values, stamps, at, stale_after_s, ages)
    for a in (values, stamps, ages):
        a.setflags(write=False)
    return ages


class TelemetryBatch:
    """The telemetry of n endpoints at one instant as arrays, and each one's reading on demand.

    ``values`` and ``stamps`` have one row per endpoint and one column per :data:`CANONICAL`
    metric; NaN means unknown (never reported, or stale at ``at``: values only) or never
    reported (stamps). This is what the guard's memo keys and the score stage read, so a
    decision builds no per-candidate reading unless a rule must actually be evaluated.
    """

    __slots__ = ("_max_age", "_merged", "at", "endpoint_ids", "stale_after_s", "stamps", "values")

    def __init__(self, endpoint_ids: Sequence[str], merged: Sequence[Merged], at: float, stale_after_s: float,
                 arrays: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None,
                 ) -> None:
        self.endpoint_ids = endpoint_ids
        self._merged = merged
        self.at = at
        self.stale_after_s = stale_after_s
        if arrays is None:  # (values masked, stamps, max ages) when the caller has them
            n = len(merged)
            rows = np.array([dense_rows(m) for m in merged], dtype=np.float64).reshape(n, 2, len(CANONICAL))
            values, stamps = np.ascontiguousarray(rows[:, 0]), np.ascontiguousarray(rows[:, 1])
            arrays = (values, stamps, mask_stale(values, stamps, at, stale_after_s))
        self.values, self.stamps, self._max_age = arrays

    def __len__(self) -> int:
        return len(self._merged)

    def reading(self, i: int) -> TelemetryReading:
        return _reading(self.endpoint_ids[i], self._merged[i], self.at, self.stale_after_s)

    @property
    def merged(self) -> Sequence[Merged]:
        """Each endpoint's merged reading as the store held it (immutable objects, shared)."""
        return self._merged

    def max_age_s(self) -> npt.NDArray[np.float64]:
        """Each endpoint's oldest value's age, stale ones included (inf: nothing ever reported)."""
        return self._max_age

    def take(self, index: Sequence[int]) -> TelemetryBatch:
        """The rows at ``index``, in that order."""
        m, ids = self._merged, self.endpoint_ids
        idx = np.asarray(index, dtype=np.intp)
        return TelemetryBatch([ids[i] for i in index], [m[i] for i in index], self.at, self.stale_after_s,
                              (self.values[idx], self.stamps[idx], self._max_age[idx]))


@dataclass
class _Targets:
    """Latest values and their timestamps per scrape target (node or endpoint)."""

    values: dict[str, dict[str, float]] = field(default_factory=dict)
    stamps: dict[str, dict[str, float]] = field(default_factory=dict)


class TelemetryStore:
    """Thread-safe latest-value store for node and endpoint telemetry, with timestamps.

    Writers (scrapers, ``PushTelemetry``) replace a target's whole map atomically, so a reader
    never sees half an update. Each write re-merges the affected endpoints' node and endpoint
    values, so a read is a dictionary lookup; only an endpoint with a stale value pays for
    filtering. ``clock`` is injectable so the simulator can run on simulated time.

    Whatever the caller, values that are negative or infinite are dropped, and a timestamp more
    than ``max_clock_skew_s`` ahead of ``clock`` drops its whole update; ``rejected`` counts the
    values dropped. A timestamp ahead by less is clamped to now, so no value ever has a negative
    age or outranks a later honest sample.
    """

    def __init__(self, node_of: Mapping[str, str], *, stale_after_s: float = 30.0,
                 clock: Callable[[], float] | None = None, max_clock_skew_s: float = MAX_CLOCK_SKEW_S) -> None:
        self._node_of = dict(node_of)  # endpoint id -> node id
        self._endpoints_of: dict[str, list[str]] = {}
        for ep, node in self._node_of.items():
            self._endpoints_of.setdefault(node, []).append(ep)
        self.stale_after_s = stale_after_s
        self.max_clock_skew_s = max_clock_skew_s
        self._clock: Callable[[], float] = clock or time.time
        # target id -> metric -> value, and target id -> metric -> timestamp: float-only inner dicts,
        # which the collector never tracks (dicts of (value, stamp) tuples it would, for good).
        self._node = _Targets()
        self._endpoint = _Targets()
        self._merged: dict[str, Merged] = {}
        # (endpoint, mean) -> the (sum, count) counters last scraped, for means over the interval since
        self._counters: dict[tuple[str, str], Mapping[Series, tuple[float, float]]] = {}
        # The same merged state as rows of arrays, for batches: endpoint id -> row (rows are never
        # reused), each endpoint's merged reading, values and stamps in CANONICAL columns (NaN: none).
        self._rows: dict[str, int] = {}
        self._row_merged = np.empty(0, dtype=object)
        self._row_values = np.empty((0, len(CANONICAL)))
        self._row_stamps = np.empty((0, len(CANONICAL)))
        self._lock = threading.Lock()
        self.updates = 0
        self.rejected = 0  # values dropped: negative, infinite, or stamped too far in the future
        self._warn = ThrottledWarnings(log)  # a bad exporter repeats itself every scrape
        self._fresh = 0  # merged readings made since the last young-generation collection

    def now(self) -> float:
        return float(self._clock())

    def update_node(self, node_id: str, values: Mapping[str, float], ts: float | None = None) -> None:
        with self._lock:
            self._update(self._node, node_id, values, ts)
            for ep in self._endpoints_of.get(node_id, ()):
                self._remerge(ep)
        self._collect_young()

    def update_endpoint(self, endpoint_id: str, values: Mapping[str, float], ts: float | None = None) -> None:
        with self._lock:
            self._update(self._endpoint, endpoint_id, values, ts)
            self._remerge(endpoint_id)
        self._collect_young()

    def _collect_young(self) -> None:
        """Run the young-generation collection every ``YOUNG_BATCH`` merged readings made, here.

        An update replaces objects rather than adding them, so allocations minus frees stay
        level and the collector's own trigger never fires while telemetry churns: the fresh
        readings pile up in the young generation until some decision's allocations trip it and
        pay for scanning all of them. Collecting here bounds that scan (to ``YOUNG_BATCH``
        readings, a few milliseconds) and puts it on the telemetry path; the readings are then
        untracked (tuples of untracked things) and no later collection sees them again.
        """
        if self._fresh >= YOUNG_BATCH:
            self._fresh = 0
            # Twice: a pass may meet a reading before the tuples inside it and keep it tracked; the
            # second pass (over generation 1, where the first moved it) then untracks it.
            gc.collect(0)
            gc.collect(1)

    def _update(self, table: _Targets, key: str, values: Mapping[str, float], ts: float | None) -> None:
        now = self.now()
        stamp = now if ts is None else float(ts)
        if not stamp <= now:  # a stamp in the future (or NaN) would outrank every later sample
            if not stamp <= now + self.max_clock_skew_s:
                dropped = sum(1 for v in values.values() if v == v)
                self.rejected += dropped
                self._warn.warning(("future", key), "telemetry for %s: dropped %d value(s) stamped %.1f s after now "
                              "(allowance %g s)", key, dropped, stamp - now, self.max_clock_skew_s)
                return
            stamp = now  # clock skew within the allowance: the value is as fresh as can be, no fresher
        new_values, new_stamps = dict(table.values.get(key, _NONE)), dict(table.stamps.get(key, _NONE))
        for name, value in values.items():
            if not usable_for(name, value):
                if value == value:  # negative, infinite or over its ceiling: unusable (NaN: no value)
                    self.rejected += 1
                    self._warn.warning(("value", key, name), "telemetry for %s: dropped %s = %r (%s)", key, name,
                                  value, value_rule(name))
                continue
            old = new_stamps.get(name)
            if old is None or old <= stamp:  # never let an older sample overwrite a newer one
                new_values[name] = float(value)
                new_stamps[name] = stamp
        table.values[key], table.stamps[key] = new_values, new_stamps  # readers hold the lock too
        self.updates += 1

    def _remerge(self, endpoint_id: str) -> None:
        node = self._node_of.get(endpoint_id, "")
        values = {**self._node.values.get(node, _NONE), **self._endpoint.values.get(endpoint_id, _NONE)}
        stamps = {**self._node.stamps.get(node, _NONE), **self._endpoint.stamps.get(endpoint_id, _NONE)}
        names = tuple(values)
        stamp_row = tuple(map(stamps.__getitem__, names))
        m = self._merged[endpoint_id] = (names, tuple(values.values()), stamp_row,
                                         min(stamp_row) if stamp_row else math.inf)
        self._fresh += 1
        row = self._rows.get(endpoint_id)
        if row is not None:
            self._row_merged[row] = m
            self._row_values[row] = dense_row(values)
            self._row_stamps[row] = dense_row(stamps)

    def rows_of(self, endpoint_ids: Sequence[str]) -> npt.NDArray[np.intp]:
        """Stable row numbers of ``endpoint_ids`` for :meth:`batch` (callers cache them)."""
        with self._lock:
            new = [e for e in dict.fromkeys(endpoint_ids) if e not in self._rows]
            if new:
                start = len(self._rows)
                grow = len(new)
                self._row_merged = np.concatenate((self._row_merged, np.empty(grow, dtype=object)))
                self._row_values = np.concatenate((self._row_values, np.full((grow, len(CANONICAL)), np.nan)))
                self._row_stamps = np.concatenate((self._row_stamps, np.full((grow, len(CANONICAL)), np.nan)))
                for k, e in enumerate(new):
                    row = self._rows[e] = start + k
                    m = self._merged.get(e, _EMPTY)
                    self._row_merged[row] = m
                    self._row_values[row], self._row_stamps[row] = dense_rows(m)
            return np.array([self._rows[e] for e in endpoint_ids], dtype=np.intp)

    def ingest_exposition(self, text: str, *, node_id: str = "", endpoint_id: str = "",
                          ts: float | None = None) -> int:
        """Parse exposition text scraped from one target and store what it says; returns the values stored.

        Values are stamped ``ts`` (default: now), or older: see :meth:`ingest_samples`.
        """
        return self.ingest_samples(parse_exposition(text), node_id=node_id, endpoint_id=endpoint_id, ts=ts)

    def ingest_samples(self, samples: Sequence[Sample], *, node_id: str = "", endpoint_id: str = "",
                       ts: float | None = None) -> int:
        """Store parsed exposition samples from one target; returns the values stored (usable, of kept series).

        Samples of kept series with a negative or infinite value are dropped before series are
        combined (one would skew a sum over engines), counted in ``rejected`` and logged (once a minute
        per target at most: :mod:`decision.log_throttle`).

        A value is stamped ``ts`` (default: now) unless its lines carry an older timestamp of their
        own (a relay, a federation endpoint): then the oldest of those, so a value keeps its age. A
        line's timestamp never makes a value fresher than ``ts``, so an exporter's clock cannot
        stamp one in the future.
        """
        bad = unusable_samples(samples)
        if bad:
            with self._lock:
                self.rejected += len(bad)
            source = node_id or endpoint_id or "?"
            self._warn.warning(("samples", source), "telemetry from %s: dropped %d unusable sample(s), e.g. %s = %r "
                          "(%s)", source, len(bad), bad[0].name, bad[0].value, value_rule(bad[0].name))
        series = series_counters(samples)
        node_vals, ep_vals = canonicalize(samples, _totals(series))
        if endpoint_id:
            self._interval_means(endpoint_id, series, ep_vals)
        lines = line_stamps(samples)
        base = (self.now() if ts is None else ts) if lines else ts
        if node_vals:
            target = node_id or (self._node_of.get(endpoint_id, "") if endpoint_id else "")
            if target:
                for stamp, vals in _by_stamp(node_vals, lines, base):
                    self.update_node(target, vals, stamp)
        if ep_vals and endpoint_id:
            for stamp, vals in _by_stamp(ep_vals, lines, base):
                self.update_endpoint(endpoint_id, vals, stamp)
        return sum(1 for s in samples if s.name in KEPT_EXPORTER_METRICS and usable_for(s.name, s.value))

    def _interval_means(self, endpoint_id: str, counters: Mapping[str, Mapping[Series, tuple[float, float]]],
                        ep_vals: dict[str, float]) -> None:
        """Replace lifetime means in ``ep_vals`` by means over the interval since this endpoint's
        previous ``counters``, series by series (a mean with no request in between is left out:
        the last one ages)."""
        if not counters:
            return
        with self._lock:
            before = {c: self._counters.get((endpoint_id, c)) for c in counters}
            for c, pair in counters.items():
                self._counters[(endpoint_id, c)] = pair
        for c, pair in counters.items():
            mean = interval_mean(before[c], pair)
            if mean is None:
                ep_vals.pop(c, None)
            else:
                ep_vals[c] = mean

    def reading(self, endpoint_id: str, now: float | None = None) -> TelemetryReading:
        t = self.now() if now is None else now
        return _reading(endpoint_id, self._merged.get(endpoint_id, _EMPTY), t, self.stale_after_s)

    def batch(self, endpoint_ids: Sequence[str], now: float | None = None,
              rows: npt.NDArray[np.intp] | None = None) -> TelemetryBatch:
        """The readings of ``endpoint_ids`` at one instant, as arrays (see :class:`TelemetryBatch`).

        With ``rows`` (from :meth:`rows_of` for the same ids) this copies rows of arrays the
        writers keep current, instead of gathering per endpoint.
        """
        t = self.now() if now is None else now
        if rows is None:
            get = self._merged.get
            return TelemetryBatch(endpoint_ids, [get(e, _EMPTY) for e in endpoint_ids], t, self.stale_after_s)
        with self._lock:  # one consistent instant: objects and arrays from the same writes
            merged: list[Merged] = self._row_merged[rows].tolist()
            values = self._row_values[rows]
            stamps = self._row_stamps[rows]
        ages = mask_stale(values, stamps, t, self.stale_after_s)
        return TelemetryBatch(endpoint_ids, merged, t, self.stale_after_s, (values, stamps, ages))

    def snapshot(self, endpoint_ids: Iterable[str], now: float | None = None) -> dict[str, TelemetryReading]:
        t = self.now() if now is None else now
        return {e: self.reading(e, t) for e in endpoint_ids}

    def known_endpoints(self) -> int:
        return len(self._endpoint.values)

def canonical_name(metric: str) -> tuple[str, bool] | None:
    """(canonical name, is node-level) for a canonical or exporter metric name; None if unknown."""
    if metric in CANONICAL:
        return metric, metric in NODE_LEVEL
    if metric in _NODE_METRICS:
        return _NODE_METRICS[metric][0], True
    if metric in _ENDPOINT_METRICS:
        return _ENDPOINT_METRICS[metric][0], False
    return None
