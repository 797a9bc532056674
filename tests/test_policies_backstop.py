"""The review of the declared-reads check: package aliases charged to the wrong rule, the engine's abort
on a malformed head, and the case-table backstop that runs every case with undeclared fields present."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from policies.bundle import DEFAULT_BUNDLE, compile_bundle
from policies.errors import BundleError
from policies.selftest import run_bundle_tests
from tests.policy_support import copied_bundle, edit_text


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return copied_bundle(tmp_path)


_edit = edit_text


def _one_rule(tmp_path: Path, engine: str, source: str, cases: str, manifest_extra: str = "") -> Path:
    """A bundle of one safety rule declaring request tenant and endpoint safety_tier, tested by ``cases``."""
    d = tmp_path / "one"
    d.mkdir()
    file = "t.rego" if engine == "rego" else "t.cel"
    (d / "manifest.yaml").write_text(
        "version: 1\nname: t\nparams: {}\nrules:\n  - id: safety.t\n    kind: safety\n"
        f"    engine: {engine}\n    file: {file}\n    request_fields: [tenant]\n"
        f"    endpoint_fields: [safety_tier]\n    tests: [t_cases.yaml]\n{manifest_extra}")
    (d / file).write_text(source)
    (d / "t_cases.yaml").write_text(cases)
    return d


_MEDICAL_CASES = """cases:
  - name: medical prompt to a general model must be denied
    request: {tenant: acme, prompt_class: medical}
    endpoint: {id: e1, safety_tier: general, tier: datacenter}
    expect: deny
  - name: medical prompt to strict model allowed
    request: {tenant: acme, prompt_class: medical}
    endpoint: {id: e2, safety_tier: strict, tier: datacenter}
    expect: allow
"""


# -- a package-level alias is the reads of the rules that reach it, not of every rule ------------------

def test_a_package_alias_in_one_module_does_not_charge_other_modules_reads_to_its_rule(bundle: Path) -> None:
    # The README's idiom: req := input.request at package level. Other modules' reads of the request
    # (prompt_class.rego) were charged to residency.sites, which does not reach them.
    rego = bundle / "residency.rego"
    _edit(rego, "violation[c.id] := msgs if {", "req := input.request\n\nviolation[c.id] := msgs if {")
    _edit(rego, "msgs := site_violations(input.request,", "msgs := site_violations(req,")
    compile_bundle(bundle)


def test_a_key_that_is_not_written_out_suggests_walking_that_object(bundle: Path) -> None:
    rego = bundle / "prompt_class.rego"
    text = rego.read_text()
    assert "package" in text
    rego.write_text(text + "\nstale_keys contains c.id if {\n\tsome c in input.candidates\n"
                           "\tsome m in object.keys(c.age_s)\n\tc.age_s[m] > 30\n}\n")
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle)
    assert any("some k, v in c.age_s" in i.message for i in exc.value.issues), exc.value.issues


# -- a module that aborts rego-cpp refuses the bundle instead of killing the process -------------------

_ABORTING_HEAD = "tier_violations(req, ep, data.x. params)"  # the reviewer's: rego-cpp throws, uncaught


def test_policy_check_refuses_a_module_that_aborts_the_engine_at_its_statement(bundle: Path) -> None:
    rego = bundle / "prompt_class.rego"
    _edit(rego, "tier_violations(req, ep, params)", _ABORTING_HEAD)
    line = rego.read_text().count("\n", 0, rego.read_text().index(_ABORTING_HEAD)) + 1
    proc = subprocess.run([sys.executable, "-m", "decision.cli", "policy", "check", str(bundle)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert f"{rego}:{line}:1: compiling this statement: the Rego engine crashed (exit -6 (SIGABRT)" in proc.stderr


_RELOAD = """
import sys
from policies.reload import PolicyReloader
r = PolicyReloader(sys.argv[1], on_swap=lambda g: None, run_tests=False)
r.load()
p = sys.argv[1] + "/prompt_class.rego"
s = open(p).read().replace("tier_violations(req, ep, params)", sys.argv[2], 1)
open(p, "w").write(s)
result = r.reload()
print("ok" if result.ok else "rejected", result.revision == r.revision, result.error)
"""


def test_a_reload_onto_a_module_that_aborts_the_engine_is_rejected_and_the_server_lives(bundle: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(bundle), _ABORTING_HEAD], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    assert proc.stdout.startswith("rejected True "), proc.stdout
    assert "prompt_class.rego:" in proc.stdout and "the Rego engine crashed" in proc.stdout


# -- the backstop: every case runs again with undeclared fields present --------------------------------

_R01 = """package t
import rego.v1
allow contains c.id if {
	some c in input.candidates
	not violation[c.id]
}
violation contains c.id if {
	some c in input.candidates
	some k, v in input.request
	k == "prompt_class"
	v == "medical"
	c.endpoint.safety_tier != "strict"
}
"""

_R09 = """package t
import rego.v1
allow contains c.id if {
	some c in input.candidates
	not violation[c.id]
}
violation contains c.id if {
	some c in input.candidates
	some k
	input.request[k] == "medical"
	startswith(k, "prompt")
	c.endpoint.safety_tier != "strict"
}
"""

_C01 = '!request.exists(k, k == "prompt_class" && request[k] == "medical") || endpoint.safety_tier == "strict"\n'


def _without_the_static_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The static check refuses these reads now (a walk of a request the rule does not declare whole):
    the backstop is shown without it, standing for a disguised read the static check does not follow."""
    monkeypatch.setattr("policies.bundle.undeclared_rego_reads", lambda *a, **k: [])
    monkeypatch.setattr("policies.bundle.undeclared_cel_reads", lambda *a, **k: [])


@pytest.mark.parametrize("engine, source", [("rego", _R01), ("rego", _R09), ("cel", _C01)],
                         ids=["r01_key_compare", "r09_some_index", "c01_exists_key"])
def test_a_read_the_static_check_misses_fails_the_case_that_exercises_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str, source: str) -> None:
    d = _one_rule(tmp_path, engine, source, _MEDICAL_CASES)
    with pytest.raises(BundleError, match=r"walks input\.request, but rule safety\.t does not declare all"):
        compile_bundle(d)
    _without_the_static_check(monkeypatch)
    compile_bundle(d)
    results = run_bundle_tests(d)
    assert [r.passed for r in results] == [False, True], results
    assert ("rule safety.t reads a field it does not declare: verdict differs with undeclared fields present "
            "(allow as the service runs it, deny with every field of the case given)") in results[0].detail


def test_the_default_bundle_passes_the_backstop() -> None:
    assert all(r.passed for r in run_bundle_tests(DEFAULT_BUNDLE))


_FRESH = "age_s.all(m, age_s[m] <= 30)\n"  # allowed: a metric map's walk may treat every declared metric alike
_FRESH_CASES = "cases:\n  - name: fresh\n    age_s: {xid_errors: 1}\n    expect: allow\n"
# The same endpoint with a stale metric the rule does not declare: given it, the walk would deny.
_UNDECLARED_STALE = (_FRESH_CASES + "  - name: stale gpu_temp_c\n    age_s: {xid_errors: 1, gpu_temp_c: 99}\n"
                     "    expect: allow\n")


def test_a_walk_of_metrics_the_static_check_allows_is_still_seen_by_the_backstop(tmp_path: Path) -> None:
    d = _one_rule(tmp_path, "cel", _FRESH, _UNDECLARED_STALE, "    ages: [xid_errors]\n")
    compile_bundle(d)
    results = run_bundle_tests(d)
    assert [r.passed for r in results] == [True, False], results
    assert "verdict differs with undeclared fields present" in results[1].detail


def test_a_reload_onto_such_a_bundle_is_rejected(tmp_path: Path) -> None:
    from policies.reload import PolicyReloader

    d = _one_rule(tmp_path, "cel", _FRESH, _FRESH_CASES, "    ages: [xid_errors]\n")
    reloader = PolicyReloader(d, on_swap=lambda g: None)
    reloader.load()
    (d / "t_cases.yaml").write_text(_UNDECLARED_STALE)
    result = reloader.reload()
    assert not result.ok and "verdict differs with undeclared fields present" in result.error, result


# -- static fixes: data[...], a name hidden only within its braces, a walk's key compared to a name ----

_KEY_MSG = "walks input.request, but rule safety.t does not declare all of its fields (not allowed_jurisdictions"
_HEAD = "package t\nimport rego.v1\nallow contains c.id if {\n\tsome c in input.candidates\n\tnot violation[c.id]\n}\n"


@pytest.mark.parametrize("source, needle, message", [
    ('violation contains c.id if {\n\tsome c in input.candidates\n\tdata["lib"].pc == "medical"\n}\n',
     'data["lib"]', 'data["lib"].pc: reads data with a bracket'),
    ('req := input.request\nviolation contains c.id if {\n\tsome c in input.candidates\n'
     '\tn := count([1 | some req in [1, 2]])\n\tn > 0\n\treq.prompt_class == "medical"\n}\n',
     "req.prompt_class", "req.prompt_class: rule safety.t reads request.prompt_class but does not declare it"),
    ('req := input.request\nviolation contains c.id if {\n\tsome c in input.candidates\n'
     '\tevery req in [1] { req > 0 }\n\treq.prompt_class == "medical"\n}\n',
     "req.prompt_class", "req.prompt_class: rule safety.t reads request.prompt_class but does not declare it"),
    (_R01[len(_HEAD):], "some k, v in input.request", "some k, v in input.request: " + _KEY_MSG),
    ('ok_class if {\n\tevery k, v in input.request {\n\t\tk != "prompt_class"\n\t}\n}\n'
     'violation contains c.id if {\n\tsome c in input.candidates\n\tnot ok_class\n}\n',
     "every k, v in input.request", "every k, v in input.request: " + _KEY_MSG),
], ids=["r05_data_bracket", "r15_hidden_by_inner", "r16_hidden_by_every", "r01_key_compare", "r14_every_neg"])
def test_the_reviewers_static_bypasses_are_refused_at_the_read(tmp_path: Path, source: str, needle: str,
                                                              message: str) -> None:
    assert _R01.startswith(_HEAD)
    d = _one_rule(tmp_path, "rego", _HEAD + source, _MEDICAL_CASES)
    if "data[" in source:
        (d / "lib.rego").write_text("package lib\nimport rego.v1\npc := input.request.prompt_class\n")
    with pytest.raises(BundleError) as exc:
        compile_bundle(d)
    text = (d / "t.rego").read_text()
    at = text.index(needle)
    line, col = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
    assert [(i.line, i.column) for i in exc.value.issues if i.message.startswith(message)] == [(line, col)], \
        exc.value.issues


def test_a_walk_of_a_request_the_rule_does_not_declare_whole_is_refused_even_for_a_reason(tmp_path: Path) -> None:
    # Once allowed (the key only named in a reason): but v == "blocked" tests whichever field the walk
    # finds, a field the rule is never given among them. Walks of a declared map: test_policies_enumeration.
    src = _HEAD + ('violation contains c.id if {\n\tsome c in input.candidates\n\tsome k, v in input.request\n'
                   '\tv == "blocked"\n\tmsg := sprintf("%s is blocked", [k])\n\tmsg != ""\n}\n')
    with pytest.raises(BundleError, match="some k, v in input.request: " + re.escape(_KEY_MSG)):
        compile_bundle(_one_rule(tmp_path, "rego", src, _MEDICAL_CASES))


# -- a shared helper package: only what the rule refers to is its reads -------------------------------

def test_a_helper_package_is_scanned_only_for_what_the_rule_refers_to(tmp_path: Path) -> None:
    common = "package common\nimport rego.v1\ntenant := input.request.tenant\n" \
             'is_medical if input.request.prompt_class == "medical"\n'
    owner = ("package owner\nimport rego.v1\nimport data.common\nallow contains c.id if {\n"
             '\tsome c in input.candidates\n\tc.endpoint.safety_tier in {"", common.tenant}\n}\n')
    d = _one_rule(tmp_path, "rego", owner, "cases:\n  - request: {tenant: acme}\n    endpoint: {safety_tier: acme}\n"
                                           "    expect: allow\n")
    (d / "common.rego").write_text(common)
    compile_bundle(d)  # safety.t declares tenant only: common.is_medical is not its read
    (d / "t.rego").write_text(owner.replace("\n}\n", "\n\tnot common.is_medical\n}\n"))
    with pytest.raises(BundleError) as exc:
        compile_bundle(d)
    assert [(Path(i.path).name, i.line) for i in exc.value.issues] == [("common.rego", 4)], exc.value.issues
