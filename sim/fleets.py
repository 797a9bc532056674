"""Scenario fleets in the service's inventory format (a mapping that ``Fleet.from_mapping`` validates).

Two generators: ``cells`` (the whitepaper's set-up: identical GPU nodes in cells, one region per
cell) and ``tiers`` (datacenter, edge and device tiers over several regions with heterogeneous
GPUs). ``nodes`` rescales either, so the same scenario runs from 512 to a million nodes.
:func:`scenario_fleet` validates them like any inventory, except huge ones (:func:`trusted_fleet`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping
from typing import Any

from decision.fleet import DeploymentSpec, Fleet, FleetSpec, LinkSpec, ModelSpec, NodeSpec, SiteSpec

JURISDICTION = {"eu": "EU", "us": "US", "ap": "APAC"}


def _jurisdiction(region: str) -> str:
    return JURISDICTION.get(region.split("-")[0], "INTL")


def _address(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}:{8000 + (i >> 24)}"


def cells_fleet(spec: Mapping[str, Any], nodes: int | None = None) -> dict[str, Any]:
    """``cells`` x ``nodes_per_cell`` identical nodes; each cell is one region and one site."""
    per_cell = int(spec.get("nodes_per_cell", 128))
    base_cells = int(spec.get("cells", 4))
    cells = max(1, math.ceil(nodes / per_cell)) if nodes else base_cells
    total = nodes or cells * per_cell
    model, family, params = spec.get("model", "llama-3.1-8b"), spec.get("family", "llama"), spec.get("params_b", 8)
    # The base cells are the regions; a larger fleet adds cells (sites) round-robin over them, a
    # smaller one keeps only the regions it has cells in (links need sites at both ends).
    regions = [f"cell{c}" for c in range(min(base_cells, cells))]
    sites = [{"id": f"{regions[c % base_cells]}-site{c}", "region": regions[c % base_cells],
              "jurisdiction": "INTL", "tier": "datacenter"} for c in range(cells)]
    intra, inter = float(spec.get("intra_rtt_ms", 0.5)), float(spec.get("inter_rtt_ms", 25.0))
    links = [{"a": a, "b": b, "rtt_ms": inter, "bandwidth_gbps": 40.0, "egress_usd_per_gb": 0.02}
             for i, a in enumerate(regions) for b in regions[i + 1:]]
    nodes_out: list[dict[str, Any]] = []
    deps: list[dict[str, Any]] = []
    for i in range(total):
        nid = f"n{i}"
        nodes_out.append({"id": nid, "site": sites[i // per_cell]["id"], "gpu_type": spec.get("gpu_type", "H100"),
                          "gpu_count": int(spec.get("gpu_count", 1)),
                          "gpu_hour_usd": float(spec.get("gpu_hour_usd", 2.99)),
                          "watts_per_gpu": float(spec.get("watts_per_gpu", 700.0))})
        deps.append({"id": f"ep{i}", "node": nid, "model": model, "address": _address(i),
                     "max_concurrency": int(spec.get("max_concurrency", 16))})
    return {"version": 1, "default_rtt_ms": inter, "intra_region_rtt_ms": intra, "sites": sites,
            "links": links, "nodes": nodes_out,
            "models": [{"name": model, "family": family, "params_b": float(params)}],
            "deployments": deps}


def tiers_fleet(spec: Mapping[str, Any], nodes: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Regions x (datacenter, edge, device) sites with the per-tier GPU mix of ``spec['tiers']``."""
    rng = random.Random(seed)
    regions: list[str] = list(spec["regions"])
    tiers: list[Mapping[str, Any]] = list(spec["tiers"])
    per_region = sum(int(g["count"]) for t in tiers for g in t["gpus"])
    scale = (nodes / (per_region * len(regions))) if nodes else 1.0
    models = list(spec["models"])
    sites: list[dict[str, Any]] = []
    links: list[dict[str, Any]] = []
    nodes_out: list[dict[str, Any]] = []
    deps: list[dict[str, Any]] = []
    cold = float(spec.get("cold_fraction", 0.0))
    for r in regions:
        juris = _jurisdiction(r)
        for t in tiers:
            sid = f"{r}-{t['tier']}"
            site: dict[str, Any] = {"id": sid, "region": r, "jurisdiction": juris, "tier": t["tier"],
                                    "certifications": list(t.get("certifications", []))}
            if t["tier"] == "device":
                site["owner_tenant"] = t["owner_tenant"]
            sites.append(site)
            links.append({"a": r, "b": sid, "rtt_ms": float(t["rtt_ms"]), "bandwidth_gbps": float(t["bandwidth_gbps"]),
                          "egress_usd_per_gb": float(t.get("egress_usd_per_gb", 0.0))})
            for g in t["gpus"]:
                for _ in range(max(1, round(int(g["count"]) * scale))):
                    i = len(nodes_out)
                    nid = f"n{i}"
                    nodes_out.append({"id": nid, "site": sid, "gpu_type": g["gpu_type"],
                                      "gpu_count": int(g.get("gpu_count", 1)), "gpu_hour_usd": float(g["gpu_hour_usd"]),
                                      "watts_per_gpu": float(g["watts_per_gpu"])})
                    deps.append({"id": f"ep{i}", "node": nid, "model": g["model"], "address": _address(i),
                                 "max_concurrency": int(g["max_concurrency"]), "warm": rng.random() >= cold,
                                 "cold_start_ms": float(spec.get("cold_start_ms", 8000.0))})
    for i, a in enumerate(regions):
        for b in regions[i + 1:]:
            same = _jurisdiction(a) == _jurisdiction(b)
            links.append({"a": a, "b": b, "rtt_ms": float(spec["rtt_same_jurisdiction_ms"] if same
                                                          else spec["rtt_cross_jurisdiction_ms"]),
                          "bandwidth_gbps": 40.0, "egress_usd_per_gb": 0.02 if same else 0.08})
    return {"version": 1, "default_rtt_ms": float(spec.get("rtt_cross_jurisdiction_ms", 90.0)),
            "intra_region_rtt_ms": 2.0, "sites": sites, "links": links, "nodes": nodes_out,
            "models": [{"name": m["name"], "family": m["family"], "params_b": float(m["params_b"])} for m in models],
            "deployments": deps}


def build_inventory(spec: Mapping[str, Any], nodes: int | None, seed: int) -> dict[str, Any]:
    gen = spec.get("generator", "cells")
    if gen == "cells":
        return cells_fleet(spec, nodes)
    if gen == "tiers":
        return tiers_fleet(spec, nodes, seed)
    raise ValueError(f"unknown fleet generator {gen!r}")


VALIDATE_UP_TO = 65_536
"""Generated inventories up to this many deployments go through the service's full validation."""


def trusted_fleet(inventory: Mapping[str, Any], revision_key: Mapping[str, Any]) -> Fleet:
    """A :class:`decision.fleet.Fleet` from a generator's output, without per-item pydantic validation.

    The generators above are deterministic code, tested through the validating path
    (``Fleet.from_mapping``) at scenario size; at a million deployments that validation and the
    revision hash over the whole dumped inventory cost minutes and gigabytes. Here every item is
    built with ``model_construct`` (defaults filled, nothing checked) and the revision is a hash of
    what generated the inventory (``revision_key``: the scenario's fleet spec, node count, seed).
    The endpoints are the same as the validated path's (tested).
    """
    def items(cls: type[Any], rows: Any, defaults: Mapping[str, Any]) -> list[Any]:
        construct = cls.model_construct
        return [construct(**{**defaults, **row}) for row in rows]

    spec = FleetSpec.model_construct(
        version=1, default_rtt_ms=float(inventory.get("default_rtt_ms", 120.0)),
        intra_region_rtt_ms=float(inventory.get("intra_region_rtt_ms", 3.0)),
        sites=items(SiteSpec, inventory["sites"], {"certifications": [], "owner_tenant": None}),
        links=items(LinkSpec, inventory.get("links", []), {"egress_usd_per_gb": 0.0}),
        nodes=items(NodeSpec, inventory["nodes"], {}),
        models=items(ModelSpec, inventory["models"], {"modality": "text", "safety_tier": "general"}),
        deployments=items(DeploymentSpec, inventory["deployments"],
                          {"runtime": "vllm", "warm": True, "cold_start_ms": 8000.0}))
    blob = json.dumps(revision_key, sort_keys=True, default=str).encode()
    return Fleet(spec, "gen-" + hashlib.sha256(blob).hexdigest()[:12])


def scenario_fleet(spec: Mapping[str, Any], nodes: int | None, seed: int, label: str = "<scenario>") -> Fleet:
    """The scenario's fleet: validated like any inventory, or :func:`trusted_fleet` when it is huge."""
    inventory = build_inventory(spec, nodes, seed)
    if len(inventory["deployments"]) <= VALIDATE_UP_TO:
        return Fleet.from_mapping(inventory, path=label)
    return trusted_fleet(inventory, {"fleet": spec, "nodes": nodes, "seed": seed})
