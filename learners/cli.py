"""``infermesh learn ...``: off-policy evaluation from the audit log, and the learners' benchmark.

``infermesh learn evaluate --from T1 --to T2 --learner CONFIG`` reads the routed decisions made in
``[T1, T2)`` (read as the audit commands read ``--from``/``--to``: :mod:`audit.time_range`)
and their outcomes from the audit log (``--database-url``, ``INFERMESH_DATABASE_URL``,
or the embedded database under ``INFERMESH_DATA_DIR``, as the audit commands read it), replays
them in decision order through the candidate learner
(``CONFIG`` is ``name`` or ``name:key=value,...``, see :mod:`learners.registry`), and estimates its
value with IPS, SNIPS and doubly robust estimators against the logged policy's own value. The
candidate is evaluated progressively: each record is scored by the candidate as trained on the
records before it, then the candidate learns from that record's logged outcome (what it would
have known had it been running). Decisions without an outcome are left out unless
``--missing-reward`` gives them one.

``infermesh learn bench`` measures each learner's choose and update cost for N arms and its
regret on the slow-site environment (:mod:`learners.simenv`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from audit.time_range import FROM_HELP, TO_HELP
from decision.cli_args import bounded_int
from decision.domain import Candidate, Endpoint, RequestContext, ScoredCandidate, TelemetryReading


def _finite(text: str) -> float:
    """An argparse ``type``: a finite number (a NaN or infinite reward makes every estimate NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _learner_spec(text: str) -> str:
    """An argparse ``type``: a learner spec that builds (checked before any database is read)."""
    from learners.features import FEATURE_NAMES
    from learners.registry import learner_from_spec

    try:
        learner_from_spec(text, len(FEATURE_NAMES))
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def scored_from_trace(trace: Mapping[str, Any],
                      names: Sequence[str]) -> tuple[RequestContext, tuple[ScoredCandidate, ...]]:
    """Rebuild the request and the scored arms a logged decision offered its learner."""
    req = dict(trace.get("request", {}))
    ctx = RequestContext(
        str(req.get("request_id", "")), str(req.get("tenant", "")), user_tier=str(req.get("user_tier", "standard")),
        model=str(req.get("model", "")), model_family=str(req.get("model_family", "")),
        modality=str(req.get("modality", "text")), estimated_input_tokens=int(req.get("estimated_input_tokens") or 0),
        expected_output_tokens=int(req.get("expected_output_tokens") or 0),
        client_region=str(req.get("client_region", "")), session_id=str(req.get("session_id", "")),
        ttft_target_ms=float(req.get("ttft_target_ms") or 0.0),
        max_cost_per_1k_tokens=float(req.get("max_cost_per_1k_tokens") or 0.0))
    eps = trace.get("endpoints", {})
    arms = []
    for row in trace["stages"]["score"]["candidates"]:
        eid = str(row["endpoint_id"])
        info = eps.get(eid, {})
        ep = Endpoint(
            endpoint_id=eid, address="", model=ctx.model, family=ctx.model_family, runtime="vllm", max_concurrency=1,
            modality=ctx.modality, safety_tier="", node_id="", gpu_type=str(info.get("gpu_type", "")), gpu_count=1,
            gpu_hour_usd=0.0, watts_per_gpu=0.0, site_id=str(info.get("site", "")), region=str(info.get("region", "")),
            jurisdiction=str(info.get("jurisdiction", "")), tier=info.get("tier", "datacenter"),
            certifications=frozenset(), owner_tenant=None, prefill_tokens_per_s=1.0, decode_tokens_per_s=1.0,
            cold_start_ms=0.0, warm=True)
        feats = tuple(float(row["features"].get(n, 0.0)) for n in names)
        arms.append(ScoredCandidate(Candidate(ep, TelemetryReading(eid, {}, {}), float(info.get("rtt_ms", 0.0))),
                                    feats, float(row.get("expected_ttft_ms") or 0.0),
                                    float(row.get("expected_cost_per_1k_tokens") or 0.0),
                                    dict(row.get("components", {}))))
    return ctx, tuple(arms)


def evaluate_log(url: str, start: float, end: float, spec: str, *, logged_learner: str | None = None,
                 missing_reward: float | None = None) -> dict[str, Any]:
    """Load the audit log window and estimate the candidate's value (see the module docstring)."""
    from learners.ope import LoggedRecord, evaluate
    from learners.registry import learner_from_spec
    from learners.store import LearnerStore, feature_names_of

    store = LearnerStore(url)
    try:
        records: list[LoggedRecord] = []
        probs: list[np.ndarray] = []
        learner: Any = None
        names: tuple[str, ...] = ()
        skipped = {"no_outcome": 0, "chosen_not_logged": 0, "bad_propensity": 0}
        for rec in store.decisions_between(start=start, end=end, learner=logged_learner):
            reward = rec.reward if rec.reward is not None else missing_reward
            if reward is None:
                skipped["no_outcome"] += 1
                continue
            if not 0.0 < rec.propensity <= 1.0:
                skipped["bad_propensity"] += 1
                continue
            if learner is None:
                names = feature_names_of(rec.trace)
                learner = learner_from_spec(spec, len(names))
            ctx, arms = scored_from_trace(rec.trace, names)
            chosen_id = rec.trace["stages"]["choose"]["chosen"]
            ids = [a.candidate.endpoint.endpoint_id for a in arms]
            if chosen_id not in ids:
                skipped["chosen_not_logged"] += 1
                continue
            action = ids.index(chosen_id)
            probs.append(np.asarray(learner.probabilities(ctx, arms), dtype=float))
            X = np.array([a.features for a in arms], dtype=float)
            records.append(LoggedRecord(X, action, rec.propensity, float(reward)))
            learner.update(arms[action].features, float(reward))
    finally:
        store.close()
    if not records:
        return {"records": 0, "skipped": skipped, "estimates": {}}
    est = evaluate(records, probs)
    return {"records": len(records), "skipped": skipped, "learner": spec, "features": len(names),
            "estimates": {k: v.as_dict() for k, v in est.items()},
            "improvement_dr": est["dr"].value - est["logged"].value}


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import psycopg

    from audit import database
    from audit.time_range import BadBound, parse_range

    try:  # read as the audit commands read them: an auditor and a learner's evaluator see the same decisions
        first, last = parse_range(args.start, args.end, from_name="--from", to_name="--to")
    except BadBound as exc:
        print(f"infermesh learn evaluate: {exc}", file=sys.stderr)
        return 2
    assert first is not None and last is not None  # both are required options
    url = args.database_url
    try:
        if url:
            database.check_schema(url)
        else:  # INFERMESH_DATABASE_URL, else the embedded log the service keeps, as the audit commands read it
            url, _server = database.open_existing()
    except database.NoAuditLog as exc:
        print(f"infermesh learn evaluate: {exc}", file=sys.stderr)
        return 2
    try:
        out = evaluate_log(url, first.timestamp(), last.timestamp(), args.learner, logged_learner=args.logged_learner,
                           missing_reward=args.missing_reward)
    except psycopg.Error as exc:  # lost mid-run
        print(f"infermesh learn evaluate: the audit database failed: {database.first_line(exc)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:  # the candidate refused a logged record (e.g. a reward it cannot take)
        print(f"infermesh learn evaluate: --learner {args.learner}: {exc}", file=sys.stderr)
        return 2
    print(f"off-policy evaluation of {args.learner} on {out['records']} logged decisions "
          f"(skipped: {out['skipped']})")
    if out["estimates"]:
        print(f"{'estimator':<10}{'value':>10}{'95% CI':>24}{'ESS':>10}{'n':>8}")
        for name, e in out["estimates"].items():
            print(f"{name:<10}{e['value']:>10.4f}   [{e['ci_low']:>9.4f}, {e['ci_high']:>9.4f}]"
                  f"{e['ess']:>10.1f}{e['n']:>8d}")
        print(f"candidate - logged (DR): {out['improvement_dr']:+.4f}")
    if args.json:
        print(json.dumps(out))
    return 0 if out["records"] else 1


def bench(arms: int = 32, iterations: int = 2000, steps: int = 0, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per-decision choose and update cost (µs) of every registered learner for ``arms`` arms,
    and optionally the regret over ``steps`` steps of the slow-site environment."""
    from learners.features import FEATURE_NAMES
    from learners.registry import make_learner, names
    from learners.testing import toy_arms

    rng = np.random.default_rng(seed)
    d = len(FEATURE_NAMES)
    feats = rng.random((arms, d)).tolist()
    offered = toy_arms((rng.random(arms) * 500).tolist(), feats)
    ctx = RequestContext("bench", "t")
    out: dict[str, dict[str, float]] = {}
    for name in names():
        learner = make_learner(name, d, **({} if name == "least-ttft" else {"seed": seed}))
        for _ in range(200):
            c = learner.choose(ctx, offered)
            learner.update(offered[c.arm].features, 0.5)
        t0 = time.perf_counter()
        for _ in range(iterations):
            # Fresh tuple each time: the feature-matrix cache must not make the benchmark flatter.
            c = learner.choose(ctx, tuple(offered))
        t1 = time.perf_counter()
        x = offered[c.arm].features
        for _ in range(iterations):
            learner.update(x, 0.5)
        t2 = time.perf_counter()
        row = {"choose_us": (t1 - t0) / iterations * 1e6, "update_us": (t2 - t1) / iterations * 1e6}
        row["total_us"] = row["choose_us"] + row["update_us"]
        if steps:
            from learners.simenv import SlowSiteEnv

            res = SlowSiteEnv(seed=seed).run(make_learner(name, d, **({} if name == "least-ttft" else {"seed": seed})),
                                             steps)
            row["regret"] = res.regret()
            row["reward_last_third"] = res.mean_reward(2 * steps // 3)
        out[name] = row
    return out


def _cmd_bench(args: argparse.Namespace) -> int:
    res = bench(args.arms, args.iterations, args.steps, args.seed)
    print(f"learners, {args.arms} arms, {len(next(iter(res.values())))} measures")
    cols = list(next(iter(res.values())))
    print(f"{'learner':<16}" + "".join(f"{c:>20}" for c in cols))
    for name, row in res.items():
        print(f"{name:<16}" + "".join(f"{row[c]:>20.2f}" for c in cols))
    if args.json:
        print(json.dumps({"arms": args.arms, "learners": res}))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    learn = sub.add_parser("learn", help="learners: off-policy evaluation and benchmark")
    lsub = learn.add_subparsers(dest="learn_command", required=True, metavar="COMMAND")
    ev = lsub.add_parser("evaluate", help="estimate a candidate learner's value from the audit log (IPS, SNIPS, DR)")
    ev.add_argument("--from", dest="start", required=True, help=f"decisions {FROM_HELP}")
    ev.add_argument("--to", dest="end", required=True, help=f"decisions {TO_HELP}")
    ev.add_argument("--learner", required=True, type=_learner_spec,
                    help="candidate: NAME or NAME:key=value,... (e.g. linucb:alpha=0.5)")
    ev.add_argument("--logged-learner", default=None, help="only decisions made by this NAME@VERSION")
    ev.add_argument("--missing-reward", type=_finite, default=None,
                    help="reward of decisions whose outcome never came (default: leave them out)")
    ev.add_argument("--database-url", default="",
                    help="PostgreSQL URL (default: INFERMESH_DATABASE_URL, else the embedded log under "
                         "INFERMESH_DATA_DIR)")
    ev.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    ev.set_defaults(func=_cmd_evaluate)
    b = lsub.add_parser("bench", help="per-decision choose/update cost of every learner (and regret)")
    b.add_argument("--arms", type=bounded_int(1, 100_000), default=32)
    b.add_argument("--iterations", type=bounded_int(1, 10_000_000), default=2000)
    b.add_argument("--steps", type=bounded_int(0, 10_000_000), default=0,
                   help="also run the slow-site environment for this many steps")
    b.add_argument("--seed", type=bounded_int(0, 2**32 - 1), default=0)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_bench)
