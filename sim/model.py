"""The simulator's request and dispatch records (plain slotted classes: they are on the hot path)."""

from __future__ import annotations

import math
from typing import Any

MAX_WORKERS = 64  # decision workers: as many as ``infermesh serve --workers`` allows

# Request states
PENDING, ROUTED, FIRST_TOKEN, DONE, DROPPED = range(5)
# Copy (one dispatch of a request to one endpoint) states
C_TRAVEL, C_WAITING, C_PREFILL, C_DECODE, C_DONE, C_CANCELLED = range(6)


class Request:
    """One inference request and everything measured about it."""

    __slots__ = (
        "arrival",
        "cached_tokens",
        "copies",
        "cost_usd",
        "ctx",
        "data_class",
        "decided_at",
        "decision_us",
        "done_at",
        "drop_reason",
        "first_token_at",
        "hashes",
        "in_tokens",
        "jurisdictions",
        "out_tokens",
        "region",
        "rid",
        "session",
        "state",
        "tag",
        "tenant",
        "ttft_target_ms",
        "violations",
        "winner",
        "worker",
    )

    def __init__(self, rid: int, arrival: float, in_tokens: int, out_tokens: int, tenant: str,
                 region: int, session: str, hashes: tuple[int, ...], ttft_target_ms: float,
                 jurisdictions: tuple[str, ...], data_class: str) -> None:
        self.rid = rid
        self.arrival = arrival
        self.in_tokens = in_tokens
        self.out_tokens = out_tokens
        self.tenant = tenant
        self.region = region
        self.session = session
        self.hashes = hashes
        self.ttft_target_ms = ttft_target_ms
        self.jurisdictions = jurisdictions
        self.data_class = data_class
        self.state = PENDING
        self.copies: list[Copy] = []
        self.first_token_at = -1.0
        self.done_at = -1.0
        self.cost_usd = 0.0
        self.cached_tokens = 0
        self.decision_us = 0.0
        self.decided_at = -1.0  # when its decision started (after any wait for a decision worker)
        self.drop_reason = ""
        self.violations = 0
        self.winner = -1  # the endpoint whose copy gave the first token (an index, not the Copy: no cycle)
        self.worker = -1  # the decision worker it was assigned to (-1: the strategy models none)
        self.ctx: Any = None  # strategy-specific payload (the infermesh decision id...)
        self.tag: Any = None


class Copy:
    """One dispatch of a request to one endpoint (a hedged request has two)."""

    __slots__ = ("billed_s", "cancel_at", "gpu_s", "kv_need", "node", "prefill_end", "req", "share_start", "state",
                 "vfinish")

    def __init__(self, req: Request, node: int) -> None:
        self.req = req
        self.node = node
        self.state = C_TRAVEL
        self.kv_need = 0
        self.prefill_end = 0.0
        self.share_start = 0.0
        self.vfinish = 0.0
        self.gpu_s = 0.0  # GPU-seconds attributed to this copy
        self.billed_s = 0.0  # of which already billed to its request (a losing copy may run on after that)
        # A losing hedge copy's state is C_CANCELLED from the moment the router cancels it; until the
        # cancel reaches its endpoint (this time) the endpoint still queues and admits it.
        self.cancel_at = math.inf
