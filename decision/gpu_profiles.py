"""Nominal GPU throughput per type, used for expected-TTFT estimates and by the simulator.

Numbers are for an ~8B-parameter dense model in FP16/BF16 on one GPU with vLLM-style continuous
batching; they scale inversely with model size. Sources are listed in sim/GPU_PROFILES.md.
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


PROFILES: dict[str, GpuProfile] = {
    p.gpu_type: p
    for p in (
        GpuProfile("H100", 24000.0, 130.0, 80.0, 700.0),
        GpuProfile("A100", 12000.0, 85.0, 80.0, 400.0),
        GpuProfile("L40S", 8000.0, 60.0, 48.0, 350.0),
        GpuProfile("L4", 3000.0, 30.0, 24.0, 72.0),
        GpuProfile("NPU", 600.0, 12.0, 16.0, 15.0),
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
