"""Request validation: every rejection names the field, before any stage runs."""

from __future__ import annotations

import math

from decision.domain import EXPIRED_PREFIX, MODALITIES, Outcome, RequestContext
from decision.errors import InvalidArgument

MAX_LABELS = 64
MAX_LABEL_BYTES = 256
MAX_TOKENS = 10_000_000
MAX_ID = 256
# The text fields of a request; each is audited (top-level columns, or the stored trace).
_TEXT_FIELDS = ("request_id", "tenant", "user_tier", "model", "model_family", "modality", "prompt_class",
                "data_class", "client_region", "session_id")


def _no_nul(field: str, value: str) -> None:
    # PostgreSQL text cannot hold NUL: one such value would fail the audit log's whole batch.
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain a NUL character")


def validate_request(ctx: RequestContext) -> None:
    """Raise :class:`~decision.errors.InvalidArgument` naming the first field ``ctx`` gets wrong.

    Parameters
    ----------
    ctx : RequestContext
        The request, as a front end (gRPC, HTTP, ext_proc) built it.

    Raises
    ------
    InvalidArgument
        A required field is missing, a value is out of range or too long, or a text field holds a
        NUL character (which the audit log could not store).
    """
    for name in _TEXT_FIELDS:
        _no_nul(name, getattr(ctx, name))
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
    _token_counts(ctx, "estimated_input_tokens", "expected_output_tokens")
    for name in ("ttft_target_ms", "max_cost_per_1k_tokens"):
        v = getattr(ctx, name)
        if not math.isfinite(v) or v < 0:
            raise InvalidArgument(name, "must be a finite number >= 0")
    if len(ctx.labels) > MAX_LABELS:
        raise InvalidArgument("labels", f"at most {MAX_LABELS} labels")
    for k, v in ctx.labels.items():
        if len(k) > MAX_LABEL_BYTES or len(v) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"labels[{k[:32]}]", f"keys and values at most {MAX_LABEL_BYTES} characters")
        if "\x00" in k or "\x00" in v:
            raise InvalidArgument(f"labels[{k[:32]!a}]", "keys and values must not contain a NUL character")
    for j in ctx.allowed_jurisdictions:
        if not j or len(j) > 32 or "\x00" in j:
            raise InvalidArgument("allowed_jurisdictions", f"bad jurisdiction {j!r}")


def validate_outcome(outcome: Outcome) -> None:
    """Raise :class:`~decision.errors.InvalidArgument` naming the first field ``outcome`` gets wrong.

    What ``ReportOutcome`` checks before the outcome is joined to its decision (and audited).

    Parameters
    ----------
    outcome : Outcome
        The reported outcome.

    Raises
    ------
    InvalidArgument
        ``decision_id`` is missing, a time is negative or not finite, a token count is negative or
        above ``MAX_TOKENS``, ``decision_id`` or ``error`` holds a NUL character (which the audit log
        could not store), or ``error`` starts with the prefix the service reserves for the timeouts
        it records itself (a reported outcome dressed as one would be taken for it: a later real
        outcome would count as late, not as a duplicate).
    """
    if not outcome.decision_id:
        raise InvalidArgument("decision_id", "required")
    _no_nul("decision_id", outcome.decision_id)
    _no_nul("error", outcome.error)
    if outcome.error.startswith(EXPIRED_PREFIX):
        raise InvalidArgument("error", f"must not start with {EXPIRED_PREFIX!r}, reserved for timeouts the service "
                                       "records when no outcome comes")
    _no_nul("served_endpoint_id", outcome.served_endpoint_id)
    for name in ("ttft_ms", "latency_ms"):  # NaN passes "< 0" and would be learnt as the best or worst reward
        v = getattr(outcome, name)
        if not math.isfinite(v) or v < 0:
            raise InvalidArgument(name, "must be a finite number >= 0")
    _token_counts(outcome, "input_tokens", "output_tokens")  # they true up the tenant's quota counters


def _token_counts(obj: object, *names: str) -> None:
    """Token counts are 0..MAX_TOKENS: a larger one would overflow the shared quota counters."""
    for name in names:
        v = getattr(obj, name)
        if v < 0 or v > MAX_TOKENS:
            raise InvalidArgument(name, f"must be between 0 and {MAX_TOKENS}")
