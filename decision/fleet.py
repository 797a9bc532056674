"""Fleet inventory: the YAML schema, its validation, and the candidate index built from it.

The inventory (every field: deploy/FLEET.md) lists sites, links, nodes, models and deployments. It is
validated with pydantic at load; every error names the file, the line and the field. The
:class:`Fleet` built from it is immutable and indexed by model and by model family, so the
locate stage reads a precomputed tuple instead of scanning the fleet.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from decision.domain import TIERS, Endpoint, Tier, nominal_cost_per_1k_tokens
from decision.gpu_profiles import PROFILES, batch_half, scaled_throughput
from decision.yaml_lines import (
    LocatedYaml,
    UnreadableFile,
    YamlSyntaxError,
    field_path,
    load_located,
    load_located_file,
)


class _Strict(BaseModel):
    # No inf or NaN anywhere: one infinite price or size turns every expected TTFT or cost into NaN.
    # Strict types: a quoted "no" is not read as true, nor "8" as a GPU count (an int still serves as a float).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)


# Ids and names end up in routes, traces and the audit log: printable, one line, no NUL (PostgreSQL
# refuses NUL, and a route named with one would be a decision the log cannot store).
def _printable(v: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
        raise ValueError(f"must be printable text on one line, not {v!r} (a control character such as NUL)")
    return v


Name = Annotated[str, StringConstraints(min_length=1, max_length=256), AfterValidator(_printable)]
# Generous physical bounds, so the arithmetic on them stays finite.
_MS = 3_600_000.0  # an hour


class SiteSpec(_Strict):
    id: Name
    region: Name
    jurisdiction: Name
    tier: Literal["datacenter", "edge", "device"]
    certifications: list[Name] = []
    owner_tenant: Name | None = None


class LinkSpec(_Strict):
    a: Name = Field(description="site id or region")
    b: Name = Field(description="site id or region")
    rtt_ms: float = Field(ge=0, le=_MS)
    bandwidth_gbps: float = Field(gt=0, le=1e6)
    egress_usd_per_gb: float = Field(ge=0, le=1e4, default=0.0)


class NodeSpec(_Strict):
    id: Name
    site: Name
    gpu_type: str
    gpu_count: int = Field(ge=1, le=64)
    gpu_hour_usd: float = Field(ge=0, le=1e6)
    watts_per_gpu: float = Field(gt=0, le=1e5)

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, v: str) -> str:
        if v not in PROFILES:
            raise ValueError(f"unknown gpu_type {v!r}; known: {', '.join(sorted(PROFILES))}")
        return v


class ModelSpec(_Strict):
    name: Name
    family: Name
    modality: Literal["text", "image", "multimodal", "embedding"] = "text"
    safety_tier: Name = "general"
    params_b: float = Field(gt=0, le=1e5)


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _is_host(host: str) -> bool:
    """An IPv4 literal, a bracketed IPv6 literal, or a DNS name (RFC 1123 labels; all-numeric only as IPv4).

    >>> [_is_host(h) for h in ("10.0.0.1", "[::1]", "gpu-7.dc1.example", "..", "::", "999.1.1.1", "-a")]
    [True, True, True, False, False, False, False]
    """
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
            return True
        except ValueError:
            return False
    labels = host.split(".")
    if all(label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
            return True
        except ValueError:
            return False
    return len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def _port_in_range(address: str) -> str:
    """The address with its host and port checked and written canonically (``host:0080`` is
    ``host:80``: the duplicate-address check, and the ``ip:port`` handed to proxies, compare strings)."""
    host, digits = address.rsplit(":", 1)
    if not _is_host(host):
        raise ValueError(f"{host!r} is neither an IP address ([...] for IPv6) nor a host name")
    port = int(digits)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    return f"{host.lower()}:{port}"


class DeploymentSpec(_Strict):
    id: Name
    node: Name
    model: Name
    address: Annotated[str, Field(pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$"), AfterValidator(_port_in_range)]
    runtime: Literal["vllm", "triton"] = "vllm"
    max_concurrency: int = Field(ge=1, le=4096)
    warm: bool = True
    cold_start_ms: float = Field(ge=0, le=_MS, default=8000.0)


class FleetSpec(_Strict):
    version: Literal[1] = 1
    default_rtt_ms: float = Field(ge=0, le=_MS, default=120.0)
    intra_region_rtt_ms: float = Field(ge=0, le=_MS, default=3.0)
    sites: list[SiteSpec]
    links: list[LinkSpec] = []
    nodes: list[NodeSpec]
    models: list[ModelSpec]
    deployments: list[DeploymentSpec]


@dataclass(frozen=True, slots=True)
class InventoryIssue:
    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


class InventoryError(ValueError):
    """An inventory that failed validation; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[InventoryIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = tuple(issues)


def _cross_check(spec: FleetSpec, doc: LocatedYaml) -> list[InventoryIssue]:
    """Reference and uniqueness checks pydantic cannot express per field."""
    issues: list[InventoryIssue] = []

    def issue(loc: tuple[str | int, ...], msg: str) -> None:
        issues.append(InventoryIssue(doc.path, doc.line_of(loc), field_path(loc, doc.data), msg))

    for section in ("sites", "nodes", "deployments"):
        seen: set[str] = set()
        for i, item in enumerate(getattr(spec, section)):
            if item.id in seen:
                issue((section, i, "id"), f"duplicate id {item.id!r}")
            seen.add(item.id)
    names: set[str] = set()
    for i, m in enumerate(spec.models):
        if m.name in names:
            issue(("models", i, "name"), f"duplicate model {m.name!r}")
        names.add(m.name)
    site_ids = {s.id for s in spec.sites}
    regions = {s.region for s in spec.sites}
    for i, site in enumerate(spec.sites):
        # Clients and links name sites and regions alike: a site named as another region would read as
        # that region when it is a client's location, and its distances would be the wrong ones.
        if site.id in regions and site.id != site.region:
            issue(("sites", i, "id"), f"{site.id!r} is also the name of a region of other sites; a site id "
                                      "must not name another region")
    node_ids = {n.id for n in spec.nodes}
    for i, n in enumerate(spec.nodes):
        if n.site not in site_ids:
            issue(("nodes", i, "site"), f"unknown site {n.site!r}")
    pairs: dict[frozenset[str], int] = {}
    for i, link in enumerate(spec.links):
        for end in ("a", "b"):
            ref = getattr(link, end)
            if ref not in site_ids and ref not in regions:
                issue(("links", i, end), f"{ref!r} is neither a site id nor a region")
        pair = frozenset((link.a, link.b))
        if link.a == link.b:
            issue(("links", i, "b"), f"a link from {link.a!r} to itself")
        elif pair in pairs:  # the engine would use whichever came last, silently
            issue(("links", i, "b"), f"a second link between {link.a!r} and {link.b!r} (first: links[{pairs[pair]}])")
        pairs.setdefault(pair, i)
    if not spec.deployments:
        issue(("deployments",), "no deployments: nothing could ever be routed")
    addresses: dict[str, int] = {}
    for i, d in enumerate(spec.deployments):
        if d.node not in node_ids:
            issue(("deployments", i, "node"), f"unknown node {d.node!r}")
        if d.model not in names:
            issue(("deployments", i, "model"), f"unknown model {d.model!r}")
        if d.address in addresses:
            issue(("deployments", i, "address"),
                  f"address {d.address} already used by deployments[{addresses[d.address]}]")
        addresses.setdefault(d.address, i)
    for i, s in enumerate(spec.sites):
        if s.tier == "device" and not s.owner_tenant:
            issue(("sites", i, "owner_tenant"), "device-tier sites must name the tenant that owns them")
    return issues


def parse_fleet(doc: LocatedYaml) -> FleetSpec:
    """Validate a located YAML document as a fleet inventory or raise :class:`InventoryError`."""
    if not isinstance(doc.data, dict):
        raise InventoryError([InventoryIssue(doc.path, 1, "(document)", "expected a mapping at the top level")])
    try:
        spec = FleetSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise InventoryError([
            InventoryIssue(doc.path, doc.line_of(err["loc"]), field_path(err["loc"], doc.data), err["msg"])
            for err in exc.errors()
        ]) from None
    problems = _cross_check(spec, doc)
    if problems:
        raise InventoryError(problems)
    return spec


class Topology:
    """Round-trip times and egress prices between client locations and sites."""

    def __init__(self, spec: FleetSpec) -> None:
        self._site_region = {s.id: s.region for s in spec.sites}
        self._links: dict[tuple[str, str], LinkSpec] = {}
        for link in spec.links:
            self._links[(link.a, link.b)] = link
            self._links[(link.b, link.a)] = link
        self._default = spec.default_rtt_ms
        self._intra = spec.intra_region_rtt_ms
        self._cache: dict[tuple[str, str], tuple[float, float]] = {}
        # The client locations a path can depend on; any other is as far as no location at all.
        self._places = frozenset(self._site_region) | frozenset(self._site_region.values()) | {
            end for pair in self._links for end in pair}

    def canonical_client(self, client: str) -> str:
        """``client`` if the inventory knows it (a site, a site's region, a link's end), else ``""``:
        every path from an unknown location is the default one, so memos keyed by the client keep
        one entry for all of them (a client location is the caller's free text).

        >>> t = Topology(FleetSpec.model_validate({"sites": [{"id": "s1", "region": "eu-west",
        ...     "jurisdiction": "EU", "tier": "edge"}], "nodes": [], "deployments": [], "models": []}))
        >>> t.canonical_client("eu-west"), t.canonical_client("atlantis"), t.path("atlantis", "s1") == t.path("", "s1")
        ('eu-west', '', True)
        """
        return client if client in self._places else ""

    def _lookup(self, client: str, site_id: str) -> tuple[float, float]:
        site_region = self._site_region.get(site_id, "")
        client_region = self._site_region.get(client, client)
        for key in ((client, site_id), (client_region, site_id), (client, site_region),
                    (client_region, site_region)):
            link = self._links.get(key)
            if link is not None:
                return link.rtt_ms, link.egress_usd_per_gb
        if client_region == site_region:
            return self._intra, 0.0
        return self._default, 0.0

    def path(self, client: str, site_id: str) -> tuple[float, float]:
        """(RTT ms, egress $/GB) from a client region or site to a site."""
        # Keyed by the canonical client: the cache holds the inventory's places only, however much
        # free text callers send as a client location.
        key = (self.canonical_client(client), site_id)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._lookup(*key)
        return hit

    def rtt_ms(self, client: str, site_id: str) -> float:
        return self.path(client, site_id)[0]


class Fleet:
    """An immutable, indexed view of one inventory revision."""

    def __init__(self, spec: FleetSpec, revision: str) -> None:
        self.spec = spec
        self.revision = revision
        self.topology = Topology(spec)
        sites = {s.id: s for s in spec.sites}
        nodes = {n.id: n for n in spec.nodes}
        models = {m.name: m for m in spec.models}
        endpoints: list[Endpoint] = []
        for d in spec.deployments:
            node, model = nodes[d.node], models[d.model]
            site = sites[node.site]
            prefill, decode = scaled_throughput(node.gpu_type, node.gpu_count, model.params_b)
            endpoints.append(Endpoint(
                endpoint_id=d.id, address=d.address, model=model.name, family=model.family,
                runtime=d.runtime, max_concurrency=d.max_concurrency, modality=model.modality,
                safety_tier=model.safety_tier, node_id=node.id, gpu_type=node.gpu_type,
                gpu_count=node.gpu_count, gpu_hour_usd=node.gpu_hour_usd,
                watts_per_gpu=node.watts_per_gpu, site_id=site.id, region=site.region,
                jurisdiction=site.jurisdiction, tier=site.tier,
                certifications=frozenset(site.certifications), owner_tenant=site.owner_tenant,
                prefill_tokens_per_s=prefill, decode_tokens_per_s=decode,
                cold_start_ms=d.cold_start_ms, warm=d.warm,
                nominal_cost_per_1k=nominal_cost_per_1k_tokens(node.gpu_hour_usd, node.gpu_count, decode,
                                                               d.max_concurrency),
                batch_half=batch_half(node.gpu_type, node.gpu_count, model.params_b),
            ))
        self.endpoints: tuple[Endpoint, ...] = tuple(endpoints)
        self.by_id: dict[str, Endpoint] = {e.endpoint_id: e for e in endpoints}
        self.node_ids: frozenset[str] = frozenset(e.node_id for e in endpoints)  # nodes that serve something
        by_model: dict[str, list[Endpoint]] = defaultdict(list)
        by_family: dict[str, list[Endpoint]] = defaultdict(list)
        for e in endpoints:
            by_model[e.model].append(e)
            by_family[e.family].append(e)
        self.by_model: dict[str, tuple[Endpoint, ...]] = {k: tuple(v) for k, v in by_model.items()}
        self.by_family: dict[str, tuple[Endpoint, ...]] = {k: tuple(v) for k, v in by_family.items()}
        self.models = models
        # What a family request without a modality asks for: what the family's deployed models take,
        # when they agree; a mixed family ("") is not narrowed.
        family_modalities = {f: {e.modality for e in eps} for f, eps in self.by_family.items()}
        self._family_modality = {f: next(iter(ms)) if len(ms) == 1 else "" for f, ms in family_modalities.items()}
        self.sites = sites
        self.by_address: dict[str, Endpoint] = {e.address: e for e in endpoints}

    def default_modality(self, model: str, family: str) -> str:
        """The modality of a request that names none: its model's, or its family's when all the family's
        deployed models agree; ``""`` (no narrowing) for a mixed family, and for an unknown model or
        family (the locate stage says which)."""
        if model:
            spec = self.models.get(model)
            return spec.modality if spec is not None else ""
        return self._family_modality.get(family, "")

    def tiers(self) -> tuple[Tier, ...]:
        return tuple(t for t in TIERS if any(e.tier == t for e in self.endpoints))

    @staticmethod
    def from_spec(spec: FleetSpec) -> Fleet:
        blob = json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
        return Fleet(spec, "inv-" + hashlib.sha256(blob).hexdigest()[:12])

    @staticmethod
    def from_mapping(data: Mapping[str, Any], path: str = "<memory>") -> Fleet:
        return Fleet.from_spec(parse_fleet(LocatedYaml(dict(data), {(): 1}, path)))


def load_fleet(path: str | Path) -> Fleet:
    """Load and validate an inventory file; raises :class:`InventoryError` naming file:line: field."""
    return _fleet_of(lambda: load_located_file(path))


def load_fleet_text(text: str, path: str = "<string>") -> Fleet:
    return _fleet_of(lambda: load_located(text, path))


def _fleet_of(load: Callable[[], LocatedYaml]) -> Fleet:
    """The fleet of the document ``load`` reads; its YAML errors become :class:`InventoryError`."""
    try:
        doc = load()
    except YamlSyntaxError as exc:
        what = "(file)" if isinstance(exc, UnreadableFile) else "(syntax)"
        raise InventoryError([InventoryIssue(exc.path, exc.line, what, exc.message)]) from None
    return Fleet.from_spec(parse_fleet(doc))


def serves_modality(model_modality: str, requested: str) -> bool:
    """Whether a model of ``model_modality`` takes a request of modality ``requested``.

    ``""`` asks for nothing in particular; otherwise the modalities must match, except that a
    multimodal model (image and text in, text out) also takes text-only requests.

    >>> serves_modality("text", "text"), serves_modality("multimodal", "text"), serves_modality("image", "text")
    (True, True, False)
    >>> serves_modality("text", "")
    True
    """
    return not requested or requested == model_modality or (requested == "text" and model_modality == "multimodal")


def taking_modality(endpoints: Sequence[Endpoint], modality: str) -> Sequence[Endpoint]:
    """The ``endpoints`` whose model takes requests of ``modality`` (all of them for ``""``)."""
    if not modality:
        return endpoints
    return [e for e in endpoints if serves_modality(e.modality, modality)]


def endpoints_serving(fleet: Fleet, model: str, family: str, modality: str = "") -> Iterable[Endpoint]:
    """The locate stage's index read: exact model if given, else the whole family; with ``modality``,
    only endpoints whose model takes requests of that modality (:func:`taking_modality`)."""
    return taking_modality(fleet.by_model.get(model, ()) if model else fleet.by_family.get(family, ()), modality)
