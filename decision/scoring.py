"""The score stage: expected TTFT and cost per candidate, and the feature matrix, as columns.

Expected TTFT = queue wait (for a batch slot, then for the prompts ahead in the endpoint's
prefill) + prefill (slowed by the running batch) + network round trip + cold start. A queued
request waits for completions in a full batch, whose per-sequence decode rate has fallen to
``r1 / (1 + (conc - 1) / batch_half)``. Unknown or stale telemetry is not trusted: the queue is
then assumed to be ``unknown_load`` full, which makes a blind endpoint look worse than a known
idle one.

This is the decision's hot path, so it works on numpy columns: the telemetry store hands over
each endpoint's values as a precomputed row, an endpoint's static numbers are cached per
endpoint object, the arithmetic below runs in one pass in C (:mod:`decision._kernels`; the
formulas are the ones written here), and the result (:class:`~decision.domain.ScoredArms`)
carries the feature matrix the learners read as it is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from decision import _kernels
from decision.candidates import NUMBERS, CandidateSet, endpoint_numbers, endpoints_of
from decision.contracts import FeatureBuilder
from decision.domain import Candidate, Estimates, RequestContext, ScoredArms
from decision.ledger import EndpointLedger
from decision.telemetry import CANONICAL, KV_CACHE_USAGE, QUEUE_RUNNING, QUEUE_WAITING, dense_row

BYTES_PER_TOKEN = 4.0  # egress estimate for prompt + completion text
ESTIMATE_ROWS: tuple[str, ...] = ("ttft_ms", "cost_per_1k", "queue_ms", "prefill_ms", "cold_start_ms", "running",
                                  "waiting", "kv_cache_usage", "added_delay_ms", "cost_penalty_ms",
                                  "rank_ms")  # _kernels.estimate's rows
COMPONENTS: tuple[str, ...] = ("queue_ms", "prefill_ms", "rtt_ms", "cold_start_ms", "running", "waiting",
                               "kv_cache_usage")
# How much of the delay a prompt adds to the later requests queued behind it in an endpoint's prefill
# counts against choosing that endpoint: all of it, as a FIFO server's marginal delay (M/G/1) does.
# Counting none of it (a request's own TTFT alone) sends every long prompt to the fastest prefill
# until its queue is as long as anyone's. On mesh-512's first 60 s (sim/README.md) the scorer's P95
# TTFT with weights 0 / 0.25 / 0.5 / 1 was 1,374 / 905 / 840 / 842 ms, P99 1,974 / 1,581 / 1,545 /
# 1,303. Config: decision.added_delay_weight.
ADDED_DELAY_WEIGHT = 1.0
# Milliseconds of expected TTFT a choice trades for $0.001 per 1K output tokens (the component
# ``cost_penalty_ms``, added to what choices rank by). 0 ranks by time alone. Config:
# decision.cost_weight_ms; measured on mesh-512 in sim/README.md.
COST_WEIGHT_MS = 0.0
COLUMN: dict[str, int] = {name: i for i, name in enumerate(CANONICAL)}
_RUN, _WAIT, _KV = COLUMN[QUEUE_RUNNING], COLUMN[QUEUE_WAITING], COLUMN[KV_CACHE_USAGE]
FloatArray = NDArray[np.float64]

def telemetry_matrix(candidates: Sequence[Candidate]) -> FloatArray:
    """The candidates' telemetry as rows in :data:`CANONICAL` order (NaN: unknown)."""
    rows = [c.telemetry.dense or dense_row(c.telemetry.values) for c in candidates]
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(CANONICAL))


class BasicFeatures:
    """A small default feature vector (the learners' builder replaces it with a richer one)."""

    names: tuple[str, ...] = ("bias", "ttft_s", "cost_rel", "rtt_s", "kv", "cold")

    def build_matrix(self, ctx: RequestContext, candidates: Sequence[Candidate], est: Estimates) -> FloatArray:
        kv = est.telemetry[:, _KV]
        cold = np.array([0.0 if e.warm else 1.0 for e in endpoints_of(candidates)])  # no Candidate built
        return np.column_stack((np.ones(len(candidates)), np.minimum(est.ttft_ms / 1000.0, 10.0),
                                np.minimum(est.cost_per_1k * 1000.0, 10.0), est.rtt_ms / 1000.0,
                                np.where(np.isnan(kv), 0.5, kv), cold))


def score_candidates(ctx: RequestContext, candidates: Sequence[Candidate], features: FeatureBuilder,
                     egress: Mapping[str, float], *, unknown_load: float = 0.5,
                     ledger: EndpointLedger | None = None, now: float = 0.0,
                     added_delay_weight: float = ADDED_DELAY_WEIGHT,
                     cost_weight_ms: float = COST_WEIGHT_MS) -> ScoredArms:
    """Expected TTFT, cost and features for every candidate.

    ``egress`` ($/GB per site id) is for plain sequences of candidates; a
    :class:`~decision.candidates.CandidateSet` carries its own.

    ``ledger`` (what this router knows from its own traffic, read at ``now``): its in-flight
    requests are a lower bound on the load that stale telemetry may not show yet (running is at
    least ``min(inflight, conc)``, waiting at least ``inflight - conc``); what is left of the
    prompts it sent an endpoint adds to the queue wait; an endpoint's outcome-calibrated slowness
    scales its prefill and decode times; and the component ``added_delay_ms`` is the delay this
    prompt would add to later requests there (weighted by ``added_delay_weight``, default
    :data:`ADDED_DELAY_WEIGHT`; config ``decision.added_delay_weight``), which learners add to
    the expected TTFT when they rank arms (:attr:`ScoredArms.rank_ms`).

    ``cost_weight_ms`` prices cost in time: choices also rank by the component ``cost_penalty_ms``
    = ``cost_weight_ms`` x expected $ per 1K tokens / $0.001 (present when the weight is not 0).
    """
    n = len(candidates)
    in_tok = max(1, ctx.estimated_input_tokens or 256)
    out_tok = max(1, ctx.expected_output_tokens or 256)
    egress_gb: FloatArray | None = None
    if isinstance(candidates, CandidateSet):  # the request path: columns already
        static = candidates.column(candidates.placement.numbers)
        tel = candidates.telemetry.values
        rtt = candidates.column(candidates.placement.rtt_ms)
        egress_gb = candidates.column(candidates.placement.egress_per_gb)
        ages = candidates.telemetry.max_age_s()
    else:
        static = np.array([endpoint_numbers(c.endpoint) for c in candidates], dtype=np.float64).reshape(n, NUMBERS)
        tel = telemetry_matrix(candidates)
        rtt = np.array([c.rtt_ms for c in candidates], dtype=np.float64)
        if egress:
            egress_gb = np.array([egress.get(c.endpoint.site_id, 0.0) for c in candidates], dtype=np.float64)
        ages = np.array([c.telemetry.max_age_s for c in candidates], dtype=np.float64)
    own: FloatArray | None = None
    if ledger is not None:
        ids = candidates.endpoint_ids if isinstance(candidates, CandidateSet) else [c.endpoint.endpoint_id
                                                                                     for c in candidates]
        own = ledger.state_of(ids)
    out = np.empty((len(ESTIMATE_ROWS), n), dtype=np.float64)
    _kernels.estimate(np.ascontiguousarray(static), np.ascontiguousarray(tel), np.ascontiguousarray(rtt),
                      None if egress_gb is None else np.ascontiguousarray(egress_gb),
                      own, len(CANONICAL), _RUN, _WAIT, _KV, float(in_tok), float(out_tok), unknown_load,
                      # Egress is paid on prompt and completion text, spread over the completion's 1K tokens.
                      (in_tok + out_tok) * BYTES_PER_TOKEN / 1e9 * 1000.0 / out_tok, now,
                      ledger.rate_window_s if ledger is not None else 1.0, added_delay_weight, cost_weight_ms, out)
    ttft, cost, queue_ms, prefill_ms, cold_ms, running, waiting, kv, added, cost_ms, ranked = out
    # Features see what learners rank by (ScoredArms.rank_ms), so a learner's prior ranks like the scorer.
    # (Without a ledger the added delay is 0.)
    est = Estimates(ranked, cost, queue_ms, rtt, tel, ages)
    matrix = np.ascontiguousarray(features.build_matrix(ctx, candidates, est), dtype=np.float64)
    if matrix.shape != (n, len(features.names)):
        raise ValueError(f"feature builder returned shape {matrix.shape}, expected {(n, len(features.names))}")
    comps = dict(zip(COMPONENTS, (queue_ms, prefill_ms, rtt, cold_ms, running, waiting, kv), strict=True))
    if own is not None:
        comps["added_delay_ms"] = added
    if cost_weight_ms:
        comps["cost_penalty_ms"] = cost_ms
    return ScoredArms(candidates, matrix, ttft, cost, comps, rank_ms=ranked)
