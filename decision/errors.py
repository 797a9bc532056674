"""Typed errors of the decision pipeline.

They stay typed inside the service and become transport statuses (gRPC, HTTP, ext_proc) only at
the edge, in one mapping per front end.
"""

from __future__ import annotations


class DecisionError(Exception):
    """Base of every error a decision can end in."""


class InvalidArgument(DecisionError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(DecisionError):
    """``what`` (a model, a decision) named by ``key`` does not exist; ``field`` is the request field
    that named it (default ``what``), for the client's error trailer."""

    def __init__(self, what: str, key: str, field: str = "") -> None:
        super().__init__(f"unknown {what} {key!r}")
        self.what = what
        self.key = key
        self.field = field or what


class NoCandidate(DecisionError):
    """Every candidate was removed by the guardrails; ``rules`` names which ones."""

    def __init__(self, rules: tuple[str, ...], decision_id: str = "") -> None:
        names = ", ".join(rules) if rules else "(no candidate endpoints)"
        super().__init__(f"no endpoint satisfies the guardrails; removed by: {names}")
        self.rules = rules
        self.decision_id = decision_id


class QuotaExceeded(NoCandidate):
    """A quota rule denied the request as a whole."""

    def __init__(self, rules: tuple[str, ...], decision_id: str = "") -> None:
        super().__init__(rules, decision_id)
        self.args = (f"quota exceeded: {', '.join(rules)}",)


class Unavailable(DecisionError):
    """The service itself cannot decide (not the request's fault)."""
