"""Settings of the ext_proc endpoint picker: which headers carry the decision context, and names.

Header names are configurable because each gateway (Envoy Gateway, Istio, kgateway...) has its own
conventions for the tenant and compliance headers it sets after authentication. The defaults follow
``x-infermesh-*``; the destination header and metadata namespace follow the Gateway API Inference
Extension's endpoint-picker protocol, so a stock inference gateway needs no changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DESTINATION_HEADER = "x-gateway-destination-endpoint"
DESTINATION_SERVED_KEY = "x-gateway-destination-endpoint-served"
LB_NAMESPACE = "envoy.lb"
EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")  # an RFC 9110 token, lower case (HTTP/2)
PROBED_NAMES: tuple[str, ...] = ("", "liveness", "readiness")  # health names endpoint-picker deployments probe


@dataclass(frozen=True, slots=True)
class ExtProcConfig:
    """Header names and defaults for building a decision context from an HTTP request.

    Attributes
    ----------
    tenant_header, tier_header, region_header, session_header, jurisdictions_header,
    data_class_header, prompt_class_header, modality_header, ttft_target_header, max_cost_header,
    model_header, request_id_header
        Request headers read into the matching :class:`~decision.domain.RequestContext` field.
        ``jurisdictions_header`` is a comma-separated list. ``model_header`` is used when the body
        names no model (or there is no body).
    default_tenant
        Tenant used when the tenant header is absent; empty means such requests get a 400.
    model_aliases
        Maps a body ``model`` name to a fleet model or model family (applied before lookup).
    destination_header, metadata_namespace
        Where the chosen endpoint goes (endpoint-picker protocol defaults).
    decision_id_header
        Request header carrying the decision id to the backend, and response header to the client.
    max_response_json_bytes
        Non-streaming response bodies longer than this are not parsed for ``usage``.
    max_request_body_bytes
        The largest streamed request body. One held until it is whole
        (``send_body_without_waiting_for_header_response``) is refused with 413 beyond this many
        bytes. One decided on at the headers (``STREAMED`` without that setting) that sent no
        ``content-length`` is charged to token quotas as this many bytes of prompt (a quarter as
        many tokens), and ended with 413 if it streams past them. (Buffered mode is bounded by
        Envoy's own buffer.)
    response_phase
        ``"observer"`` (default, matches ``deploy/envoy/envoy.yaml``): a second ext_proc filter in
        observability mode reports the response, so the pick stream never records outcomes.
        ``"inline"``: one filter handles both phases and the pick stream records the outcome.
    """

    tenant_header: str = "x-infermesh-tenant"
    tier_header: str = "x-infermesh-tier"
    region_header: str = "x-infermesh-region"
    session_header: str = "x-infermesh-session"
    jurisdictions_header: str = "x-infermesh-allowed-jurisdictions"
    data_class_header: str = "x-infermesh-data-class"
    prompt_class_header: str = "x-infermesh-prompt-class"
    modality_header: str = "x-infermesh-modality"
    ttft_target_header: str = "x-infermesh-ttft-target-ms"
    max_cost_header: str = "x-infermesh-max-cost-per-1k-tokens"
    model_header: str = "x-infermesh-model"
    request_id_header: str = "x-request-id"
    default_tenant: str = ""
    model_aliases: Mapping[str, str] = field(default_factory=dict)
    destination_header: str = DESTINATION_HEADER
    metadata_namespace: str = LB_NAMESPACE
    decision_id_header: str = "x-infermesh-decision-id"
    max_response_json_bytes: int = 4 << 20
    max_request_body_bytes: int = 16 << 20
    response_phase: str = "observer"

    @property
    def context_headers(self) -> tuple[str, ...]:
        """The request headers a decision reads (lower case)."""
        return tuple(str(getattr(self, f)).lower() for f in (
            "tenant_header", "tier_header", "region_header", "session_header", "jurisdictions_header",
            "data_class_header", "prompt_class_header", "modality_header", "ttft_target_header",
            "max_cost_header", "model_header", "request_id_header"))

    def __post_init__(self) -> None:
        # Checked here, not when the first request reads a header named 5: the service must not start on it.
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if name.endswith("_header"):
                if not isinstance(value, str) or not _HEADER_NAME.fullmatch(value):
                    raise ValueError(f"extproc.{name}: must be an HTTP header name, not {value!r}")
            elif name.startswith("max_"):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"extproc.{name}: must be a whole number of bytes >= 1, not {value!r}")
            elif name == "model_aliases":
                if not isinstance(value, Mapping) or not all(
                        isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()):
                    raise ValueError(f"extproc.model_aliases: must map names to names, not {value!r}")
            elif not isinstance(value, str):
                raise ValueError(f"extproc.{name}: must be text, not {value!r}")
        if not self.metadata_namespace:
            raise ValueError("extproc.metadata_namespace: must not be empty")
        if self.response_phase not in ("observer", "inline"):
            raise ValueError(f"extproc.response_phase: must be 'observer' or 'inline', not {self.response_phase!r}")

    @staticmethod
    def from_mapping(data: Mapping[str, Any]) -> ExtProcConfig:
        """Build from a config-file section (unknown keys are an error, naming the key)."""
        known = set(ExtProcConfig.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"extproc: unknown setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        values = dict(data)
        for k, v in values.items():
            if k.endswith("_header") and isinstance(v, str):
                values[k] = v.lower()  # HTTP/2 and Envoy header maps are lower-case
        return ExtProcConfig(**values)
