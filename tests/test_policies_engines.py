"""CEL and Rego engines: verdicts, fail-closed behaviour and located errors."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from policies.bundle import DEFAULT_BUNDLE, compile_bundle
from policies.cel_engine import CelCompileError, compile_cel
from policies.errors import BundleError, PolicyIssue
from policies.rego_engine import compile_rego
from policies.selftest import run_bundle_tests, summary


@pytest.fixture()
def bundle_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, dst)
    return dst


def test_cel_error_value_denies_with_the_error() -> None:
    prog = compile_cel("telemetry.gpu_temp_c < 80.0", "t.cel")
    assert prog.evaluate({"telemetry": {"gpu_temp_c": 70.0}}) == (True, "ok")
    ok, reason = prog.evaluate({"telemetry": {}})
    assert not ok and reason.startswith("error:") and "gpu_temp_c" in reason


def test_cel_compile_error_is_located_on_the_right_line() -> None:
    source = '// comment\nendpoint.tier == (1 + "a")\n'
    with pytest.raises(CelCompileError) as exc:
        compile_cel(source, "rules/x.cel")
    issue = exc.value.issues[0]
    assert (issue.path, issue.line, issue.column) == ("rules/x.cel", 2, source.splitlines()[1].index("+") + 1)
    assert "no matching overload" in issue.message and "[INVALID_ARGUMENT]" not in issue.message


def test_cel_rule_must_be_boolean() -> None:
    with pytest.raises(CelCompileError, match="must evaluate to bool"):
        compile_cel('"a string"', "s.cel")


@pytest.mark.parametrize(("value", "kind"), [("1", "int"), ("1.0", "double"), ('"true"', "string"),
                                             ("[true]", "list"), ("{'a': true}", "map"), ("null", "null")])
def test_a_dyn_rule_that_gives_a_truthy_non_bool_denies(value: str, kind: str) -> None:
    # Type-checked as dyn, so only the evaluation can tell: nothing but a bool true allows.
    prog = compile_cel(f"request.pick ? dyn({value}) : true", "d.cel")
    assert prog.evaluate({"request": {"pick": False}}) == (True, "ok")
    ok, reason = prog.evaluate({"request": {"pick": True}})
    assert not ok and reason.startswith(f"error: rule returned {kind}"), reason


def test_rego_undefined_fails_closed() -> None:
    src = "package t\nimport rego.v1\nallow contains c.id if { some c in input.candidates; c.endpoint.ok == true }\n"
    prog = compile_rego({"t.rego": ("t.rego", src)}, "t.rego", {})
    out = prog.evaluate_candidates({}, [{"id": "a", "endpoint": {"ok": True}}, {"id": "b", "endpoint": {}}], {})
    assert out[0] == (True, "ok")
    assert out[1][0] is False
    # A module with no allow rule at all: every candidate is denied.
    empty = compile_rego({"e.rego": ("e.rego", "package e\nimport rego.v1\nx := 1\n")}, "e.rego", {})
    assert all(not ok for ok, _ in empty.evaluate_candidates({}, [{"id": "a", "endpoint": {}}], {}))


def test_a_rego_evaluation_error_denies_with_rego_cpps_message() -> None:
    src = "package t\nimport rego.v1\nallow contains c.id if { some c in input.candidates; nosuchfn(c.id) }\n"
    prog = compile_rego({"t.rego": ("t.rego", src)}, "t.rego", {})  # rego-cpp compiles it: the call fails when reached
    # The reason an auditor reads in the trace (regopy itself failed to parse it, and said "Expecting value").
    assert prog.evaluate_candidates({}, [{"id": "a", "endpoint": {}}], {}) == [
        (False, "error: Function not found: nosuchfn")]


def test_a_reason_rego_cpp_writes_as_broken_json_names_the_cause() -> None:
    # rego-cpp 1.x: sprintf's %s of a string with quotes that concat built comes out unescaped.
    src = ('package t\nimport rego.v1\nallow contains c.id if { some c in input.candidates; false }\n'
           'reason[c.id] := sprintf("site %s", [concat("; ", ["in [\\"EU\\"]"])]) if { some c in input.candidates }\n')
    prog = compile_rego({"t.rego": ("t.rego", src)}, "t.rego", {})
    [(ok, reason)] = prog.evaluate_candidates({}, [{"id": "a", "endpoint": {}}], {})
    assert not ok  # still denied: the rule did not allow it
    assert reason.startswith("error: rego-cpp returned a value that is not valid JSON") and "join with concat" in reason


@pytest.mark.parametrize(("module", "edit", "called"), [
    ("residency.rego", ("\tcount(req.allowed_jurisdictions) > 0", "\tcount(req.allowed_jurisdictions) > nosuchfn(0)"),
     "nosuchfn"),
    # An OPA built-in that rego-cpp does not provide.
    ("residency.rego", ("\tnot ep.jurisdiction in req.allowed_jurisdictions",
                        '\tnet.cidr_contains("10.0.0.0/8", ep.site_id)'), "net.cidr_contains"),
    # A test module counts too, and an import alias or a function of the package does not.
    ("residency_test.rego", ("count(residency.site_violations({\"allowed_jurisdictions\": [], \"data_class\": "
                             "\"public\"}, us_hipaa, params)) == 0", "count(site_violations(eu_site)) == 0"),
     "site_violations"),
])
def test_a_call_to_a_missing_function_is_a_located_bundle_error(bundle_copy: Path, module: str,
                                                                 edit: tuple[str, str], called: str) -> None:
    path = bundle_copy / module
    text = path.read_text()
    assert edit[0] in text
    path.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle_copy)
    (issue,) = exc.value.issues
    line = path.read_text().splitlines()[issue.line - 1]
    assert issue.path == str(path) and line[issue.column - 1:].startswith(called + "(")
    assert issue.message.startswith(f"function not found: {called} (not a rego-cpp built-in")


def test_rego_syntax_error_reports_file_line_col(bundle_copy: Path) -> None:
    rego = bundle_copy / "residency.rego"
    lines = rego.read_text().splitlines()
    idx = next(i for i, line in enumerate(lines) if "count(req.allowed_jurisdictions)" in line)
    lines[idx] = "\tcount(req.allowed_jurisdictions) > "
    rego.write_text("\n".join(lines) + "\n")
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle_copy)
    issue = exc.value.issues[0]
    assert issue.path == str(rego)
    assert issue.line == idx + 1
    assert issue.column >= 2
    assert str(issue).startswith(f"{rego}:{idx + 1}:{issue.column}: ")


def test_cel_file_error_reports_file_line_col(bundle_copy: Path) -> None:
    cel = bundle_copy / "xid_errors.cel"
    cel.write_text("// a comment\ntelemetry.xid_errors == 0.0 && undefined_var\n")
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle_copy)
    assert [(i.path, i.line, i.column) for i in exc.value.issues] == [(str(cel), 2, 32)]
    assert "undefined_var" in exc.value.issues[0].message


def test_manifest_errors_name_the_line(bundle_copy: Path) -> None:
    manifest = bundle_copy / "manifest.yaml"
    text = manifest.read_text().replace("engine: rego", "engine: opa", 1)
    manifest.write_text(text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "engine: opa" in t)
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle_copy)
    assert exc.value.issues[0].line == line
    assert "engine" in exc.value.issues[0].message


@pytest.mark.parametrize("outside", ["../device_owner.cel", "{abs}"])
def test_rule_files_must_live_in_the_bundle_folder(bundle_copy: Path, outside: str) -> None:
    """The revision hashes the bundle folder: a rule read from elsewhere could change unseen by it."""
    moved = bundle_copy.parent / "device_owner.cel"
    (bundle_copy / "device_owner.cel").rename(moved)
    name = outside.format(abs=moved)
    manifest = bundle_copy / "manifest.yaml"
    text = manifest.read_text().replace("file: device_owner.cel", f"file: {name}", 1)
    manifest.write_text(text)
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle_copy)
    (issue,) = exc.value.issues
    assert issue.line == next(n for n, t in enumerate(text.splitlines(), 1) if f"file: {name}" in t)
    assert "outside the bundle folder" in issue.message


def test_shipped_bundle_tests_pass_and_a_wrong_expectation_fails(bundle_copy: Path) -> None:
    results = run_bundle_tests(bundle_copy)
    assert results and all(r.passed for r in results), [str(r) for r in results if not r.passed]
    cases = bundle_copy / "gpu_temperature_cases.yaml"
    cases.write_text(cases.read_text().replace("telemetry: {gpu_temp_c: 64}\n    expect: allow",
                                               "telemetry: {gpu_temp_c: 64}\n    expect: deny"))
    after = run_bundle_tests(bundle_copy)
    failed = [r for r in after if not r.passed]
    assert len(failed) == 1 and "a cool GPU" in failed[0].name
    assert summary(after) == f"{len(after) - 1} passed, 1 failed"


@pytest.mark.parametrize(("old", "new", "detail"), [
    # The reviewer's case: expect is there, only the key is wrong; the message says only that.
    ("    expect: allow\n  - name: exactly", "    expect: allow\n    telemetri: {gpu_temp_c: 99}\n  - name: exactly",
     "unknown key 'telemetri' (did you mean telemetry?)"),
    ("    expect: allow\n  - name: exactly", "    exp: allow\n  - name: exactly",
     "a case needs expect: allow|deny; unknown key 'exp' (did you mean expect?)"),
    ("    expect: allow\n  - name: exactly", "    expect: allowed\n  - name: exactly",
     "expect is 'allowed'; it must be allow or deny"),
], ids=["unknown-key", "no-expect", "bad-expect"])
def test_a_bad_case_says_only_what_is_wrong(bundle_copy: Path, old: str, new: str, detail: str) -> None:
    cases = bundle_copy / "gpu_temperature_cases.yaml"
    text = cases.read_text()
    assert old in text
    cases.write_text(text.replace(old, new, 1))
    failed = [r for r in run_bundle_tests(bundle_copy) if not r.passed]
    assert [(r.name, r.detail) for r in failed] == [("safety.gpu_temperature: a cool GPU is allowed", detail)]


def test_rego_test_rules_run(bundle_copy: Path) -> None:
    (bundle_copy / "device_extra_test.rego").write_text(
        "package extra_test\nimport rego.v1\ntest_ok if { 1 + 1 == 2 }\ntest_wrong if { 1 + 1 == 3 }\n")
    manifest = bundle_copy / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("tests: [device_owner_cases.yaml]",
                                                     "tests: [device_owner_cases.yaml, device_extra_test.rego]"))
    results = {r.name: r.passed for r in run_bundle_tests(bundle_copy)}
    assert results["extra_test.test_ok"] is True
    assert results["extra_test.test_wrong"] is False


def test_a_function_defined_only_in_a_test_module_is_not_there_for_rules(bundle_copy: Path) -> None:
    # Rules never load *_test.rego modules: the call would deny every candidate at run time.
    (bundle_copy / "helpers_test.rego").write_text("package infermesh.residency\n\nonly_in_tests(x) := x\n")
    rego = bundle_copy / "residency.rego"
    rego.write_text(rego.read_text().replace("\tcount(req.allowed_jurisdictions) > 0",
                                             "\tcount(req.allowed_jurisdictions) > only_in_tests(0)", 1))
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle_copy)
    (issue,) = exc.value.issues
    assert issue.path == str(rego) and "function not found: only_in_tests" in issue.message


def test_hidden_files_are_neither_compiled_nor_hashed(bundle_copy: Path) -> None:
    """What runs is what the revision names: a hidden module could otherwise change verdicts unseen."""
    before = compile_bundle(bundle_copy).revision
    hidden = bundle_copy / ".git"
    hidden.mkdir()
    (hidden / "extra.rego").write_text("package infermesh.residency\nimport rego.v1\nallow contains c if { c := 1 }\n")
    (bundle_copy / ".swap.rego").write_text("package broken\nthis does not parse\n")
    assert compile_bundle(bundle_copy).revision == before


def test_a_rule_file_that_is_not_utf8_is_a_located_error(bundle_copy: Path) -> None:
    cel = bundle_copy / "xid_errors.cel"
    cel.write_bytes(b"// ok\ntelemetry.xid_errors == 0.0 \xff\n")
    rego = bundle_copy / "prompt_class.rego"
    rego.write_bytes(rego.read_bytes() + b"# caf\xe9\n")
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle_copy)
    got = {(i.path, i.line): i.message for i in exc.value.issues}
    assert got[(str(cel), 2)] == "not UTF-8 text (byte 0xff)"
    assert got[(str(rego), len(rego.read_bytes().splitlines()))] == "not UTF-8 text (byte 0xe9)"


def test_a_rule_path_with_dot_segments_names_the_same_module(bundle_copy: Path) -> None:
    (bundle_copy / "sub").mkdir()
    manifest = bundle_copy / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("file: residency.rego", "file: ./sub/../residency.rego", 1))
    bundle = compile_bundle(bundle_copy)
    assert "residency.sites" in {r.spec.id for r in bundle.rules}


@pytest.mark.parametrize("name", ['"device_owner\\0.cel"', "x" * 300 + ".cel"])
def test_a_rule_file_name_the_file_system_refuses_is_a_located_error(bundle_copy: Path, name: str) -> None:
    """A NUL or an over-long name raised from pathlib (a traceback from policy check)."""
    (issue,), line = _manifest_edit_issues(bundle_copy, "file: device_owner.cel", f"file: {name}")
    assert issue.line == line and "cannot be a file name" in issue.message


def test_two_rule_modules_may_not_share_a_package(bundle_copy: Path) -> None:
    """Rego merges a package's modules: another module's allow would undo this rule's denials."""
    stray = bundle_copy / "helpers.rego"
    stray.write_text("package infermesh.prompt_class\nimport rego.v1\n\n"
                     "allow contains c.id if { some c in input.candidates }\n")
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle_copy)
    (issue,) = exc.value.issues
    assert (issue.path, issue.line) == (str(bundle_copy / "prompt_class.rego"), 3)
    assert f"package infermesh.prompt_class is also declared by {stray}" in issue.message


def _manifest_edit_issues(bundle: Path, old: str, new: str, marker: str = "") -> tuple[Sequence[PolicyIssue], int]:
    """The issues of the bundle with ``old`` replaced by ``new`` in its manifest, and the line holding
    ``marker`` (default: ``new``)."""
    manifest = bundle / "manifest.yaml"
    text = manifest.read_text()
    assert old in text
    text = text.replace(old, new)
    manifest.write_text(text)
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle)
    return exc.value.issues, next(n for n, t in enumerate(text.splitlines(), 1) if (marker or new) in t)


def test_manifest_errors_give_the_column_of_the_key(bundle_copy: Path) -> None:
    # A misspelt key four columns in: located at its first character, not at column 1.
    issues, line = _manifest_edit_issues(bundle_copy, "    request_fields: [prompt_class]\n",
                                         "    request_feilds: [prompt_class]\n", "request_feilds")
    assert [(i.line, i.column) for i in issues] == [(line, 5)] and "request_feilds" in issues[0].message


def test_a_message_expression_error_is_at_the_column_of_its_key(bundle_copy: Path) -> None:
    issues, line = _manifest_edit_issues(bundle_copy, """message: '"XID error " + string(int(telemetry.xid_errors))""",
                                         """message: '"XID error " + string(int(telemetry.xid_errors)) +""",
                                         """message: '"XID error""")
    assert [(i.line, i.column) for i in issues] == [(line, 5)] and "column " in issues[0].message


def test_a_rule_can_only_read_telemetry_the_store_holds(bundle_copy: Path) -> None:
    issues, line = _manifest_edit_issues(bundle_copy, "telemetry: [gpu_temp_c]", "telemetry: [DCGM_FI_DEV_GPU_TEMP]")
    assert [(i.line, "unknown metrics ['DCGM_FI_DEV_GPU_TEMP']" in i.message) for i in issues] == [(line, True)]


def test_params_must_be_json_and_are_located(bundle_copy: Path) -> None:
    issues, line = _manifest_edit_issues(bundle_copy, "  max_gpu_temp_c: 85\n",
                                         "  max_gpu_temp_c: 85\n  review_after: 2027-01-31\n", "review_after")
    assert [str(i) for i in issues] == [f"{bundle_copy / 'manifest.yaml'}:{line}:3: params.review_after: not a "
                                        "JSON value (strings, numbers, booleans, null, lists and mappings with "
                                        "string keys; quote a date or a time)"]


def test_a_memoised_rule_may_not_read_the_clock(bundle_copy: Path) -> None:
    rego = bundle_copy / "prompt_class.rego"
    source = rego.read_text()
    rego.write_text(source + "\nafter_hours if time.now_ns() > 0\n")
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle_copy)
    (issue,) = exc.value.issues
    assert issue.path == str(rego) and issue.line == source.count("\n") + 2
    assert "time.now_ns gives another answer on every call" in issue.message
    assert "set memoise: false" in issue.message
    manifest = bundle_copy / "manifest.yaml"  # evaluated on every decision, it may
    manifest.write_text(manifest.read_text().replace("    file: prompt_class.rego\n",
                                                     "    file: prompt_class.rego\n    memoise: false\n"))
    assert compile_bundle(bundle_copy).rules


def test_a_memoised_rule_may_not_reach_the_clock_through_a_helper_it_names_without_importing(
        bundle_copy: Path) -> None:
    # `data.clock.late` reaches the helper package as surely as `import data.clock` does (and the
    # declared-fields check already followed such references): the volatile-call check follows them too.
    rego = bundle_copy / "prompt_class.rego"
    rego.write_text(rego.read_text() + "\nafter_hours if data.clock.late\n")
    helper = bundle_copy / "clock.rego"
    helper.write_text("package clock\n\nimport rego.v1\n\nlate if time.now_ns() > 0\n")
    with pytest.raises(BundleError) as exc:
        compile_bundle(bundle_copy)
    assert [(i.path, i.line) for i in exc.value.issues
            if "time.now_ns gives another answer" in i.message] == [(str(helper), 5)]


def test_a_message_expression_error_names_its_manifest_line(bundle_copy: Path) -> None:
    (issue,), line = _manifest_edit_issues(bundle_copy, 'string(params.max_gpu_temp_c) + "C limit"\'',
                                           'string(params.max_gpu_temp_c + "C limit"\'')
    assert (issue.path, issue.line) == (str(bundle_copy / "manifest.yaml"), line)
    assert issue.message.startswith("rules[3](id=safety.gpu_temperature).message: column ")


def test_a_rego_allow_of_objects_denies_with_a_reason_instead_of_failing_the_decision() -> None:
    src = 'package objs\nimport rego.v1\nallow contains {"id": c.id} if { some c in input.candidates }\n'
    program = compile_rego({"o.rego": ("o.rego", src)}, "o.rego", {})
    assert program.evaluate_candidates({}, [{"id": "a", "endpoint": {}}], {}) == [(False, "not in objs.allow")]
