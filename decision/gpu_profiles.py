"""Nominal GPU throughput per type, used for expected-TTFT estimates and by the simulator.

Numbers are for an ~8B-parameter dense model in FP16/BF16 on one GPU with vLLM-style continuous
batching; they scale inversely with model size. They are derived from the vendors' datasheet
peak FLOPS and memory bandwidth with stated efficiencies (prefill: 40% of dense FP16 peak over
2 x params FLOPs per token; decode at batch 1: 65% of memory bandwidth over the weight bytes).
sim/GPU_PROFILES.md lists every number with its public source and the derivation.
"""

from __future__ import annotations

from dataclasses import dataclass


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
