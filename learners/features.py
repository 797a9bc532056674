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
endpoint object and the request-only part per request, so a candidate costs a few microseconds.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

from decision.domain import Candidate, Endpoint, RequestContext
from decision.telemetry import (
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
_Static = tuple[Endpoint, tuple[float, ...], float, int, float, str, tuple[float, ...]]

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


def _clip(x: float, hi: float) -> float:
    return 0.0 if x < 0.0 else (hi if x > hi else x)


class RouteFeatures:
    """The documented feature vector of the module docstring.

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
    >>> from decision.domain import Candidate, RequestContext, TelemetryReading
    >>> from learners.testing import toy_endpoint
    >>> ep = toy_endpoint(0)
    >>> cand = Candidate(ep, TelemetryReading("ep0", {"kv_cache_usage": 0.25}, {"kv_cache_usage": 3.0}), 10.0)
    >>> fb = RouteFeatures(site_buckets=4)
    >>> x = fb.build(RequestContext("r", "t", ttft_target_ms=200.0), cand, 100.0, 0.001, {"queue_ms": 20.0})
    >>> len(x) == len(fb.names)
    True
    >>> dict(zip(fb.names, x))["ttft_ratio"], dict(zip(fb.names, x))["kv_cache"]
    (0.5, 0.25)
    """

    def __init__(self, site_buckets: int = 8, affinity_buckets: int = 8, default_target_ms: float = 500.0,
                 cost_ref: float = 0.001, stale_after_s: float = 30.0) -> None:
        self.site_buckets = site_buckets
        self.affinity_buckets = affinity_buckets
        self.default_target_ms = default_target_ms
        self.cost_ref = cost_ref
        self.stale_after_s = stale_after_s
        self.names: tuple[str, ...] = BASE_NAMES + tuple(f"site_{i}" for i in range(site_buckets))
        # id(endpoint) -> (endpoint, tier+GPU one-hots, power capacity W, affinity bucket, is_edge, region,
        # site one-hot)
        self._static: dict[int, _Static] = {}
        self._req: tuple[RequestContext, tuple[float, ...], float, float, float, int, str] | None = None

    def _endpoint_part(self, ep: Endpoint) -> _Static:
        hit = self._static.get(id(ep))
        if hit is not None and hit[0] is ep:
            return hit
        tiers = tuple(1.0 if ep.tier == t else 0.0 for t in _TIERS)
        gpus = tuple(1.0 if ep.gpu_type == g else 0.0 for g in _GPUS)
        sites = [0.0] * self.site_buckets
        if self.site_buckets:
            sites[stable_bucket(ep.site_id, self.site_buckets)] = 1.0
        static = tiers + gpus
        entry = (ep, static, ep.watts_per_gpu * max(1, ep.gpu_count),
                 stable_bucket(ep.endpoint_id, self.affinity_buckets), tiers[1], ep.region, tuple(sites))
        if len(self._static) > 1_000_000:  # a fleet reload leaves old endpoint objects behind
            self._static.clear()
        self._static[id(ep)] = entry
        return entry

    def _request_part(self, ctx: RequestContext) -> tuple[RequestContext, tuple[float, ...], float, float,
                                                           float, int, str]:
        hit = self._req
        if hit is not None and hit[0] is ctx:
            return hit
        size_in = _clip(math.log1p(max(0, ctx.estimated_input_tokens)) / _LOG_TOKENS, 1.5)
        size_out = _clip(math.log1p(max(0, ctx.expected_output_tokens)) / _LOG_TOKENS, 1.5)
        mods = tuple(1.0 if ctx.modality == m else 0.0 for m in _MODALITIES)
        target = ctx.ttft_target_ms if ctx.ttft_target_ms > 0 else self.default_target_ms
        budget = ctx.max_cost_per_1k_tokens if ctx.max_cost_per_1k_tokens > 0 else self.cost_ref
        session = stable_bucket(ctx.session_id, self.affinity_buckets) if ctx.session_id else -1
        entry = (ctx, (size_in, size_out, *mods), 1.0 / target, 1.0 / budget, size_in, session,
                 ctx.client_region)
        self._req = entry
        return entry

    def build(self, ctx: RequestContext, candidate: Candidate, expected_ttft_ms: float,
              expected_cost_per_1k: float, components: Mapping[str, float]) -> tuple[float, ...]:
        """The feature vector of one candidate for one request, in :attr:`names` order."""
        ep = candidate.endpoint
        _, static, power_cap, ep_bucket, is_edge, region, sites = self._endpoint_part(ep)
        _, req, inv_target, inv_budget, size_in, session, client_region = self._request_part(ctx)
        tel = candidate.telemetry
        vals = tel.values
        ages = tel.ages_s
        ttft_r = _clip(expected_ttft_ms * inv_target, 5.0)
        queue_r = _clip(components.get("queue_ms", 0.0) * inv_target, 5.0)
        kv = vals.get(KV_CACHE_USAGE)
        kv = 0.5 if kv is None else _clip(kv, 1.0)
        util = vals.get(GPU_UTIL)
        util = 0.5 if util is None else _clip(util / 100.0, 1.0)
        used = vals.get(FB_USED_MIB)
        free = vals.get(FB_FREE_MIB)
        mem = 0.5 if used is None or free is None or used + free <= 0 else _clip(used / (used + free), 1.0)
        temp = vals.get(GPU_TEMP_C)
        temp = 0.5 if temp is None else _clip((temp - 30.0) / 60.0, 1.5)
        power = vals.get(POWER_W)
        power = 0.5 if power is None or power_cap <= 0 else _clip(power / power_cap, 1.5)
        age = _clip(max(ages.values()) / self.stale_after_s, 1.0) if ages else 1.0
        return (
            1.0, ttft_r, queue_r, _clip(candidate.rtt_ms * inv_target, 5.0), kv, util, mem, temp, power, age,
            0.0 if vals else 1.0, 0.0 if ep.warm else 1.0,
            1.0 if session >= 0 and session == ep_bucket else 0.0,
            1.0 if client_region and client_region == region else 0.0,
            *static, _clip(expected_cost_per_1k * inv_budget, 5.0), *req,
            ttft_r * size_in, queue_r * kv, is_edge * size_in, *sites,
        )


def default_feature_builder() -> RouteFeatures:
    """The feature builder the service uses unless configured otherwise."""
    return RouteFeatures()


FEATURE_NAMES: tuple[str, ...] = RouteFeatures().names
