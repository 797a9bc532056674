"""The score stage: expected TTFT and cost per candidate, and a basic feature vector.

Expected TTFT = queue wait + prefill (slowed by the running batch) + network round trip +
cold start. Unknown or stale telemetry is not trusted: the queue is then assumed to be
``unknown_load`` full, which makes a blind endpoint look worse than a known idle one.
"""

from __future__ import annotations

from collections.abc import Mapping

from decision.contracts import FeatureBuilder
from decision.domain import Candidate, RequestContext, ScoredCandidate
from decision.telemetry import KV_CACHE_USAGE, QUEUE_RUNNING, QUEUE_WAITING

BYTES_PER_TOKEN = 4.0  # egress estimate for prompt + completion text


class BasicFeatures:
    """A small default feature vector (the learners' builder replaces it with a richer one)."""

    names: tuple[str, ...] = ("bias", "ttft_s", "cost_rel", "rtt_s", "kv", "cold")

    def build(self, ctx: RequestContext, candidate: Candidate, expected_ttft_ms: float,
              expected_cost_per_1k: float, components: Mapping[str, float]) -> tuple[float, ...]:
        return (1.0, min(expected_ttft_ms / 1000.0, 10.0), min(expected_cost_per_1k * 1000.0, 10.0),
                candidate.rtt_ms / 1000.0, components.get("kv_cache_usage", 0.5),
                0.0 if candidate.endpoint.warm else 1.0)


def score_candidates(ctx: RequestContext, candidates: tuple[Candidate, ...], features: FeatureBuilder,
                     egress: Mapping[str, float], *, unknown_load: float = 0.5,
                     inflight: Mapping[str, int] | None = None) -> tuple[ScoredCandidate, ...]:
    """Expected TTFT, cost and features for every candidate (one loop: the decision's hot path).

    ``inflight`` (requests this router sent and has no outcome for, per endpoint) is a lower bound
    on the load that stale telemetry may not show yet: running is at least ``min(inflight, conc)``
    and waiting at least ``inflight - conc``.
    """
    local_load = inflight or {}
    build = features.build
    in_tok = max(1, ctx.estimated_input_tokens or 256)
    out_tok = max(1, ctx.expected_output_tokens or 256)
    bytes_gb = (in_tok + out_tok) * BYTES_PER_TOKEN / 1e9
    out = []
    for c in candidates:
        ep = c.endpoint
        vals = c.telemetry.values
        conc = float(ep.max_concurrency)
        running = vals.get(QUEUE_RUNNING)
        if running is None:
            running = unknown_load * conc
        waiting = vals.get(QUEUE_WAITING)
        if waiting is None:
            waiting = unknown_load * conc * 0.25
        kv = vals.get(KV_CACHE_USAGE, unknown_load)
        local = local_load.get(ep.endpoint_id, 0)
        if local:
            running = max(running, float(min(local, conc)))
            waiting = max(waiting, float(local) - conc)
        prefill_s = in_tok / ep.prefill_tokens_per_s
        # One request's time on the endpoint; the waiting queue drains conc requests at a time.
        service_s = prefill_s + out_tok / ep.decode_tokens_per_s
        queue_ms = 1000.0 * service_s * waiting / conc
        # KV-cache pressure above 90% forces preemption/queuing: penalise steeply.
        if kv > 0.9:
            queue_ms += 1000.0 * service_s * (kv - 0.9) * 10.0
        prefill_ms = 1000.0 * prefill_s * (1.0 + running / conc)
        cold_ms = 0.0 if ep.warm else ep.cold_start_ms
        rtt = c.rtt_ms
        ttft = queue_ms + prefill_ms + rtt + cold_ms
        cost = ep.nominal_cost_per_1k + egress.get(ep.site_id, 0.0) * bytes_gb * 1000.0 / out_tok
        comps = {"queue_ms": queue_ms, "prefill_ms": prefill_ms, "rtt_ms": rtt, "cold_start_ms": cold_ms,
                 "running": running, "waiting": waiting, "kv_cache_usage": kv}
        out.append(ScoredCandidate(c, build(ctx, c, ttft, cost, comps), ttft, cost, comps))
    return tuple(out)
