"""A SIMULATED world for the demo: request mix, outcomes and telemetry of the demo fleet.

There are no GPUs on this machine, so the demo's backends are simulated here (and only here):
each endpoint has a load that rises with the requests routed to it and decays, a hidden
per-site slowdown the heuristics cannot see, and a TTFT drawn around what its load implies.
The decision service itself is the real one, driven over real gRPC.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

from decision.fleet import Fleet

TENANTS = (("acme", "premium"), ("globex", "standard"), ("initech", "free"), ("umbrella", "standard"))
FAMILIES = (("llama", 0.55), ("qwen", 0.25), ("llava", 0.1), ("sdxl", 0.1))
REGIONS = ("eu-west", "eu-central", "us-east", "us-west")


@dataclass
class DemoWorld:
    fleet: Fleet
    seed: int = 7
    rng: random.Random = field(init=False)
    load: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    site_slowdown: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        for i, site in enumerate(sorted(self.fleet.sites)):
            # One datacenter is secretly degraded (thermal throttling the telemetry does not show).
            self.site_slowdown[site] = 2.5 if i == 2 else 1.0

    def request(self, n: int) -> dict[str, object]:
        r = self.rng
        tenant, tier = TENANTS[r.randrange(len(TENANTS))]
        family = r.choices([f for f, _ in FAMILIES], [w for _, w in FAMILIES])[0]
        region = REGIONS[r.randrange(len(REGIONS))]
        eu = region.startswith("eu")
        req: dict[str, object] = {
            "request_id": f"demo-{n}", "tenant": tenant, "user_tier": tier, "model_family": family,
            "modality": {"sdxl": "image", "llava": "multimodal"}.get(family, "text"),
            "prompt_class": "medical" if r.random() < 0.05 else "general",
            "estimated_input_tokens": int(r.lognormvariate(6.0, 0.8)),
            "expected_output_tokens": int(r.lognormvariate(5.0, 0.6)),
            "client_region": region, "session_id": f"s{r.randrange(200)}", "ttft_target_ms": 400.0,
            "data_class": "personal" if eu and r.random() < 0.4 else ("phi" if r.random() < 0.03 else "public"),
        }
        if eu and r.random() < 0.5:
            req["allowed_jurisdictions"] = ["EU"]
        return req

    def _decayed_load(self, endpoint_id: str, now: float) -> float:
        load = self.load.get(endpoint_id, 0.0)
        dt = now - self.last.get(endpoint_id, now)
        return load * math.exp(-dt / 2.0)  # in-flight work drains with a ~2 s time constant

    def outcome(self, endpoint_id: str, client_region: str, in_tokens: int, out_tokens: int,
                ) -> tuple[str, float, float]:
        """(status, ttft_ms, latency_ms) for a request routed to ``endpoint_id``; updates its load.

        The world's own model (the prompt's prefill at the endpoint's rate, the round trip, crowding,
        the hidden slowdown), never the decision's estimate: the service learns from these outcomes,
        so they must not echo what it expected.
        """
        now = time.monotonic()
        ep = self.fleet.by_id[endpoint_id]
        load = self._decayed_load(endpoint_id, now) + 1.0
        self.load[endpoint_id], self.last[endpoint_id] = load, now
        crowding = 1.0 + max(0.0, load / max(1, ep.max_concurrency) - 0.5) * 3.0
        work_ms = 1000.0 * max(1, in_tokens) / ep.prefill_tokens_per_s
        ttft = (work_ms * self.site_slowdown[ep.site_id] * crowding * self.rng.lognormvariate(0, 0.2)
                + self.fleet.topology.rtt_ms(client_region, ep.site_id))
        if self.rng.random() < 0.01 * crowding:
            return "error", 0.0, ttft
        latency = ttft + 1000.0 * out_tokens / ep.decode_tokens_per_s
        return "ok", ttft, latency

    def telemetry(self, now_ms: int) -> list[tuple[str, str, float]]:
        """(endpoint_id, metric, value) samples as a vLLM exporter would report them."""
        now = time.monotonic()
        out: list[tuple[str, str, float]] = []
        for ep in self.fleet.endpoints:
            load = self._decayed_load(ep.endpoint_id, now)
            running = min(load, ep.max_concurrency)
            out.append((ep.endpoint_id, "vllm:num_requests_running", round(running)))
            out.append((ep.endpoint_id, "vllm:num_requests_waiting", round(max(0.0, load - running))))
            out.append((ep.endpoint_id, "vllm:kv_cache_usage_perc", min(1.0, running / ep.max_concurrency)))
        return out
