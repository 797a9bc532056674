"""Per-endpoint service parameters for the simulator, derived from the cited GPU profiles.

The continuous-batching model (see :mod:`sim.node`) needs, per endpoint: prefill throughput,
per-sequence decode rate at batch size 1 and how fast it falls with the batch, the concurrency
and KV-cache capacity, and the price and power. Everything comes from
:mod:`decision.gpu_profiles` (datasheet numbers, sim/GPU_PROFILES.md) and the inventory.
"""

from __future__ import annotations

from dataclasses import dataclass

from decision.domain import Endpoint
from decision.gpu_profiles import profile

KV_BYTES_PER_TOKEN_8B = 131072.0  # Llama-3-8B: 32 layers x 8 KV heads x 128 dims x (K,V) x 2 bytes
MEMORY_USABLE = 0.9  # vLLM's default gpu_memory_utilization
NOMINAL_CONTEXT_TOKENS = 1024.0  # context length at which the batch slow-down is evaluated
PREFILL_EFFICIENCY = 0.4  # fraction of dense FP16 peak reached in prefill (also in gpu_profiles)
DECODE_BW_EFFICIENCY = 0.65  # fraction of memory bandwidth reached in decode
IDLE_POWER_FRACTION = 0.3  # an idle, powered GPU draws ~30% of its TDP


def kv_bytes_per_token(params_b: float) -> float:
    """KV-cache bytes per token; grows sub-linearly with size thanks to grouped-query attention.

    >>> round(kv_bytes_per_token(8.0))
    131072
    """
    return float(KV_BYTES_PER_TOKEN_8B * (params_b / 8.0) ** 0.45)


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

    Step time of a decode iteration is ``W/BW + b x (ctx x kv/BW + 2P/FLOPS)``: the weights are
    read once per step, each sequence adds its KV-cache read and its compute. ``batch_half`` is
    the batch size at which the per-sequence rate has halved.
    """
    p = profile(ep.gpu_type)
    share = 1.0 / max(1, sharing)
    bw = max(p.memory_bw_gbps, 1.0) * 1e9 * DECODE_BW_EFFICIENCY * ep.gpu_count
    flops = max(p.tflops_fp16, 1.0) * 1e12 * PREFILL_EFFICIENCY * ep.gpu_count
    kv = kv_bytes_per_token(params_b)
    weights_s = params_b * 2e9 / bw
    per_seq_s = NOMINAL_CONTEXT_TOKENS * kv / bw + 2.0 * params_b * 1e9 / flops
    memory = p.memory_gb * 1e9 * ep.gpu_count * MEMORY_USABLE - params_b * 2e9
    kv_tokens = max(4096, int(memory / kv))
    return ServiceParams(
        prefill_tps=ep.prefill_tokens_per_s * share,
        decode_tps1=ep.decode_tokens_per_s * (share ** 0.5),
        batch_half=max(4.0, weights_s / per_seq_s),
        max_concurrency=ep.max_concurrency,
        kv_capacity_tokens=int(kv_tokens * share),
        usd_per_s=ep.gpu_hour_usd * ep.gpu_count * share / 3600.0,
        watts=ep.watts_per_gpu * ep.gpu_count * share,
        cold_start_s=ep.cold_start_ms / 1000.0,
        warm=ep.warm,
    )
