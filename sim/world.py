"""The simulated world: endpoints as dense arrays, the network between client regions and sites.

Built once from a validated :class:`decision.fleet.Fleet`, so the simulator and the service
read the same inventory. Strategies read the static arrays here and the telemetry arrays of
:mod:`sim.telemetry_view`; only the engine touches the nodes' live state.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import numpy.typing as npt

from decision.fleet import Fleet
from decision.gpu_profiles import profile
from decision.scoring import BYTES_PER_TOKEN
from sim.node import Node
from sim.service import ServiceParams, service_params

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
DEFAULT_BANDWIDTH_GBPS = 10.0


class World:
    """Static description of the fleet and the network, indexed by endpoint number."""

    def __init__(self, fleet: Fleet, client_regions: list[str] | None = None, cell_size: int = 1024) -> None:
        self.fleet = fleet
        eps = fleet.endpoints
        self.endpoints = eps
        self.n = len(eps)
        sharing = Counter(e.node_id for e in eps)
        self.params: list[ServiceParams] = [
            service_params(e, fleet.models[e.model].params_b, sharing[e.node_id]) for e in eps]
        regions = sorted({s.region for s in fleet.sites.values()})
        self.regions = client_regions or regions
        self.region_index = {r: i for i, r in enumerate(self.regions)}
        self.site_of = [e.site_id for e in eps]
        self.node_region = np.array([self.region_index.get(e.region, -1) for e in eps], dtype=np.int64)
        self.jurisdiction = [e.jurisdiction for e in eps]
        self.owner = [e.owner_tenant for e in eps]
        self.certs = [e.certifications for e in eps]
        self.tier = [e.tier for e in eps]
        self.conc = np.array([p.max_concurrency for p in self.params], dtype=np.float64)
        self.prefill_tps = np.array([p.prefill_tps for p in self.params], dtype=np.float64)
        self.decode_tps1 = np.array([p.decode_tps1 for p in self.params], dtype=np.float64)
        self.decode_capacity = np.array([p.max_concurrency * p.decode_rate(p.max_concurrency)
                                         for p in self.params], dtype=np.float64)
        self.memory_gb = np.array([profile(e.gpu_type).memory_gb * e.gpu_count for e in eps], dtype=np.float64)
        self.usd_per_s = np.array([p.usd_per_s for p in self.params], dtype=np.float64)
        self.cost_per_1k = np.array([e.cost_per_1k_tokens() for e in eps], dtype=np.float64)
        # Network per (client region, site): RTT ms, egress $/GB, bandwidth bytes/s.
        topo = fleet.topology
        bw_links: dict[tuple[str, str], float] = {}
        for link in fleet.spec.links:
            bw_links[(link.a, link.b)] = bw_links[(link.b, link.a)] = link.bandwidth_gbps
        site_ids = sorted({e.site_id for e in eps})
        site_idx = {s: i for i, s in enumerate(site_ids)}
        self.node_site = np.array([site_idx[s] for s in self.site_of], dtype=np.int64)
        nr, ns = len(self.regions), len(site_ids)
        rtt_rs = np.zeros((nr, ns))
        egress_rs = np.zeros((nr, ns))
        bw_rs = np.zeros((nr, ns))
        for ri, r in enumerate(self.regions):
            for si, s in enumerate(site_ids):
                rtt_rs[ri, si], egress_rs[ri, si] = topo.path(r, s)
                srg = fleet.sites[s].region
                gbps = bw_links.get((r, s)) or bw_links.get((r, srg)) or DEFAULT_BANDWIDTH_GBPS
                bw_rs[ri, si] = gbps * 1e9 / 8.0
        self.rtt_ms: F64 = rtt_rs[:, self.node_site]  # [region, endpoint]
        self.egress_usd_per_gb: F64 = egress_rs[:, self.node_site]
        self.bandwidth_Bps: F64 = bw_rs[:, self.node_site]
        self.bytes_per_token = BYTES_PER_TOKEN
        # Candidate index: endpoints per model family, grouped into cells of nearby endpoints.
        fam: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(eps):
            fam[e.family].append(i)
        self.by_family: dict[str, I64] = {f: np.array(v, dtype=np.int64) for f, v in fam.items()}
        self.cell_size = cell_size
        self.cells: dict[str, list[I64]] = {}
        self.cells_by_region: dict[str, dict[int, list[int]]] = {}
        for f, idx in self.by_family.items():
            order = idx[np.lexsort((idx, self.node_site[idx]))]
            cells = [order[k:k + cell_size] for k in range(0, len(order), cell_size)]
            self.cells[f] = cells
            byr: dict[int, list[int]] = defaultdict(list)
            for ci, cell in enumerate(cells):
                byr[int(self.node_region[cell[0]])].append(ci)
            self.cells_by_region[f] = dict(byr)

    def make_nodes(self) -> list[Node]:
        return [Node(p) for p in self.params]

    def capacity_rps(self, mean_in: float, mean_out: float) -> float:
        """Requests/s the whole fleet sustains at full concurrency (no network, no skew)."""
        return float(sum(p.capacity_rps(mean_in, mean_out) for p in self.params))
