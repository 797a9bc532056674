"""The stored shape of a decision trace, and its expansion for readers.

Every decision's trace goes to the audit log, so its cost is paid once per decision on a
thread that shares the interpreter with the request path. The stored form (``version`` 2) is
therefore compact and mostly references objects that already exist: per-candidate rows are
lists aligned with ``candidates``, telemetry keeps the store's own value and timestamp maps
(ages are ``at - timestamp``), features are the learner's tuples with their names once, rule
facts are listed once and verdicts point at them. :func:`expand_trace` turns it into the
readable shape (``version`` 1 keys: ``stages.locate/guard/score/choose``, ``telemetry``,
``endpoints``) that the CLI, the API, the page and the learners read; a version-1 trace passes
through unchanged.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from decision.candidates import CandidateSet, FloatArray, endpoint_ids_of
from decision.domain import (
    Candidate,
    Choice,
    Endpoint,
    GuardResult,
    RequestContext,
    Route,
    ScoredArms,
    ScoredCandidate,
    VerdictTable,
)

ENDPOINT_FIELDS = ("site", "region", "tier", "gpu_type", "jurisdiction", "rtt_ms")


def endpoint_row(ep: Endpoint, rtt_ms: float) -> list[Any]:
    """One candidate's static facts, in :data:`ENDPOINT_FIELDS` order."""
    return [ep.site_id, ep.region, ep.tier, ep.gpu_type, ep.jurisdiction, rtt_ms]


def endpoint_rows(candidates: Sequence[Candidate]) -> list[list[Any]]:
    return [endpoint_row(c.endpoint, c.rtt_ms) for c in candidates]


Snapshot = tuple[tuple[str, ...], list[float | None], list[int]]
"""One candidate's telemetry in a trace: (names ever reported, values with None = stale/unknown, ages in ms)."""


class TraceParts(NamedTuple):
    """What a stored trace is made of, gathered cheaply at decision time (:func:`trace_parts`).

    Mostly references to objects that already exist and never change (the placement's endpoint ids
    and rows, the guard's memoised verdict groups, the telemetry store's merged readings) and the
    score stage's arrays. The audit log stores the parts themselves (``audit.trace_store``; the
    writer process gets the shared objects once, then handles); :func:`assemble_trace` turns them
    into the version-2 trace dict, for whoever reads the trace.
    """

    request: RequestContext | Mapping[str, Any]  # a mapping once it has crossed to the writer process
    inventory_revision: str
    policy_revision: str
    learner: str
    at: float
    candidate_ids: Sequence[str]
    endpoints: list[list[Any]]
    # A VerdictTable, or (rule rows, [endpoint id or "", rule index, allow, reason] rows) for plain verdicts.
    verdicts: VerdictTable | tuple[list[list[str]], list[list[Any]]]
    allowed_ids: Sequence[str]
    quota_denied: bool
    scored_ids: Sequence[str]
    ttft_ms: FloatArray
    cost_per_1k: FloatArray
    scores: Sequence[float] | None
    components: Mapping[str, FloatArray]  # name -> one value per scored candidate
    features: FloatArray
    chosen: str | None
    propensity: float | None
    fallbacks: list[str]
    shadows: list[Mapping[str, Any]]
    feature_names: tuple[str, ...]
    timings_us: dict[str, float]
    # (merged readings, at, stale limit) of the located set, or each candidate's Snapshot.
    telemetry: tuple[Sequence[Any], float, float] | list[Snapshot]


def trace_parts(*, ctx: RequestContext, inventory_revision: str, learner: str, now: float,
                candidates: Sequence[Candidate], result: GuardResult, scored: Sequence[ScoredCandidate],
                choice: Choice | None, fallbacks: Sequence[Route], shadows: Sequence[Mapping[str, Any]],
                feature_names: Sequence[str], timings: Mapping[str, float],
                endpoints: list[list[Any]] | None = None) -> TraceParts:
    """The parts of a decision's trace; cheap (no per-candidate Python work on the request path)."""
    ids = endpoint_ids_of(candidates)
    table = result.verdicts
    verdicts: VerdictTable | tuple[list[list[str]], list[list[Any]]]
    if isinstance(table, VerdictTable):
        verdicts = table
    else:
        rules: dict[str, int] = {}
        rule_rows: list[list[str]] = []
        rows: list[list[Any]] = []
        for v in table:
            r = rules.get(v.rule_id)
            if r is None:
                r = rules[v.rule_id] = len(rule_rows)
                rule_rows.append([v.rule_id, v.engine, v.kind, str(v.severity)])
            rows.append([v.endpoint_id, r, v.allow, v.reason])
        verdicts = (rule_rows, rows)
    cols = ScoredArms.of(scored)
    scored_ids = endpoint_ids_of(cols.candidates)
    telemetry: tuple[Sequence[Any], float, float] | list[Snapshot]
    if isinstance(candidates, CandidateSet):
        batch = candidates.telemetry
        telemetry = (batch.merged, batch.at, batch.stale_after_s)
    else:
        telemetry = list(_snapshots(candidates, now))
    return TraceParts(
        request=ctx, inventory_revision=inventory_revision, policy_revision=result.revision, learner=learner,
        at=now, candidate_ids=ids, endpoints=endpoints if endpoints is not None else endpoint_rows(candidates),
        verdicts=verdicts, allowed_ids=endpoint_ids_of(result.allowed), quota_denied=result.quota_denied,
        scored_ids=scored_ids, ttft_ms=cols.ttft_ms, cost_per_1k=cols.cost_per_1k,
        scores=choice.scores if choice is not None else None, components=cols.components,
        features=cols.matrix, chosen=scored_ids[choice.arm] if choice is not None else None,
        propensity=choice.propensity if choice is not None else None,
        fallbacks=[r.endpoint_id for r in fallbacks], shadows=list(shadows), feature_names=tuple(feature_names),
        timings_us=dict(timings), telemetry=telemetry)


def assemble_trace(p: TraceParts) -> dict[str, Any]:
    """The version-2 trace from its parts (readers of the audit log run this for every trace they
    read): shared outcome tuples are spread into rows as they are, columns are zipped into rows."""
    ids = list(p.candidate_ids)
    index = {eid: i for i, eid in enumerate(ids)}
    table = p.verdicts
    verdicts: list[list[Any]]
    if isinstance(table, VerdictTable):  # columns: no Verdict objects
        rule_rows = [[r.rule_id, r.engine, r.kind, str(r.severity)] for r in table.rules]
        verdicts = [[-1, *o] for o in table.request]
        groups = table.groups
        if list(table.endpoint_ids) == ids:
            positions: Iterable[int] = range(len(ids))
        else:
            positions = (index.get(e, -1) for e in table.endpoint_ids)
        for cand, judged in zip(positions, zip(*groups, strict=True), strict=False):  # no groups: none
            for _, outcomes in judged:
                verdicts += [[cand, *o] for o in outcomes]
    else:
        rule_rows = table[0]
        verdicts = [[index.get(eid, -1) if eid else -1, r, allow, reason] for eid, r, allow, reason in table[1]]
    scores = p.scores
    names = list(p.components)
    n = len(p.scored_ids)
    comp_rows: Iterable[Sequence[float]] = (zip(*[p.components[k].tolist() for k in names], strict=True) if names
                                            else [()] * n)
    positions_scored = ids_index(p.scored_ids, ids, index)
    score_rows = [[i, ttft, cost, s, list(comps)] for i, ttft, cost, s, comps in zip(
        positions_scored, p.ttft_ms.tolist(), p.cost_per_1k.tolist(),
        scores if scores is not None else [None] * n, comp_rows, strict=True)]
    # Features as one little-endian float32 matrix in base64: JSON-encoding thousands of floats would
    # cost more than the decision itself; float32 keeps ~7 significant digits, plenty to replay and audit.
    packed = base64.b64encode(np.asarray(p.features).astype("<f4").tobytes()).decode()
    return {
        "version": 2,
        "request": p.request.as_dict() if isinstance(p.request, RequestContext) else dict(p.request),
        "inventory_revision": p.inventory_revision,
        "policy_revision": p.policy_revision,
        "learner": p.learner,
        "at": p.at,
        "candidates": ids,
        "endpoints": p.endpoints,
        "guard": {"rules": rule_rows, "verdicts": verdicts, "allowed": ids_index(p.allowed_ids, ids, index),
                  "quota_denied": p.quota_denied},
        "score": {"feature_names": list(p.feature_names), "component_names": names,
                  "rows": score_rows, "features_f32": packed},
        "choose": {"chosen": p.chosen, "propensity": p.propensity, "fallbacks": list(p.fallbacks),
                   "shadow": list(p.shadows)},
        "telemetry": _telemetry(p.telemetry),
        "timings_us": dict(p.timings_us),
    }


def ids_index(subset: Sequence[str], ids: Sequence[str], index: Mapping[str, int]) -> list[int]:
    """Positions of ``subset`` in ``ids`` (``index`` maps id to position); no lookups when they are the same."""
    if len(subset) == len(ids) and list(subset) == ids:
        return list(range(len(ids)))
    return [index[e] for e in subset]


def compact_trace(*, ctx: RequestContext, inventory_revision: str, learner: str, now: float,
                  candidates: Sequence[Candidate], result: GuardResult, scored: Sequence[ScoredCandidate],
                  choice: Choice | None, fallbacks: Sequence[Route], shadows: Sequence[Mapping[str, Any]],
                  feature_names: Sequence[str], timings: Mapping[str, float],
                  endpoints: list[list[Any]] | None = None) -> dict[str, Any]:
    """The version-2 trace in one step (:func:`trace_parts` then :func:`assemble_trace`)."""
    return assemble_trace(trace_parts(ctx=ctx, inventory_revision=inventory_revision, learner=learner, now=now,
                                      candidates=candidates, result=result, scored=scored, choice=choice,
                                      fallbacks=fallbacks, shadows=shadows, feature_names=feature_names,
                                      timings=timings, endpoints=endpoints))


def _telemetry(source: tuple[Sequence[Any], float, float] | list[Snapshot]) -> dict[str, Any]:
    """Per candidate: [key-set index, values (None = stale/unknown), ages in ms]; key sets listed once."""
    key_sets: dict[tuple[str, ...], int] = {}
    rows: list[list[Any]] = []
    snapshots = _merged_snapshots(*source) if isinstance(source, tuple) else source
    for names, values, age_ms in snapshots:
        keys = names if isinstance(names, tuple) else tuple(names)  # a list once shipped as MessagePack
        k = key_sets.get(keys)
        if k is None:
            k = key_sets[keys] = len(key_sets)
        rows.append([k, values, age_ms])
    return {"keys": [list(k) for k in key_sets], "rows": rows}


def _merged_snapshots(merged: Sequence[Any], at: float, stale_after_s: float) -> Iterator[Snapshot]:
    """Each :data:`Snapshot` of a located set, straight from the telemetry store's merged tuples
    (names, values, timestamps, oldest): no per-endpoint dict, values copied only to blank stale ones."""
    limit = at - stale_after_s
    for names, values, stamps, oldest in merged:
        if oldest < limit:
            values = [v if st >= limit else None for v, st in zip(values, stamps, strict=True)]
        yield names, values, [int((at - st) * 1000.0) for st in stamps]


def _snapshots(candidates: Sequence[Candidate], now: float) -> Iterator[Snapshot]:
    """Each candidate's :data:`Snapshot` from its reading (a located set's come from its batch's
    merged readings instead: :func:`_merged_snapshots`)."""
    for c in candidates:
        ages = c.telemetry.ages_s
        vals = c.telemetry.values
        known_stamps: Mapping[str, float] | None = getattr(ages, "stamps", None)
        if known_stamps is not None:
            keys = tuple(known_stamps)
            yield keys, [vals.get(k) for k in keys], [int((now - st) * 1000.0) for st in known_stamps.values()]
        else:  # a reading built by hand: ages without timestamps
            keys = tuple(ages)
            yield keys, [vals.get(k) for k in keys], [int(a * 1000.0) for a in ages.values()]


def expand_trace(trace: Mapping[str, Any]) -> dict[str, Any]:
    """The readable shape of a stored trace (version 1 keys); version-1 traces pass through."""
    if trace.get("version") != 2:
        return dict(trace)
    ids: list[str] = list(trace.get("candidates") or [])
    guard = trace.get("guard") or {}
    rules = guard.get("rules") or []
    revision = trace.get("policy_revision")
    verdicts = []
    removed: dict[str, list[str]] = {}
    for cand, r, allow, reason in guard.get("verdicts") or []:
        rule_id, engine, kind, severity = rules[r]
        ep = ids[cand] if cand >= 0 else ""
        verdicts.append({"rule_id": rule_id, "engine": engine, "kind": kind, "allow": allow, "reason": reason,
                         "revision": revision, "endpoint_id": ep, "severity": severity})
        if not allow and ep and severity == "deny":
            removed.setdefault(ep, []).append(rule_id)
    score = trace.get("score") or {}
    names = score.get("feature_names") or []
    flat = np.frombuffer(base64.b64decode(score.get("features_f32") or ""), dtype="<f4").tolist()
    width = len(names)
    comp_names = score.get("component_names") or []
    score_rows = [{"endpoint_id": ids[cand], "expected_ttft_ms": ttft, "expected_cost_per_1k_tokens": cost,
                   "components": dict(zip(comp_names, comps, strict=False)), "score": s,
                   "features": dict(zip(names, flat[i * width:(i + 1) * width], strict=True))}
                  for i, (cand, ttft, cost, s, comps) in enumerate(score.get("rows") or [])]
    tel = trace.get("telemetry") or {}
    key_sets = tel.get("keys") or []
    telemetry = {}
    for ep, (k, values, ages_ms) in zip(ids, tel.get("rows") or [], strict=False):
        keys = key_sets[k]
        telemetry[ep] = {"values": {n: v for n, v in zip(keys, values, strict=True) if v is not None},
                         "ages_s": {n: a / 1000.0 for n, a in zip(keys, ages_ms, strict=True)}}
    endpoints = {ep: dict(zip(ENDPOINT_FIELDS, row, strict=False))
                 for ep, row in zip(ids, trace.get("endpoints") or [], strict=False)}
    request = trace.get("request") or {}
    return {
        "version": 1,
        "stored_version": 2,
        "request": request,
        "inventory_revision": trace.get("inventory_revision"),
        "policy_revision": revision,
        "learner": trace.get("learner"),
        "stages": {
            "locate": {"index": f"model:{request.get('model')}" if request.get("model")
                       else f"family:{request.get('model_family')}", "candidates": ids},
            "guard": {"verdicts": verdicts, "allowed": [ids[i] for i in guard.get("allowed") or []],
                      "removed": removed, "quota_denied": bool(guard.get("quota_denied"))},
            "score": {"candidates": score_rows},
            "choose": dict(trace.get("choose") or {}),
        },
        "telemetry": telemetry,
        "endpoints": endpoints,
        "timings_us": trace.get("timings_us") or {},
    }


@dataclass(frozen=True, slots=True)
class TraceArms:
    """The arms of one logged decision as the learner saw them."""

    endpoint_ids: tuple[str, ...]
    features: FloatArray  # one row per arm, columns in the requested names order
    expected_ttft_ms: tuple[float, ...]
    expected_cost_per_1k_tokens: tuple[float, ...]
    chosen: int  # index of the chosen arm, -1 if it is not among them


def trace_arms(trace: Mapping[str, Any], names: Sequence[str]) -> TraceArms:
    """Extract the scored arms of a readable trace (:func:`expand_trace`'s form), features ordered as
    ``names`` (missing = 0); raises ``KeyError`` on another shape."""
    stages = trace["stages"]
    rows = stages["score"]["candidates"]
    chosen_id = stages["choose"]["chosen"]
    ids = tuple(str(r["endpoint_id"]) for r in rows)
    X = np.array([[float(r["features"].get(n, 0.0)) for n in names] for r in rows], dtype=float).reshape(
        len(rows), len(names))
    return TraceArms(ids, X, tuple(float(r.get("expected_ttft_ms") or 0.0) for r in rows),
                     tuple(float(r.get("expected_cost_per_1k_tokens") or 0.0) for r in rows),
                     ids.index(chosen_id) if chosen_id in ids else -1)
