"""Request validation: every rejection names the field, before any stage runs."""

from __future__ import annotations

import math

from decision.domain import MODALITIES, RequestContext
from decision.errors import InvalidArgument

MAX_LABELS = 64
MAX_LABEL_BYTES = 256
MAX_TOKENS = 10_000_000
MAX_ID = 256


def validate_request(ctx: RequestContext) -> None:
    if not ctx.request_id:
        raise InvalidArgument("request_id", "required")
    if len(ctx.request_id) > MAX_ID:
        raise InvalidArgument("request_id", f"longer than {MAX_ID} characters")
    if not ctx.tenant:
        raise InvalidArgument("tenant", "required")
    if len(ctx.tenant) > MAX_ID:
        raise InvalidArgument("tenant", f"longer than {MAX_ID} characters")
    if not ctx.model and not ctx.model_family:
        raise InvalidArgument("model", "one of model or model_family is required")
    if ctx.modality and ctx.modality not in MODALITIES:
        raise InvalidArgument("modality", f"must be one of {', '.join(MODALITIES)}")
    for name in ("estimated_input_tokens", "expected_output_tokens"):
        v = getattr(ctx, name)
        if v < 0 or v > MAX_TOKENS:
            raise InvalidArgument(name, f"must be between 0 and {MAX_TOKENS}")
    for name in ("ttft_target_ms", "max_cost_per_1k_tokens"):
        v = getattr(ctx, name)
        if not math.isfinite(v) or v < 0:
            raise InvalidArgument(name, "must be a finite number >= 0")
    if len(ctx.labels) > MAX_LABELS:
        raise InvalidArgument("labels", f"at most {MAX_LABELS} labels")
    for k, v in ctx.labels.items():
        if len(k) > MAX_LABEL_BYTES or len(v) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"labels[{k[:32]}]", f"keys and values at most {MAX_LABEL_BYTES} characters")
    for j in ctx.allowed_jurisdictions:
        if not j or len(j) > 32:
            raise InvalidArgument("allowed_jurisdictions", f"bad jurisdiction {j!r}")
