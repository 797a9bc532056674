"""A rule that reads what its manifest entry does not declare is refused when the bundle compiles.

The guard gives a rule only what it declares: in Rego an undeclared read is undefined and a deny
condition on it allows every candidate (fail open), in CEL it errors and denies every candidate.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from decision.cli import main
from policies.bundle import DEFAULT_BUNDLE, compile_bundle
from policies.declared import undeclared_rego_reads
from policies.errors import BundleError, PolicyIssue
from policies.manifest import RuleSpec
from policies.rego_engine import builtin_checker
from policies.reload import PolicyReloader
from tests.policy_support import copied_bundle, edit_text


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return copied_bundle(tmp_path)


_edit = edit_text


def _issues(bundle: Path) -> list[PolicyIssue]:
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle)
    return list(exc.value.issues)


def _at(path: Path, needle: str, nth: int = 0) -> tuple[int, int]:
    """(line, column) of the nth occurrence of ``needle`` in ``path``."""
    text = path.read_text()
    at = -1
    for _ in range(nth + 1):
        at = text.index(needle, at + 1)
    return text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1


def test_the_reviewers_rego_rule_that_failed_open_is_refused_at_its_reads(bundle: Path) -> None:
    # prompt_class.rego passes input.request to tier_violations(req, ...), which reads req.prompt_class: with
    # prompt_class undeclared the read was undefined, no violation, and medical prompts reached any model.
    _edit(bundle / "manifest.yaml", "    request_fields: [prompt_class]\n", "    request_fields: [tenant]\n")
    rego = bundle / "prompt_class.rego"
    issues = _issues(bundle)
    assert [(i.path, i.line, i.column) for i in issues] == [(str(rego), *_at(rego, "req.prompt_class", 0)),
                                                            (str(rego), *_at(rego, "req.prompt_class", 1))]
    assert all(i.message.startswith("req.prompt_class: rule safety.prompt_class reads request.prompt_class but "
                                    "does not declare it") and
               i.message.endswith("add prompt_class to the rule's request_fields in manifest.yaml") for i in issues)


def test_policy_check_refuses_it_with_file_line_col(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _edit(bundle / "manifest.yaml", "    request_fields: [prompt_class]\n", "    request_fields: [tenant]\n")
    assert main(["policy", "check", str(bundle)]) == 1
    line, col = _at(bundle / "prompt_class.rego", "req.prompt_class")
    assert capsys.readouterr().err.startswith(f"{bundle / 'prompt_class.rego'}:{line}:{col}: req.prompt_class: ")


def test_the_same_mistake_in_cel_is_refused_in_the_rule_and_in_its_message(bundle: Path) -> None:
    manifest = bundle / "manifest.yaml"
    _edit(manifest, "    request_fields: [tenant]\n", "    request_fields: [user_tier]\n")
    cel = bundle / "device_owner.cel"
    issues = _issues(bundle)
    assert [(i.path, i.line, i.column) for i in issues] == [(str(cel), *_at(cel, "request.tenant")),
                                                            (str(manifest), *_at(manifest, "message: '\"device"))]
    assert issues[0].message.startswith("request.tenant: rule safety.device_owner reads request.tenant but does "
                                        "not declare it")
    assert "add tenant to the rule's request_fields" in issues[0].message
    assert issues[1].message.startswith("rules[2](id=safety.device_owner).message: column 89 of the expression: "
                                        "request.tenant: rule safety.device_owner reads request.tenant")


@pytest.mark.parametrize(("field", "old", "new", "needle", "expected"), [
    ("endpoint", "    endpoint_fields: [model, safety_tier]\n", "    endpoint_fields: [safety_tier]\n",
     "ep.model", "add model to the rule's endpoint_fields"),
    ("telemetry", "    telemetry: [gpu_temp_c]\n", "    telemetry: [queue_waiting]\n",
     '"gpu_temp_c" in telemetry', "add gpu_temp_c to the rule's telemetry"),
    ("ages", "    ages: [gpu_temp_c, xid_errors, queue_waiting]\n", "    ages: [xid_errors, queue_waiting]\n",
     None, None),
    ("state", "    state: true\n", "", "state.quota.requests + 1", "add state: true to the rule"),
], ids=["endpoint", "telemetry", "ages-walked", "state"])
def test_every_declared_section_is_checked(bundle: Path, field: str, old: str, new: str, needle: str | None,
                                           expected: str | None) -> None:
    _edit(bundle / "manifest.yaml", old, new)
    if expected is None:  # telemetry_fresh walks age_s (age_s.all(m, ...)): it reads only what is declared
        compile_bundle(bundle)
        return
    assert needle is not None
    issues = _issues(bundle)
    (rule,) = [p for p in bundle.iterdir() if p.suffix in (".cel", ".rego") and needle in p.read_text()]
    assert (str(rule), *_at(rule, needle)) in [(i.path, i.line, i.column) for i in issues]
    assert all(expected in i.message for i in issues)


def test_comments_and_strings_are_not_reads(bundle: Path) -> None:
    _edit(bundle / "prompt_class.rego", "allow contains c.id if {\n",
          '# input.request.model and c.endpoint.site_id would be undeclared reads, were this code\n'
          'allow contains c.id if {\n\tnote := "input.request.model c.endpoint.site_id `x`"\n\tnote != ""\n')
    _edit(bundle / "device_owner.cel", "endpoint.tier",
          '// request.model, endpoint.site_id\n("request.model endpoint.gpu_type" != "") && endpoint.tier')
    assert len(compile_bundle(bundle).rules) == 7


def test_the_default_bundle_compiles() -> None:
    assert len(compile_bundle(DEFAULT_BUNDLE).rules) == 7


def test_a_service_never_loads_such_a_bundle(bundle: Path) -> None:
    reloader = PolicyReloader(bundle, lambda g: None, run_tests=False)
    reloader.load()
    _edit(bundle / "manifest.yaml", "    request_fields: [prompt_class]\n", "    request_fields: [tenant]\n")
    result = reloader.reload()
    assert not result.ok and "reads request.prompt_class but does not declare it" in result.error
    assert reloader.reload_failures == 1


_RULE = RuleSpec(id="t.r", kind="other", engine="rego", file="p.rego", tests=["p_test.rego"],
                 request_fields=["tenant"], endpoint_fields=["tier"])
_LIB = ("lib.rego", "package lib\nimport rego.v1\n\nbad(r, e) if {\n\tr.model == \"x\"\n\te.site_id == \"y\"\n}\n"
                    "flag if input.request.user_tier == \"free\"\n")


def _rego(body: str, **extra: tuple[str, str]) -> list[str]:
    modules = {"p.rego": ("p.rego", "package t\nimport rego.v1\n\n" + body), **extra}
    return [str(i) for i in undeclared_rego_reads(modules, "p.rego", _RULE, builtin_checker())]


@pytest.mark.parametrize("body", [
    'allow contains c.id if { some c in input.candidates; c.endpoint.tier == "x"; input.request.tenant == "a" }',
    'allow contains c.id if { r := input.request; some c in input.candidates; e := c.endpoint; r.tenant == e.tier }',
    'req := input.request\nallow contains c.id if { some c in input.candidates; req.tenant == "a" }',
    'import input.request as rq\nallow contains c.id if { some c in input.candidates; rq["tenant"] == "a" }',
    'allow contains c.id if { some c in input.candidates; every v in c.age_s { v < 30 } }',
    'allow contains c.id if { some c in input.candidates; some m; c.age_s[m] < 30; c.telemetry[_] > 0 }',
    # A name in brackets that nothing binds iterates, as a key of some k does.
    'allow contains c.id if { some c in input.candidates; c.age_s[m] < 30 }',
    'allow contains c.id if { some c in input.candidates; object.get(input.request, "tenant", "") != "" }',
    'allow[c.id] { c := input.candidates[_]; c.endpoint.tier != "x" }',
    'best(cs) := {c.id | some c in cs; c.endpoint.tier == "x"}\nallow := best(input.candidates)',
    'allow contains c.id if { count(input.candidates) > 2; some c in input.candidates }',
    'ok(t) if t.tier != "x"\nallow contains input.candidates[i].id if { ok(input.candidates[i].endpoint) }',
    # A parameter named as a package-level alias of input.request is the parameter, not the request.
    'req := input.request\nf(req) := req.model\nallow contains c.id if { some c in input.candidates; f(data.params) }',
    'allow contains c.id if {\n\tsome c in input.candidates\n\tnot f(\n\t\tinput.request,\n\t\tc.endpoint,\n\t)\n}\n'
    'f(r, e) if { r.tenant == "a"; e.tier == "b" }',
], ids=["direct", "aliases", "package-alias", "import", "metric-walk", "metric-some", "metric-implicit", "object.get",
        "old-style",
        "function",
        "count", "indexed", "parameter-hides-rule", "multi-line-call"])
def test_declared_reads_pass(body: str) -> None:
    assert _rego(body) == []


@pytest.mark.parametrize(("body", "expected"), [
    ('allow contains c.id if { some c in input.candidates; c["endpoint"]["site_id"] == "x" }',
     'p.rego:4:54: c["endpoint"]["site_id"]: rule t.r reads endpoint.site_id but does not declare it'),
    ('allow contains c.id if { some c in input.candidates; input.request[data.params.field] == "x" }',
     "p.rego:4:54: input.request[data.params.field]: reads input.request with a key that is not written out"),
    ('allow contains c.id if { some c in input.candidates; some k in data.params.fields; input.request[k] }',
     "p.rego:4:84: input.request[k]: reads input.request with a key that is not written out"),
    ('allow contains c.id if { some c in input.candidates; object.get(input.request, data.params.f, "") != "" }',
     "p.rego:4:65: object.get(input.request, data.params.f, ...): reads input.request with a key that is not"),
    ('allow contains c.id if { some c in input.candidates; every k, v in input.request { v != "" } }',
     "p.rego:4:54: every k, v in input.request: walks input.request, but rule t.r does not declare all of its "
     "fields (not allowed_jurisdictions, client_region, data_class, estimated_input_tokens and 11 more)"),
    ('allow contains c.id if { some c in input.candidates; some k; input.request[k] != "x" }',
     "p.rego:4:62: input.request[k]: walks input.request, but rule t.r does not declare all of its fields"),
    ('allow contains c.id if { some c in input.candidates; x := input.request[k]; x != "" }',
     "p.rego:4:59: input.request[k]: walks input.request, but rule t.r does not declare all of its fields"),
    ('k := "tenant"\nallow contains c.id if { some c in input.candidates; input.request[k] != "" }',
     "p.rego:5:54: input.request[k]: reads input.request with a key that is not written out"),
    ('allow contains c.id if { some c in input.candidates; c.endpoint[_] != "" }',
     "p.rego:4:54: c.endpoint[_]: walks a candidate's endpoint, but rule t.r does not declare all of its fields"),
    ('allow contains c.id if { some c in input.candidates; json.marshal(input.request) != "" }',
     "p.rego:4:67: input.request: uses input.request as a whole (passed to json.marshal)"),
    ('same(r) := r\nallow contains c.id if { some c in input.candidates; same(input.request).model == "a" }',
     "p.rego:4:12: r: uses input.request as a whole (in an expression)"),
    ('allow contains c.id if { some c in input.candidates; c.endpoint.teir == "x" }',
     "p.rego:4:54: c.endpoint.teir: a candidate's endpoint has no field 'teir' (did you mean tier?)"),
    ('allow contains c.id if { some c in input.candidates; c.endpont.tier == "x" }',
     "p.rego:4:54: c.endpont.tier: a candidate has no key 'endpont', only id, endpoint, telemetry, age_s"),
    ('allow contains c.id if { some c in input.candidates; c.telemetry.gpu_temp_c < 80 }',
     "p.rego:4:54: c.telemetry.gpu_temp_c: rule t.r reads telemetry.gpu_temp_c but does not declare it"),
    ('allow contains c.id if { some c in input.candidates; input.state.quota.requests < 3 }',
     "p.rego:4:54: input.state.quota.requests: rule t.r reads state but does not declare it"),
], ids=["brackets", "key-from-params", "walk-of-params", "object.get-key", "walk", "some-walk", "implicit-walk",
        "key-from-a-rule", "index-walk",
        "builtin", "returned-whole", "typo",
        "candidate-key", "telemetry", "state"])
def test_undeclared_or_unchecked_reads_are_refused(body: str, expected: str) -> None:
    (issue,) = _rego(body)
    assert issue.startswith(expected)


def test_a_request_the_rule_declares_whole_may_be_walked_by_an_implicit_key() -> None:
    # [k | input.request[k]] iterates as some k does: refused as "not written out" before, even with
    # every request field declared.
    from policies.declared import _SECTIONS

    rule = _RULE.model_copy(update={"request_fields": sorted(_SECTIONS["request"][1])})
    for body in ('keys := [k | input.request[k]]\n'
                 'allow contains c.id if { some c in input.candidates; count(keys) > 0 }',
                 'allow contains c.id if { some c in input.candidates; v := input.request[k]; v != "" }'):
        modules = {"p.rego": ("p.rego", "package t\nimport rego.v1\n\n" + body)}
        assert undeclared_rego_reads(modules, "p.rego", rule, builtin_checker()) == [], body


def test_reads_in_a_helper_package_are_the_rules_reads() -> None:
    body = ('import data.lib\nallow contains c.id if {\n\tsome c in input.candidates\n'
            '\tnot lib.bad(input.request, c.endpoint)\n\tnot lib.flag\n}\n')
    issues = _rego(body, lib=_LIB)
    assert [i.split(": ")[0:2] for i in issues] == [["lib.rego:5:2", "r.model"], ["lib.rego:6:2", "e.site_id"],
                                                    ["lib.rego:8:9", "input.request.user_tier"]]
