"""The learners' feature vector: request x candidate endpoint x telemetry x topology.

:class:`RouteFeatures` implements :class:`decision.contracts.FeatureBuilder`. Every feature is a
float in a small, fixed range, so a linear model's weights are comparable and its ridge prior is
sensible. Times are relative to the request's TTFT target (``target`` below: the request's
``ttft_target_ms``, else ``default_target_ms``), so one model serves requests with different
targets. Unknown telemetry (never reported, or older than the store's staleness limit) takes the
neutral value given below and raises ``telemetry_unknown``; it is never silently trusted.

=====================  ==========================================================================
name                   meaning (range)
=====================  ==========================================================================
bias                   constant 1
ttft_ratio             scorer's expected TTFT / target, clipped to [0, 5]
queue_ratio            expected queue wait / target, clipped to [0, 5]
rtt_ratio              network RTT from the client's region / target, clipped to [0, 5]
kv_cache               KV-cache usage fraction [0, 1] (unknown: 0.5)
gpu_util               GPU utilisation / 100 [0, 1] (unknown: 0.5)
mem_pressure           framebuffer used / (used + free) [0, 1] (unknown: 0.5)
temperature            (hottest GPU C - 30) / 60, clipped to [0, 1.5] (unknown: 0.5)
power                  power draw / (watts per GPU x GPUs), clipped to [0, 1.5] (unknown: 0.5)
telemetry_age          age of the oldest value / ``stale_after_s``, clipped to [0, 1]; 1 if none
telemetry_unknown      1 when no telemetry value is known for the endpoint
cold                   1 when the model is not warm on the node (cold start expected)
affinity               1 when the session's consistent-hash bucket equals the endpoint's (prefix
                       cache likely warm for this session); 0 without a session id
same_region            1 when the endpoint is in the client's region
tier_datacenter        tier one-hot (3 columns)
tier_edge
tier_device
gpu_h100               GPU type one-hot (5 columns; an unknown type is all zeros)
gpu_a100
gpu_l40s
gpu_l4
gpu_npu
cost_ratio             expected $ per 1K tokens / budget (the request's max, else ``cost_ref``),
                       clipped to [0, 5]
input_size             log1p(estimated input tokens) / log1p(32768), clipped to [0, 1.5]
output_size            log1p(expected output tokens) / log1p(32768), clipped to [0, 1.5]
mod_text               request modality one-hot (4 columns)
mod_image
mod_multimodal
mod_embedding
ttft_x_input           ttft_ratio x input_size (long prompts on slow prefill)
queue_x_kv             queue_ratio x kv_cache (queues that KV pressure will not drain)
edge_x_input           tier_edge x input_size (small GPUs with long prompts)
site_0 .. site_{B-1}   hashed site id one-hot (``site_buckets`` columns; default 8): lets a linear
                       model learn per-site effects that telemetry does not show (a slow site)
=====================  ==========================================================================

Speed: the endpoint-only part (tier, GPU type, site bucket, cold, power capacity) is cached per
endpoint object and per placement; the rest is computed for all candidates in one pass in C
(:func:`decision._kernels.route_features`, checked against a numpy transcription of this table
in ``tests/test_kernels.py``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

from decision import _kernels
from decision.bounded import put_bounded
from decision.candidates import CandidateSet, Placement
from decision.domain import Candidate, Endpoint, Estimates, RequestContext
from decision.telemetry import (
    CANONICAL,
    FB_FREE_MIB,
    FB_USED_MIB,
    GPU_TEMP_C,
    GPU_UTIL,
    KV_CACHE_USAGE,
    POWER_W,
)

_GPUS: tuple[str, ...] = ("H100", "A100", "L40S", "L4", "NPU")
_TIERS: tuple[str, ...] = ("datacenter", "edge", "device")
_MODALITIES: tuple[str, ...] = ("text", "image", "multimodal", "embedding")
_LOG_TOKENS = math.log1p(32768.0)
_MODALITY_INDEX: dict[str, int] = {m: i for i, m in enumerate(_MODALITIES)}
_STATIC_COLS = 11  # cold, 3 tiers, 5 GPU types, power capacity, affinity bucket
_COL: dict[str, int] = {name: i for i, name in enumerate(CANONICAL)}
# What the kernel reads of a telemetry row: its width, then the columns it uses.
_TEL_COLS: tuple[int, int, int, int, int, int, int] = (
    len(CANONICAL), _COL[KV_CACHE_USAGE], _COL[GPU_UTIL], _COL[FB_USED_MIB], _COL[FB_FREE_MIB], _COL[POWER_W],
    _COL[GPU_TEMP_C])
FloatArray = NDArray[np.float64]


BASE_NAMES: tuple[str, ...] = (
    "bias", "ttft_ratio", "queue_ratio", "rtt_ratio", "kv_cache", "gpu_util", "mem_pressure",
    "temperature", "power", "telemetry_age", "telemetry_unknown", "cold", "affinity", "same_region",
    "tier_datacenter", "tier_edge", "tier_device",
    "gpu_h100", "gpu_a100", "gpu_l40s", "gpu_l4", "gpu_npu",
    "cost_ratio", "input_size", "output_size",
    "mod_text", "mod_image", "mod_multimodal", "mod_embedding",
    "ttft_x_input", "queue_x_kv", "edge_x_input",
)


def stable_bucket(text: str, buckets: int) -> int:
    """A bucket in ``[0, buckets)`` that is the same in every process (unlike ``hash``).

    >>> stable_bucket("eu-west-dc1", 8) == stable_bucket("eu-west-dc1", 8)
    True
    """
    return zlib.crc32(text.encode()) % buckets


class RouteFeatures:
    """The documented feature vector of the module docstring, built for all candidates at once.

    Parameters
    ----------
    site_buckets
        Number of hashed site columns (0 disables them).
    affinity_buckets
        Number of consistent-hash buckets sessions and endpoints are spread over.
    default_target_ms
        TTFT target used when a request gives none.
    cost_ref
        $ per 1K tokens that ``cost_ratio`` divides by when a request gives no budget.
    stale_after_s
        Telemetry age that counts as fully stale (the telemetry store's limit).

    Examples
    --------
    The score stage calls :meth:`build_matrix`; its output carries the matrix:

    >>> from decision.domain import Candidate, RequestContext, TelemetryReading
    >>> from decision.scoring import score_candidates
    >>> from learners.testing import toy_endpoint
    >>> cand = Candidate(toy_endpoint(0), TelemetryReading("ep0", {"kv_cache_usage": 0.25},
    ...                  {"kv_cache_usage": 3.0}), 10.0)
    >>> fb = RouteFeatures(site_buckets=4)
    >>> arms = score_candidates(RequestContext("r", "t", ttft_target_ms=200.0), [cand], fb, {})
    >>> arms.matrix.shape == (1, len(fb.names))
    True
    >>> row = dict(zip(fb.names, arms.matrix[0].tolist()))
    >>> row["kv_cache"], row["telemetry_age"], row["ttft_ratio"] == min(float(arms.ttft_ms[0]) / 200.0, 5.0)
    (0.25, 0.1, True)
    """

    def __init__(self, site_buckets: int = 8, affinity_buckets: int = 8, default_target_ms: float = 500.0,
                 cost_ref: float = 0.001, stale_after_s: float = 30.0) -> None:
        self.site_buckets = site_buckets
        self.affinity_buckets = affinity_buckets
        self.default_target_ms = default_target_ms
        self.cost_ref = cost_ref
        self.stale_after_s = stale_after_s
        self.names: tuple[str, ...] = BASE_NAMES + tuple(f"site_{i}" for i in range(site_buckets))
        # id(endpoint) -> (endpoint, static row, region); the row is
        # [cold, tier one-hot (3), GPU one-hot (5), power capacity W, affinity bucket, site one-hot (B)]
        self._static: dict[int, tuple[Endpoint, tuple[float, ...], str]] = {}
        # id(placement) -> (placement, its endpoints' static rows as a matrix, their regions,
        # client region -> 1.0 where the endpoint is in it)
        self._blocks: dict[int, tuple[Placement, FloatArray, npt.NDArray[np.str_], dict[str, FloatArray]]] = {}

    def _endpoint_part(self, ep: Endpoint) -> tuple[Endpoint, tuple[float, ...], str]:
        hit = self._static.get(id(ep))
        if hit is not None and hit[0] is ep:
            return hit
        sites = [0.0] * self.site_buckets
        if self.site_buckets:
            sites[stable_bucket(ep.site_id, self.site_buckets)] = 1.0
        row = (0.0 if ep.warm else 1.0, *(1.0 if ep.tier == t else 0.0 for t in _TIERS),
               *(1.0 if ep.gpu_type == g else 0.0 for g in _GPUS), float(ep.watts_per_gpu * max(1, ep.gpu_count)),
               float(stable_bucket(ep.endpoint_id, self.affinity_buckets)), *sites)
        entry = (ep, row, ep.region)
        # Bounded: a fleet reload leaves old endpoint objects behind.
        return put_bounded(self._static, id(ep), entry, 1_000_000)

    def _static_block(self, candidates: Sequence[Candidate], client: str) -> tuple[FloatArray, FloatArray]:
        """The endpoint-only columns, and 1.0 where the endpoint is in the ``client`` region; per
        placement (shared by its decisions) when located."""
        width = _STATIC_COLS + self.site_buckets
        if isinstance(candidates, CandidateSet):
            p = candidates.placement
            hit = self._blocks.get(id(p))
            if hit is None or hit[0] is not p:
                parts = [self._endpoint_part(e) for e in p.endpoints]
                block = np.array([q[1] for q in parts], dtype=np.float64).reshape(len(parts), width)
                hit = put_bounded(self._blocks, id(p), (p, block, np.array([q[2] for q in parts], dtype=np.str_), {}),
                                  65536)
            same = hit[3].get(client)
            if same is None:
                same = hit[3][client] = _same_region(hit[2], client)
            return candidates.column(hit[1]), candidates.column(same)
        parts = [self._endpoint_part(c.endpoint) for c in candidates]
        return (np.array([q[1] for q in parts], dtype=np.float64).reshape(len(parts), width),
                _same_region(np.array([q[2] for q in parts], dtype=np.str_), client))

    def build_matrix(self, ctx: RequestContext, candidates: Sequence[Candidate], est: Estimates) -> FloatArray:
        """The feature matrix: one row per candidate, columns in :attr:`names` order (computed by
        :func:`decision._kernels.route_features`, one pass in C, as the module docstring says)."""
        n = len(candidates)
        S, same_region = self._static_block(candidates, ctx.client_region)
        target = ctx.ttft_target_ms if ctx.ttft_target_ms > 0 else self.default_target_ms
        budget = ctx.max_cost_per_1k_tokens if ctx.max_cost_per_1k_tokens > 0 else self.cost_ref
        size_in = min(max(math.log1p(max(0, ctx.estimated_input_tokens)) / _LOG_TOKENS, 0.0), 1.5)
        size_out = min(max(math.log1p(max(0, ctx.expected_output_tokens)) / _LOG_TOKENS, 0.0), 1.5)
        session = stable_bucket(ctx.session_id, self.affinity_buckets) if ctx.session_id else -1
        modality = _MODALITY_INDEX.get(ctx.modality, -1)
        X = np.empty((n, len(self.names)), dtype=np.float64)
        c = np.ascontiguousarray
        _kernels.route_features(c(S), c(est.telemetry), c(est.ttft_ms), c(est.queue_ms), c(est.cost_per_1k),
                                c(est.rtt_ms), c(est.max_age_s), same_region,
                                X, *_TEL_COLS, session, modality, self.site_buckets, float(target), float(budget),
                                size_in, size_out, float(self.stale_after_s))
        return X


def _same_region(regions: npt.NDArray[np.str_], client: str) -> FloatArray:
    """1.0 where ``regions`` is the client's region (all 0.0 without one)."""
    if not client:
        return np.zeros(len(regions))
    return np.asarray(regions == client, dtype=np.float64)


def default_feature_builder() -> RouteFeatures:
    """The feature builder the service uses unless configured otherwise."""
    return RouteFeatures()


FEATURE_NAMES: tuple[str, ...] = RouteFeatures().names
