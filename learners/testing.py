"""Small builders of arms and contexts for doctests and tests (not used in production paths)."""

from __future__ import annotations

from collections.abc import Sequence

from decision.domain import Candidate, Endpoint, ScoredCandidate, TelemetryReading


def toy_endpoint(i: int, *, site: str = "s0", region: str = "r0", tier: str = "datacenter") -> Endpoint:
    return Endpoint(
        endpoint_id=f"ep{i}", address=f"10.0.0.{i + 1}:8000", model="m", family="f", runtime="vllm",
        max_concurrency=16, modality="text", safety_tier="general", node_id=f"n{i}", gpu_type="A100",
        gpu_count=1, gpu_hour_usd=2.0, watts_per_gpu=400.0, site_id=site, region=region,
        jurisdiction="EU", tier=tier, certifications=frozenset(), owner_tenant=None,  # type: ignore[arg-type]
        prefill_tokens_per_s=10000.0, decode_tokens_per_s=80.0, cold_start_ms=0.0, warm=True,
        nominal_cost_per_1k=2.0 / (80.0 * 16 * 3600.0) * 1000.0)


def toy_arms(ttfts: Sequence[float], features: Sequence[Sequence[float]] | None = None,
             ) -> tuple[ScoredCandidate, ...]:
    """Arms with the given expected TTFTs (and feature vectors, default ``(1, ttft_s)``)."""
    out = []
    for i, t in enumerate(ttfts):
        ep = toy_endpoint(i)
        feats = tuple(features[i]) if features is not None else (1.0, t / 1000.0)
        out.append(ScoredCandidate(Candidate(ep, TelemetryReading(ep.endpoint_id, {}, {}), 5.0), feats,
                                   t, ep.cost_per_1k_tokens(), {}))
    return tuple(out)
