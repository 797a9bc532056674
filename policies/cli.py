"""``infermesh policy check | test | explain``: the policy author's commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from decision.cli_args import UsageError, shipped
from policies.bundle import DEFAULT_BUNDLE

_DEFAULT_DIR = "policies/bundles/default"


def _dir(arg: str | None) -> Path:
    """The bundle directory named on the command line (else the default bundle); a name that is not a
    directory is a usage error (exit 2, as ``fleet check`` treats a missing file), not a failed bundle."""
    if not arg:
        p = Path(_DEFAULT_DIR)
        return p if p.exists() else DEFAULT_BUNDLE
    p = Path(arg)
    if not p.is_dir():
        raise UsageError(f"{arg}: {'not a directory' if p.exists() else 'no such directory'}")
    return p


def cmd_check(args: argparse.Namespace) -> int:
    from policies.bundle import compile_bundle
    from policies.errors import BundleError
    from policies.selftest_child import compile_isolated

    try:
        directory = _dir(args.dir)
        compile_isolated(directory)  # rego-cpp can abort the process on a malformed module: a child first
        bundle = compile_bundle(directory)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except BundleError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)  # as fleet check: problems on stderr, the verdict on stdout
        return 1
    print(f"{directory}: {len(bundle.rules)} rules compiled, revision {bundle.revision}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from policies.selftest import summary
    from policies.selftest_child import run_tests_isolated

    try:
        directory = _dir(args.dir)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    results = run_tests_isolated(directory)
    for r in results:
        print(r)
    print(summary(results))
    return 0 if results and all(r.passed for r in results) else 1


def explain(request: dict[str, Any], fleet_path: Path, policies: Path) -> dict[str, Any]:
    """Which rules allowed or removed which candidates, and why (no telemetry: a cold fleet)."""
    from decision.convert import request_from_json
    from decision.engine import DecisionEngine
    from decision.fleet import load_fleet
    from decision.health_guard import BuiltinHealthGuard
    from decision.telemetry import TelemetryStore
    from decision.validation import validate_request
    from learners.least_ttft import LeastExpectedTtft
    from policies.bundle import compile_bundle
    from policies.guard import PolicyGuard

    fleet = load_fleet(fleet_path)
    ctx = request_from_json(request)
    validate_request(ctx)  # as a Decide would: the report is about requests the service would judge
    guard = PolicyGuard(compile_bundle(policies))
    engine = DecisionEngine(fleet, TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints}),
                            BuiltinHealthGuard(), LeastExpectedTtft())
    now = time.time()
    ctx = engine.with_modality(fleet, ctx)  # as a Decide sees it
    candidates = engine.locate(fleet, ctx, now)
    result = guard.evaluate(ctx, candidates, {**guard.peek(ctx), "inventory_revision": fleet.revision,
                                              "now": now})
    rows: dict[str, dict[str, Any]] = {c.endpoint.endpoint_id: {"allowed": False, "denied_by": [], "warnings": []}
                                       for c in candidates}
    request_verdicts = []
    for v in result.verdicts:
        if not v.endpoint_id:
            request_verdicts.append(v.as_dict())
        elif not v.allow:
            rows[v.endpoint_id]["denied_by" if v.severity == "deny" else "warnings"].append(
                {"rule": v.rule_id, "engine": v.engine, "reason": v.reason})
    for c in result.allowed:
        rows[c.endpoint.endpoint_id]["allowed"] = True
    return {"revision": result.revision, "candidates": len(candidates), "allowed": len(result.allowed),
            "quota_denied": result.quota_denied, "removing_rules": list(result.removing_rules()),
            "request_rules": request_verdicts, "endpoints": rows,
            # The request's cost cap is judged on the score stage's expected cost, which this report
            # does not compute: a Decide may still remove allowed candidates by it.
            "cost_cap_not_judged": ctx.max_cost_per_1k_tokens > 0}


def cmd_explain(args: argparse.Namespace) -> int:
    from decision.cli_args import read_json_request
    from decision.errors import DecisionError
    from decision.fleet import InventoryError
    from policies.errors import BundleError

    try:
        _, request = read_json_request(args.request)  # a JSON object, or a UsageError
        report = explain(request, Path(args.fleet), _dir(args.policies))
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (InventoryError, BundleError) as exc:  # file:line: what, one per line
        print(str(exc), file=sys.stderr)
        return 2
    except DecisionError as exc:  # a bad field, an unknown model: named as Decide names them
        print(f"{args.request}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"policy {report['revision']}: {report['allowed']} of {report['candidates']} candidates allowed")
    if report["cost_cap_not_judged"]:
        print("note: the request's max_cost_per_1k_tokens (rule request.max_cost_per_1k_tokens) is judged after "
              "scoring, which this report does not do; a Decide may remove more candidates by it")
    for v in report["request_rules"]:
        print(f"  request  {'allow' if v['allow'] else 'DENY '} {v['rule_id']} ({v['engine']}): {v['reason']}")
    for eid, row in report["endpoints"].items():
        if row["allowed"]:
            print(f"  ALLOWED  {eid}")
        for d in row["denied_by"]:
            print(f"  REMOVED  {eid}: {d['rule']} ({d['engine']}): {d['reason']}")
        for w in row["warnings"]:
            print(f"  warning  {eid}: {w['rule']} ({w['engine']}): {w['reason']}")
    if report["removing_rules"]:
        print(f"removed by: {', '.join(report['removing_rules'])}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("policy", help="check, test and explain policy bundles")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    c = psub.add_parser("check", help="compile every rule; errors as file:line:col: message")
    c.add_argument("dir", nargs="?", default=None, help=f"bundle folder (default {_DEFAULT_DIR})")
    c.set_defaults(func=cmd_check)
    t = psub.add_parser("test", help="run every Rego test_* rule and CEL case")
    t.add_argument("dir", nargs="?", default=None, help=f"bundle folder (default {_DEFAULT_DIR})")
    t.set_defaults(func=cmd_test)
    e = psub.add_parser("explain", help="which rules allow or remove which candidates for a request")
    e.add_argument("--request", required=True, help="request JSON (DecideRequest field names)")
    e.add_argument("--fleet", default=shipped("deploy/demo/fleet.yaml"),
                   help="inventory YAML (default the demo's, deploy/demo/fleet.yaml)")
    e.add_argument("--policies", default=None, help=f"bundle folder (default {_DEFAULT_DIR})")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_explain)
