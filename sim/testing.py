"""Small scenarios for tests and doctests (not used by the benchmark itself)."""

from __future__ import annotations

from typing import Any

from sim.scenario import Scenario
from sim.workload import Tenant


def tiny_scenario(*, cells: int = 2, per_cell: int = 4, rps: float = 50.0, duration: float = 20.0,
                  drain: float = 60.0, concurrency: int = 8, input_tokens: dict[str, Any] | None = None,
                  output_tokens: dict[str, Any] | None = None, tenants: list[Tenant] | None = None,
                  period: float = 0.1, delay: float = 0.0, degraded: float = 0.0, seed: int = 1) -> Scenario:
    """A small ``cells`` fleet of H100 endpoints under Poisson load."""
    fleet = {"generator": "cells", "cells": cells, "nodes_per_cell": per_cell, "gpu_type": "H100",
             "gpu_hour_usd": 2.99, "watts_per_gpu": 700, "max_concurrency": concurrency,
             "intra_rtt_ms": 0.5, "inter_rtt_ms": 25}
    workload = {"arrival": {"type": "poisson", "rps": rps},
                "input_tokens": input_tokens or {"dist": "lognormal", "mu": 3.8, "sigma": 0.6},
                "output_tokens": output_tokens or {"dist": "lognormal", "mu": 4.6, "sigma": 0.7}}
    return Scenario(name="tiny", seed=seed, duration_s=duration, drain_s=drain, family="llama", fleet=fleet,
                    workload=workload, tenants=tenants or [Tenant("t", user_tier="premium", ttft_target_ms=500.0)],
                    telemetry_period_s=period, telemetry_delay_s=(delay, delay), degraded_fraction=degraded,
                    strategies=[])
