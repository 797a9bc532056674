"""Disguised reads through key enumeration, refused when a bundle is compiled.

A rule is given only what it declares, so a rule that walks the keys of an object it does not declare
whole (``some k, v in c.endpoint; startswith(k, "site")``) reads, in disguise, fields it is never given:
absent, the deny condition on them lets every candidate through. The backstop (every case run again with
every field present) sees such a read only when a case exercises it; these tests are for the static
check, which must refuse it whether or not a case does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from decision.cli import main
from decision.telemetry import CANONICAL
from policies.bundle import DEFAULT_BUNDLE, compile_bundle
from policies.cel_engine import compile_cel
from policies.declared import undeclared_cel_reads, undeclared_rego_reads
from policies.errors import BundleError
from policies.manifest import REQUEST_FIELDS, RuleSpec
from policies.rego_engine import builtin_checker
from tests.policy_support import copied_bundle, edit_text

# Declares one request field, one endpoint field and one age: request, endpoint and age_s are partly declared.
_RULE = RuleSpec(id="t.e", kind="other", engine="rego", file="p.rego", request_fields=["tenant"],
                 endpoint_fields=["tier"], ages=["xid_errors"])
# Declares every request field, every endpoint field (endpoint_fields left out) and every metric.
_WHOLE = RuleSpec(id="t.whole", kind="other", engine="rego", file="p.rego", request_fields=sorted(REQUEST_FIELDS),
                  telemetry=list(CANONICAL), ages=list(CANONICAL))
_HEAD = "package t\nimport rego.v1\n\n"
_BODY = "allow contains c.id if { some c in input.candidates; "


def _rego(body: str, rule: RuleSpec = _RULE) -> list[str]:
    modules = {"p.rego": ("p.rego", _HEAD + _BODY + body + " }")}
    return [str(i) for i in undeclared_rego_reads(modules, "p.rego", rule, builtin_checker())]


def _at(body: str, needle: str) -> str:
    """``p.rego:line:col`` of ``needle`` in the rule ``_rego`` builds from ``body``."""
    return f"p.rego:4:{len(_BODY) + body.index(needle) + 1}"


_RECORD = "but rule t.e does not declare all of its fields (not "
_METRIC = "but rule t.e does not declare all of its metrics (not fb_free_mib, fb_used_mib, gpu_temp_c, gpu_util and "


# -- Rego: enumerations of what the rule does not declare whole ----------------------------------------

@pytest.mark.parametrize(("body", "needle", "message"), [
    ('some k, v in c.endpoint; startswith(k, "site")', "some k, v in c.endpoint",
     "some k, v in c.endpoint: walks a candidate's endpoint, " + _RECORD + "certifications, family, gpu_type"),
    ('some k, v in input.request; startswith(k, "prompt"); v == "medical"', "some k, v in input.request",
     "some k, v in input.request: walks input.request, " + _RECORD + "allowed_jurisdictions, client_region"),
    ('every k, v in input.request { v != "medical" }', "every k, v in input.request",
     "every k, v in input.request: walks input.request, " + _RECORD),
    ('some v in c.endpoint; v == "eu-1"', "some v in c.endpoint", "some v in c.endpoint: walks a candidate's endpoint"),
    ('some k; input.request[k] == "medical"', "input.request[k]", "input.request[k]: walks input.request, " + _RECORD),
    ('c.endpoint[_] == "eu-1"', "c.endpoint[_]", "c.endpoint[_]: walks a candidate's endpoint, " + _RECORD),
    ('ks := object.keys(input.request); "prompt_class" in ks', "input.request",
     "object.keys(input.request): takes the keys of input.request, " + _RECORD),
    ("count(input.request) > 1", "input.request", "count(input.request): counts the keys of input.request, " + _RECORD),
    ("count(c) > 3", "c)", "count(c): counts the keys of a candidate, " + _RECORD + "endpoint.certifications"),
    ('x := {k: v | some k, v in input.request}; x.prompt_class == "medical"', "some k, v in input.request",
     "some k, v in input.request: walks input.request, " + _RECORD),
    ("ks := [k | input.request[k]]; count(ks) > 1", "input.request[k]",  # k iterates: a walk
     "input.request[k]: walks input.request, " + _RECORD),
    ('r := input.request; some k, v in r; startswith(k, "prompt")', "some k, v in r",
     "some k, v in r: walks input.request, " + _RECORD),
    # Also refused as a whole (a built-in the check cannot follow), as before.
    ('walk(input, [path, value]); startswith(path[1], "tel")', "input,",
     "input: uses input as a whole (passed to walk)"),
    ('walk(input.request, [p, v]); p[0] == "prompt_class"', "input.request",
     "input.request: uses input.request as a whole (passed to walk)"),
    ('json.marshal(input) != ""', "input)", "input: uses input as a whole (passed to json.marshal)"),
    ('object.get(input, sprintf("%s", ["request"]), {}).prompt_class == "medical"', "input,",
     'object.get(input, sprintf("%s", ["request"]), ...): reads input with a key that is not written out'),
    ('object.filter(input.request, ["prompt_class"]) != {}', "input.request",
     "input.request: uses input.request as a whole (passed to object.filter)"),
    # A metric map: looking at the key of its walk picks metrics out by name.
    ('some m, v in c.age_s; startswith(m, "gpu"); v > 30', 'm, "gpu"',
     "m: looks at the key of a walk of a candidate's age_s, " + _METRIC + "6 more)"),
    ('some m; c.age_s[m] > 30; m == "gpu_temp_c"', 'm == "gpu',
     "m: looks at the key of a walk of a candidate's age_s, " + _METRIC),
    ("stale := {m | some m, v in c.age_s; v > 30}; count(stale) > 0", "m | some",
     "m: looks at the key of a walk of a candidate's age_s, " + _METRIC),
    ('"gpu_temp_c" in object.keys(c.telemetry)', "c.telemetry",
     "object.keys(c.telemetry): takes the keys of a candidate's telemetry, but rule t.e does not declare all of its "
     "metrics (not fb_free_mib, fb_used_mib, gpu_temp_c, gpu_util and 7 more)"),
], ids=["endpoint-key-startswith", "request-key-and-value", "every", "value-walk", "some-k-index", "index-underscore",
        "object.keys", "count", "count-candidate", "object-comprehension", "set-comprehension", "through-variable",
        "walk-input", "walk-request", "json.marshal", "object.get-sprintf", "object.filter", "metric-key-startswith",
        "metric-some-k-compared", "metric-keys-collected", "metric-object.keys"])
def test_a_rego_enumeration_of_what_the_rule_does_not_declare_whole_is_refused(body: str, needle: str,
                                                                               message: str) -> None:
    issues = _rego(body)
    assert [i for i in issues if i.startswith(f"{_at(body, needle)}: {message}")], issues
    assert len(issues) == 1, issues


def test_the_refusal_names_the_rule_the_construct_and_what_it_leaves_out() -> None:
    (issue,) = _rego('some k, v in c.endpoint; startswith(k, "site")')
    assert issue == (
        f"{_at('some k', 'some k')}: some k, v in c.endpoint: walks a candidate's endpoint, but rule t.e does not "
        "declare all of its fields (not certifications, family, gpu_type, id and 10 more), so it reads fields the "
        "rule is never given, in disguise (absent, a deny condition on one lets every candidate through): read the "
        "fields by name and declare them, or declare every one")


def test_an_enumeration_in_a_function_the_rule_calls_is_refused_there() -> None:
    modules = {"p.rego": ("p.rego", _HEAD + 'near(ep) if {\n\tsome k, v in ep\n\tstartswith(k, "site")\n}\n'
                          + _BODY + "near(c.endpoint) }")}
    (issue,) = [str(i) for i in undeclared_rego_reads(modules, "p.rego", _RULE, builtin_checker())]
    assert issue.startswith("p.rego:5:2: some k, v in ep: walks a candidate's endpoint, " + _RECORD)


def test_a_key_not_written_out_suggests_a_walk_only_where_one_is_allowed() -> None:
    (record,) = _rego('input.request[data.params.f] == "x"')
    assert record.endswith('name the field, e.g. .tenant or ["tenant"]'), record
    (metric,) = _rego("c.age_s[data.params.m] > 30")
    assert metric.endswith("(walking every key, some k, v in c.age_s, is allowed)"), metric


# -- Rego: what stays allowed ---------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    'input.request.tenant == "acme"; c.endpoint.tier != "device"; c.age_s.xid_errors < 30',
    'object.get(input.request, "tenant", "") != ""',
    "every v in c.age_s { v <= 30 }",
    "c.age_s[_] > 30",
    "some m, v in c.age_s; c.age_s[m] > 30; v > 0",
    "some m; c.age_s[m] > 30",
    "some _, v in c.telemetry; v > 0",
    "count(c.age_s) > 1",
    "count(input.candidates) > 1",
], ids=["literal-paths", "object.get-literal", "metric-every", "metric-underscore", "metric-key-reads-back",
        "metric-some-k", "metric-underscore-key", "metric-count", "candidates-count"])
def test_declared_literal_paths_and_metric_walks_that_do_not_look_at_the_key_pass(body: str) -> None:
    assert _rego(body) == []


@pytest.mark.parametrize("body", [
    'some k, v in input.request; startswith(k, "prompt"); v == "medical"',
    'some k, v in c.endpoint; k == "site_id"; v == "eu-1"',
    'some k; input.request[k] == "medical"; object.keys(input.request) != set()',
    'c.endpoint[_] == "x"; count(input.request) > 2',
    'some m, v in c.age_s; startswith(m, "gpu"); object.keys(c.telemetry) != set()',
], ids=["request", "endpoint-by-default", "some-k-and-keys", "index-and-count", "metrics"])
def test_what_the_rule_declares_whole_may_be_enumerated(body: str) -> None:
    assert _rego(body, _WHOLE) == []


def test_a_declared_map_may_be_enumerated_and_its_keys_looked_at() -> None:
    labels = _RULE.model_copy(update={"request_fields": ["tenant", "labels"]})
    body = 'some k, v in input.request.labels; startswith(k, "team-"); v == "payments"'
    assert _rego(body, labels) == []
    (issue,) = _rego(body)
    assert issue.startswith(f"{_at(body, 'input.request.labels')}: input.request.labels: rule t.e reads "
                            "request.labels but does not declare it"), issue


# -- CEL ------------------------------------------------------------------------------------------------

_CEL_RULE = _RULE.model_copy(update={"engine": "cel", "file": "p.cel"})


def _cel(source: str, rule: RuleSpec = _CEL_RULE, message: str = "") -> list[str]:
    program = compile_cel("true" if message else source, "p.cel", message=message)
    expr: Any = program.message if message else program.expr
    return [str(i) for i in undeclared_cel_reads(expr, message or source, "p.cel", rule)]


@pytest.mark.parametrize(("source", "expected"), [
    ('request.exists(k, k.startsWith("prompt"))', "p.cel:1:1: request.exists(k, ...): walks input.request, " + _RECORD),
    ('request.all(k, request[k] != "medical")', "p.cel:1:1: request.all(k, ...): walks input.request, " + _RECORD),
    ('!endpoint.exists(k, k == "site_id" && endpoint[k] == "eu-1")',
     "p.cel:1:2: endpoint.exists(k, ...): walks a candidate's endpoint, " + _RECORD),
    ("endpoint.map(k, k).size() > 3", "p.cel:1:1: endpoint.map(k, ...): walks a candidate's endpoint, " + _RECORD),
    ("size(request) > 3", "p.cel:1:6: size(request): counts the fields of input.request, " + _RECORD),
    ('cel.bind(r, request, r.exists(k, k == "prompt_class"))',
     "p.cel:1:22: request.exists(k, ...): walks input.request, " + _RECORD),
    ('!age_s.exists(m, m == "gpu_temp_c" && age_s[m] > 30)',
     "p.cel:1:2: age_s.exists(m, ...): looks at the key of a walk of a candidate's age_s, " + _METRIC),
    ('telemetry.all(m, !m.startsWith("gpu") || telemetry[m] < 90.0)',
     "p.cel:1:1: telemetry.all(m, ...): looks at the key of a walk of a candidate's telemetry"),
    ("age_s.filter(m, age_s[m] > 30).size() == 0",
     "p.cel:1:1: age_s.filter(m, ...): looks at the key of a walk of a candidate's age_s, " + _METRIC),
], ids=["exists-key", "all-values", "endpoint-exists", "map-keys", "size", "bound", "metric-key-compared",
        "metric-key-startswith", "metric-filter"])
def test_a_cel_enumeration_of_what_the_rule_does_not_declare_whole_is_refused(source: str, expected: str) -> None:
    issues = _cel(source)
    assert len(issues) == 1 and issues[0].startswith(expected), issues


@pytest.mark.parametrize("source", [
    "age_s.all(m, age_s[m] <= 30)",
    "telemetry.exists(m, telemetry[m] < 0.0) == false",
    "size(age_s) < 12 && size(telemetry) >= 0",
    'request.tenant == "acme" && endpoint.tier != "device"',
], ids=["metric-all", "metric-exists", "metric-size", "literal"])
def test_cel_metric_walks_that_do_not_look_at_the_key_and_literal_reads_pass(source: str) -> None:
    assert _cel(source) == []


def test_cel_walks_of_what_is_declared_whole_pass() -> None:
    whole = _WHOLE.model_copy(update={"engine": "cel", "file": "p.cel"})
    for source in ('request.exists(k, k.startsWith("prompt"))', 'endpoint.all(k, k != "x")', "size(request) > 3",
                   'age_s.exists(m, m == "gpu_temp_c")'):
        assert _cel(source, whole) == [], source
    labels = _CEL_RULE.model_copy(update={"request_fields": ["labels"]})
    assert _cel('request.labels.exists(k, k.startsWith("team-"))', labels) == []


def test_a_message_may_name_the_metrics_it_walks_a_rule_may_not() -> None:
    # safety.telemetry_fresh's message: it decides nothing, so naming the stale metrics reads nothing in disguise.
    names = 'age_s.filter(m, age_s[m] > 30).map(m, m + " " + string(age_s[m]) + "s").join(", ")'
    assert _cel("", message=names) == []
    in_a_rule = _cel(f'{names} == ""')
    assert [i.split(": ")[1] for i in in_a_rule] == ["age_s.filter(m, ...)", "age_s.filter(...).map(m, ...)"]
    # A message still may not walk a record the rule does not declare whole.
    (issue,) = _cel("", message='request.map(k, k).join(", ")')
    assert issue.startswith("p.cel:1:1: request.map(k, ...): walks input.request, " + _RECORD), issue


# -- whole bundles --------------------------------------------------------------------------------------

def test_policy_check_refuses_a_disguised_read_in_a_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = copied_bundle(tmp_path)
    rego = bundle / "prompt_class.rego"
    edit_text(rego, "\tcount(msgs) > 0\n}\n",
              '\tcount(msgs) > 0\n}\n\nsanctioned contains c.id if {\n\tsome c in input.candidates\n'
              '\tsome k, v in c.endpoint\n\tstartswith(k, "site")\n\tv == "sanctioned"\n}\n')
    edit_text(rego, "\tnot violation[c.id]\n}", "\tnot violation[c.id]\n\tnot sanctioned[c.id]\n}")
    assert main(["policy", "check", str(bundle)]) == 1
    text = rego.read_text()
    at = text.index("some k, v in c.endpoint")
    line, col = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
    err = capsys.readouterr().err
    assert (f"{rego}:{line}:{col}: some k, v in c.endpoint: walks a candidate's endpoint, but rule "
            "safety.prompt_class does not declare all of its fields (not certifications, family, gpu_type, id and "
            "9 more)") in err, err


def test_the_shipped_bundles_are_not_refused() -> None:
    # policies/bundles/default is the one bundle shipped (deploy/demo and deploy/k8s point at it).
    assert sorted(p.name for p in DEFAULT_BUNDLE.parent.iterdir()) == ["default"]
    assert len(compile_bundle(DEFAULT_BUNDLE).rules) == 7
    assert main(["policy", "check", str(DEFAULT_BUNDLE)]) == 0


def test_telemetry_fresh_passes_with_fewer_ages_until_its_rule_looks_at_a_key(tmp_path: Path) -> None:
    # telemetry_fresh walks age_s (3 of its metrics declared) in its rule and names the stale ones in its message.
    bundle = copied_bundle(tmp_path)
    edit_text(bundle / "manifest.yaml", "    ages: [gpu_temp_c, xid_errors, queue_waiting]\n",
              "    ages: [xid_errors]\n")
    compile_bundle(bundle)
    edit_text(bundle / "telemetry_fresh.cel", "age_s.all(m, age_s[m] <= params.max_telemetry_age_s)",
              'age_s.all(m, m == "gpu_util" || age_s[m] <= params.max_telemetry_age_s)')
    with pytest.raises(BundleError, match=r"age_s\.all\(m, \.\.\.\): looks at the key of a walk of a candidate's "
                                          r"age_s, but rule safety\.telemetry_fresh does not declare all"):
        compile_bundle(bundle)
