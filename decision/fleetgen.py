"""Synthetic fleet inventories: the demo fleet, and large fleets for benchmarks and property tests.

The generator emits the same mapping a YAML inventory parses to, so everything downstream
(validation, the index, the simulator) treats a generated fleet exactly like a hand-written one.
"""

from __future__ import annotations

import random
from typing import Any

import yaml

REGIONS: tuple[tuple[str, str], ...] = (
    ("eu-west", "EU"), ("eu-central", "EU"), ("us-east", "US"), ("us-west", "US"),
)

# (name, family, modality, safety_tier, params_b)
MODELS: tuple[tuple[str, str, str, str, float], ...] = (
    ("llama-3.1-8b", "llama", "text", "general", 8.0),
    ("llama-3.1-70b", "llama", "text", "strict", 70.0),
    ("llama-3.2-3b", "llama", "text", "general", 3.0),
    ("qwen-2.5-7b", "qwen", "text", "general", 7.0),
    ("qwen-2.5-32b", "qwen", "text", "strict", 32.0),
    ("sdxl-1.0", "sdxl", "image", "general", 3.5),
    ("llava-1.6-13b", "llava", "multimodal", "general", 13.0),
)

# Per tier: (gpu_type, gpu_count, $/GPU-hour, watts per GPU, models deployed on such a node)
_DC_NODES = (
    ("H100", 8, 3.2, 700.0, ("llama-3.1-70b", "qwen-2.5-32b", "llama-3.1-8b")),
    ("A100", 4, 1.9, 400.0, ("llama-3.1-8b", "qwen-2.5-7b", "sdxl-1.0", "llava-1.6-13b")),
    ("L40S", 2, 1.1, 350.0, ("llama-3.1-8b", "qwen-2.5-7b")),
)
_EDGE_NODES = (
    ("L4", 1, 0.7, 72.0, ("llama-3.2-3b", "llama-3.1-8b")),
    ("L4", 1, 0.7, 72.0, ("llama-3.2-3b", "qwen-2.5-7b")),
)


def demo_fleet() -> dict[str, Any]:
    """The demo inventory: 3 tiers over 4 regions and 2 jurisdictions, ~60 endpoints."""
    sites: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    deployments: list[dict[str, Any]] = []
    ip = 10

    def deploy(node_id: str, model: str, conc: int, warm: bool = True) -> None:
        nonlocal ip
        deployments.append({"id": f"{node_id}/{model}", "node": node_id, "model": model,
                            "address": f"10.{ip // 250}.{ip % 250}.{len(deployments) % 250 + 1}:8000",
                            "runtime": "triton" if model.startswith("sdxl") else "vllm",
                            "max_concurrency": conc, "warm": warm})
        ip += 1

    for r_i, (region, juris) in enumerate(REGIONS):
        dc, edge = f"{region}-dc1", f"{region}-edge1"
        certs = ["iso27001", "hipaa"] if r_i % 2 == 0 else ["iso27001"]
        sites.append({"id": dc, "region": region, "jurisdiction": juris, "tier": "datacenter",
                      "certifications": certs})
        sites.append({"id": edge, "region": region, "jurisdiction": juris, "tier": "edge",
                      "certifications": []})
        links.append({"a": region, "b": dc, "rtt_ms": 8.0 + 2 * r_i, "bandwidth_gbps": 100.0,
                      "egress_usd_per_gb": 0.02})
        links.append({"a": region, "b": edge, "rtt_ms": 2.0, "bandwidth_gbps": 10.0,
                      "egress_usd_per_gb": 0.01})
        for n_i, (gpu, count, price, watts, models) in enumerate(_DC_NODES):
            nid = f"{dc}-n{n_i}"
            nodes.append({"id": nid, "site": dc, "gpu_type": gpu, "gpu_count": count,
                          "gpu_hour_usd": price, "watts_per_gpu": watts})
            for m_i, m in enumerate(models):
                deploy(nid, m, 64 if gpu == "H100" else 32, warm=not (m_i == 2 and r_i == 3))
        for n_i, (gpu, count, price, watts, models) in enumerate(_EDGE_NODES):
            nid = f"{edge}-n{n_i}"
            nodes.append({"id": nid, "site": edge, "gpu_type": gpu, "gpu_count": count,
                          "gpu_hour_usd": price, "watts_per_gpu": watts})
            for m in models:
                deploy(nid, m, 8)
    # Cross-region links: within a jurisdiction close, across the Atlantic far.
    for i, (ra, ja) in enumerate(REGIONS):
        for rb, jb in REGIONS[i + 1:]:
            links.append({"a": ra, "b": rb, "rtt_ms": 18.0 if ja == jb else 85.0,
                          "bandwidth_gbps": 40.0, "egress_usd_per_gb": 0.02 if ja == jb else 0.08})
    for d_i, (region, juris) in enumerate((REGIONS[0], REGIONS[2])):
        site = f"acme-device-{d_i}"
        sites.append({"id": site, "region": region, "jurisdiction": juris, "tier": "device",
                      "certifications": [], "owner_tenant": "acme"})
        links.append({"a": region, "b": site, "rtt_ms": 1.0, "bandwidth_gbps": 1.0, "egress_usd_per_gb": 0.0})
        for n_i in range(2):
            nid = f"{site}-npu{n_i}"
            nodes.append({"id": nid, "site": site, "gpu_type": "NPU", "gpu_count": 1,
                          "gpu_hour_usd": 0.05, "watts_per_gpu": 15.0})
            deploy(nid, "llama-3.2-3b", 2)
    catalogue = [{"name": n, "family": f, "modality": mo, "safety_tier": st, "params_b": p}
                 for n, f, mo, st, p in MODELS]
    return {"version": 1, "default_rtt_ms": 120.0, "intra_region_rtt_ms": 3.0, "sites": sites,
            "links": links, "nodes": nodes, "models": catalogue, "deployments": deployments}


def synthetic_fleet(endpoints: int, *, per_model: int = 64, seed: int = 0,
                    regions: int = 8) -> dict[str, Any]:
    """A large fleet of ``endpoints`` endpoints, ``per_model`` of them serving each model.

    Used by ``infermesh bench decide`` and property tests: the locate stage then returns
    ``per_model`` candidates whatever the fleet size.
    """
    rng = random.Random(seed)
    gpus = (("H100", 3.2, 700.0), ("A100", 1.9, 400.0), ("L40S", 1.1, 350.0), ("L4", 0.7, 72.0))
    region_names = [f"r{i}" for i in range(regions)]
    sites: list[dict[str, Any]] = []
    for i, region in enumerate(region_names):
        juris = "EU" if i % 2 == 0 else "US"
        sites.append({"id": f"{region}-dc", "region": region, "jurisdiction": juris, "tier": "datacenter",
                      "certifications": ["iso27001", "hipaa"] if i % 4 == 0 else ["iso27001"]})
        sites.append({"id": f"{region}-edge", "region": region, "jurisdiction": juris, "tier": "edge",
                      "certifications": []})
    links = [{"a": a, "b": b, "rtt_ms": float(rng.randint(10, 120)), "bandwidth_gbps": 40.0,
              "egress_usd_per_gb": 0.02} for i, a in enumerate(region_names) for b in region_names[i + 1:]]
    n_models = max(1, endpoints // per_model)
    models = [{"name": f"model-{m}", "family": f"family-{m // 4}", "modality": "text",
               "safety_tier": "general", "params_b": float(rng.choice((3, 8, 13, 70)))}
              for m in range(n_models)]
    nodes: list[dict[str, Any]] = []
    deployments: list[dict[str, Any]] = []
    for e in range(endpoints):
        site = sites[rng.randrange(len(sites))]
        gpu, price, watts = gpus[3] if site["tier"] == "edge" else gpus[rng.randrange(3)]
        nid = f"n{e}"
        nodes.append({"id": nid, "site": site["id"], "gpu_type": gpu, "gpu_count": 1 if gpu == "L4" else 4,
                      "gpu_hour_usd": price, "watts_per_gpu": watts})
        deployments.append({"id": f"ep{e}", "node": nid, "model": f"model-{e % n_models}",
                            "address": f"10.{e >> 16 & 255}.{e >> 8 & 255}.{e & 255}:8000",
                            "runtime": "vllm", "max_concurrency": 32, "warm": rng.random() > 0.05})
    return {"version": 1, "default_rtt_ms": 120.0, "intra_region_rtt_ms": 3.0, "sites": sites,
            "links": links, "nodes": nodes, "models": models, "deployments": deployments}


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
