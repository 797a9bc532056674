"""Per-endpoint service parameters for the simulator, derived from the cited GPU profiles.

The continuous-batching model (see :mod:`sim.node`) needs, per endpoint: prefill throughput,
per-sequence decode rate at batch size 1 and how fast it falls with the batch, the concurrency
and KV-cache capacity, and the price and power. Everything comes from
:mod:`decision.gpu_profiles` (datasheet numbers, sim/GPU_PROFILES.md) and the inventory.
"""

from __future__ import annotations

from dataclasses import dataclass

from decision.domain import Endpoint
from decision.gpu_profiles import batch_half, kv_bytes_per_token, profile

MEMORY_USABLE = 0.9  # vLLM's default gpu_memory_utilization
IDLE_POWER_FRACTION = 0.3  # an idle, powered GPU draws ~30% of its TDP


@dataclass(frozen=True, slots=True)
class ServiceParams:
    """What the service model needs to know about one endpoint."""

    prefill_tps: float
    decode_tps1: float
    batch_half: float
    max_concurrency: int
    kv_capacity_tokens: int
    usd_per_s: float
    watts: float
    cold_start_s: float
    warm: bool

    def decode_rate(self, batch: int) -> float:
        """Per-sequence decode tokens/s with ``batch`` sequences in the running batch."""
        return self.decode_tps1 / (1.0 + (max(batch, 1) - 1) / self.batch_half)

    def capacity_rps(self, mean_in: float, mean_out: float) -> float:
        """Requests/s this endpoint sustains at full concurrency (prefill + decode time shares)."""
        conc = min(self.max_concurrency,
                   max(1, int(self.kv_capacity_tokens // max(1.0, mean_in + mean_out))))
        decode_tps = conc * self.decode_rate(conc)
        return 1.0 / (mean_in / self.prefill_tps + mean_out / decode_tps)


def service_params(ep: Endpoint, params_b: float, sharing: int = 1) -> ServiceParams:
    """Service parameters of ``ep``; ``sharing`` deployments on one node split its GPUs evenly.

    ``batch_half`` (how fast the per-sequence decode rate falls with the batch) is
    :func:`decision.gpu_profiles.batch_half`, the roofline of one decode step.
    """
    p = profile(ep.gpu_type)
    share = 1.0 / max(1, sharing)
    kv = kv_bytes_per_token(params_b)
    memory = p.memory_gb * 1e9 * ep.gpu_count * MEMORY_USABLE - params_b * 2e9
    kv_tokens = max(4096, int(memory / kv))
    return ServiceParams(
        prefill_tps=ep.prefill_tokens_per_s * share,
        decode_tps1=ep.decode_tokens_per_s * (share ** 0.5),
        batch_half=batch_half(ep.gpu_type, ep.gpu_count, params_b),
        max_concurrency=ep.max_concurrency,
        kv_capacity_tokens=int(kv_tokens * share),
        usd_per_s=ep.gpu_hour_usd * ep.gpu_count * share / 3600.0,
        watts=ep.watts_per_gpu * ep.gpu_count * share,
        cold_start_s=ep.cold_start_ms / 1000.0,
        warm=ep.warm,
    )
