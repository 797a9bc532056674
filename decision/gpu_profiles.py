"""Nominal GPU throughput per type, used for expected-TTFT estimates and by the simulator.

Numbers are for an ~8B-parameter dense model in FP16/BF16 on one GPU with vLLM-style continuous
batching; they scale inversely with model size. They are derived from the vendors' datasheet
peak FLOPS and memory bandwidth with stated efficiencies (prefill: 40% of dense FP16 peak over
2 x params FLOPs per token; decode at batch 1: 65% of memory bandwidth over the weight bytes).
sim/GPU_PROFILES.md lists every number with its public source and the derivation.
"""

from __future__ import annotations

from dataclasses import dataclass

KV_BYTES_PER_TOKEN_8B = 131072.0  # Llama-3-8B: 32 layers x 8 KV heads x 128 dims x (K,V) x 2 bytes
NOMINAL_CONTEXT_TOKENS = 1024.0  # context length at which the batch slow-down is evaluated
PREFILL_EFFICIENCY = 0.4  # fraction of dense FP16 peak reached in prefill
DECODE_BW_EFFICIENCY = 0.65  # fraction of memory bandwidth reached in decode


@dataclass(frozen=True, slots=True)
class GpuProfile:
    gpu_type: str
    prefill_tokens_per_s: float  # one GPU, 8B model, whole-batch prefill rate
    decode_tokens_per_s: float  # per sequence at batch size 1, 8B model
    memory_gb: float
    tdp_watts: float
    memory_bw_gbps: float = 0.0  # datasheet HBM/GDDR/LPDDR bandwidth, GB/s
    tflops_fp16: float = 0.0  # datasheet dense FP16/BF16 tensor peak (INT8 TOPS for the NPU)


PROFILES: dict[str, GpuProfile] = {
    p.gpu_type: p
    for p in (
        GpuProfile("H100", 24000.0, 135.0, 80.0, 700.0, 3350.0, 989.0),
        GpuProfile("A100", 7800.0, 83.0, 80.0, 400.0, 2039.0, 312.0),
        GpuProfile("L40S", 9000.0, 35.0, 48.0, 350.0, 864.0, 362.0),
        GpuProfile("L4", 3000.0, 12.0, 24.0, 72.0, 300.0, 121.0),
        # Device NPU: 4-bit weights as on-device runtimes ship them, 20% of INT8 peak for prefill.
        GpuProfile("NPU", 560.0, 10.0, 16.0, 15.0, 68.0, 45.0),
    )
}


def profile(gpu_type: str) -> GpuProfile:
    try:
        return PROFILES[gpu_type]
    except KeyError:
        raise KeyError(f"unknown gpu_type {gpu_type!r}; known: {', '.join(sorted(PROFILES))}") from None


def scaled_throughput(gpu_type: str, gpu_count: int, params_b: float) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s per sequence) for a model of ``params_b`` billion parameters.

    Tensor parallelism over ``gpu_count`` GPUs multiplies prefill; decode per sequence grows
    more slowly (communication-bound), modelled as the square root.
    """
    p = profile(gpu_type)
    size = 8.0 / max(params_b, 0.1)
    return p.prefill_tokens_per_s * size * gpu_count, p.decode_tokens_per_s * min(size, 4.0) * gpu_count**0.5


def kv_bytes_per_token(params_b: float) -> float:
    """KV-cache bytes per token; grows sub-linearly with size thanks to grouped-query attention.

    >>> round(kv_bytes_per_token(8.0))
    131072
    """
    return float(KV_BYTES_PER_TOKEN_8B * (params_b / 8.0) ** 0.45)


def batch_half(gpu_type: str, gpu_count: int, params_b: float) -> float:
    """The batch size at which a sequence's decode rate has halved (at least 4).

    A decode step reads the weights once (``W/BW``) and, per sequence, its KV cache and its
    compute (``ctx x kv/BW + 2P/FLOPS``); the per-sequence rate is ``r1 / (1 + (b - 1) / batch_half)``
    with ``batch_half`` their ratio. The simulator's service model and the score stage's queue
    estimate both use it.

    >>> round(batch_half("H100", 1, 8.0)), round(batch_half("L4", 1, 8.0))
    (72, 81)
    """
    p = profile(gpu_type)
    bw = max(p.memory_bw_gbps, 1.0) * 1e9 * DECODE_BW_EFFICIENCY * gpu_count
    flops = max(p.tflops_fp16, 1.0) * 1e12 * PREFILL_EFFICIENCY * gpu_count
    weights_s = params_b * 2e9 / bw
    per_seq_s = NOMINAL_CONTEXT_TOKENS * kv_bytes_per_token(params_b) / bw + 2.0 * params_b * 1e9 / flops
    return max(4.0, weights_s / per_seq_s)
