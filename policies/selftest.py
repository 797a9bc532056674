"""A bundle's own tests: Rego ``test_*`` rules and CEL case tables (context in, verdict out).

Case tables are YAML::

    defaults: {request: {...}, endpoint: {...}}     # optional, merged under every case
    cases:
      - name: a hot GPU is excluded
        telemetry: {gpu_temp_c: 91}                 # also: request, endpoint, age_s, state, params
                                                    # (params overrides reach CEL rules only)
        expect: deny                                # allow | deny
        reason: "over the 85C limit"                # optional: a substring of the reason

Each case runs through the same views the guard builds: the rule sees only what it declares. Each
case also runs a second time with every field of its request, endpoint, telemetry and ages given to
the rule, declared or not: a verdict that changes reads a field the rule does not declare in a way
``policy check`` (:mod:`policies.declared`) did not see, and the case fails, naming the rule.
"""

from __future__ import annotations

import difflib
import posixpath
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from decision.yaml_lines import YamlSyntaxError, load_located_file
from policies.bundle import CompiledBundle, CompiledRule, compile_bundle
from policies.cel_engine import CelProgram
from policies.errors import BundleError
from policies.rego_calls import rego_code, statements
from policies.rego_engine import (
    RegoCompileError,
    is_test_module,
    new_interpreter,
    package_of,
    rego_test_names,
    run_query,
)

# Told (test name, file:line) before a test runs; the test runs only if it returns True.
Started = Callable[[str, str], bool]


def _run_all(name: str, where: str) -> bool:
    return True


_CASE_KEYS = {"name", "request", "endpoint", "telemetry", "age_s", "state", "params", "expect", "reason"}


@dataclass(frozen=True, slots=True)
class TestOutcome:
    """One test's result; ``where`` is ``file:line`` of the test."""

    name: str
    passed: bool
    where: str
    detail: str = ""

    def __str__(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        return f"{mark} {self.name} ({self.where})" + (f": {self.detail}" if self.detail else "")


def _merge(defaults: Mapping[str, Any], case: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {**dict(defaults.get(key) or {}), **dict(case.get(key) or {})}


def run_case(bundle: CompiledBundle, rule: CompiledRule, case: Mapping[str, Any],
             defaults: Mapping[str, Any], *, undeclared: bool = False) -> tuple[bool, str]:
    """(allow, reason) of ``rule`` on one case, through the views the guard would build.

    With ``undeclared``, the rule is given every field of the case's request, endpoint, telemetry and
    ages, declared or not (the backstop's second run).
    """
    s = rule.spec
    request = _merge(defaults, case, "request")
    rview = dict(request) if undeclared else {f: request[f] for f in s.request_fields if f in request}
    params = {**bundle.params, **_merge(defaults, case, "params")}
    state = _merge(defaults, case, "state") if s.state else {}
    item: dict[str, Any] = {}
    if s.scope == "candidate":
        endpoint = _merge(defaults, case, "endpoint")
        fields = s.endpoint_fields
        item["endpoint"] = endpoint if fields is None or undeclared else {f: endpoint[f] for f in fields
                                                                           if f in endpoint}
        tel = _merge(defaults, case, "telemetry")
        ages = _merge(defaults, case, "age_s")
        if s.telemetry or (undeclared and tel):
            item["telemetry"] = {m: float(tel[m]) for m in (tel if undeclared else s.telemetry) if m in tel}
        if s.ages or (undeclared and ages):
            item["age_s"] = {m: int(ages[m]) for m in (ages if undeclared else s.ages) if m in ages}
    program = rule.program
    if isinstance(program, CelProgram):
        act: dict[str, Any] = {"request": rview, "params": params, **item}
        if s.state:
            act["state"] = state
        return program.evaluate(act)
    if s.scope == "request":
        return program.evaluate_request(rview, state)
    return program.evaluate_candidates(rview, [{"id": "c0", **item}], state)[0]


def case_problems(case: Any) -> list[str]:
    """What is wrong with one entry of a case table's ``cases`` (empty: nothing), each thing said once.

    Examples
    --------
    >>> case_problems({"expect": "deny", "telemetri": {"gpu_temp_c": 99}})
    ["unknown key 'telemetri' (did you mean telemetry?)"]
    >>> case_problems({"name": "x", "expect": "denied"})
    ["expect is 'denied'; it must be allow or deny"]
    >>> case_problems({"exp": "allow"})
    ['a case needs expect: allow|deny', "unknown key 'exp' (did you mean expect?)"]
    """
    if not isinstance(case, dict):
        return [f"a case is a mapping of {', '.join(sorted(_CASE_KEYS))}, not {type(case).__name__}"]
    problems = []
    if "expect" not in case:
        problems.append("a case needs expect: allow|deny")
    elif case["expect"] not in ("allow", "deny"):
        problems.append(f"expect is {case['expect']!r}; it must be allow or deny")
    for key in sorted(map(str, set(case) - _CASE_KEYS)):
        close = difflib.get_close_matches(key, sorted(_CASE_KEYS), n=1)
        problems.append(f"unknown key {key!r}" + (f" (did you mean {close[0]}?)" if close else
                                                 f" (a case takes {', '.join(sorted(_CASE_KEYS))})"))
    return problems


def _case_table(bundle: CompiledBundle, rule: CompiledRule, path: Path, started: Started) -> Iterator[TestOutcome]:
    try:
        doc = load_located_file(path)
    except YamlSyntaxError as exc:
        yield TestOutcome(f"{rule.spec.id}: case table", False, f"{exc.path}:{exc.line}", str(exc))
        return
    data = doc.data if isinstance(doc.data, dict) else {}
    cases = data.get("cases")
    if not isinstance(cases, list) or not cases:
        yield TestOutcome(f"{rule.spec.id}: case table", False, f"{path}:1", "no 'cases' list")
        return
    defaults = data.get("defaults") or {}
    for i, case in enumerate(cases):
        where = f"{path}:{doc.line_of(('cases', i))}"
        name = f"{rule.spec.id}: {case.get('name', f'case {i}') if isinstance(case, dict) else i}"
        problems = case_problems(case)
        if problems:
            yield TestOutcome(name, False, where, "; ".join(problems))
            continue
        if not started(name, where):
            continue
        try:
            ok, reason = run_case(bundle, rule, case, defaults)
        except Exception as exc:  # a malformed case (e.g. a non-numeric metric) fails, it does not crash
            yield TestOutcome(name, False, where, f"could not run: {exc}")
            continue
        try:  # the backstop: the same case with every field present, declared or not
            full, _ = run_case(bundle, rule, case, defaults, undeclared=True)
        except Exception:
            full = ok  # an undeclared value the rule could not take (a non-numeric metric): nothing to compare
        want = case["expect"] == "allow"
        if full != ok:
            yield TestOutcome(name, False, where, f"rule {rule.spec.id} reads a field it does not declare: verdict "
                                                  f"differs with undeclared fields present ({'allow' if ok else 'deny'}"
                                                  f" as the service runs it, {'allow' if full else 'deny'} with every "
                                                  "field of the case given); declare what it reads in manifest.yaml")
        elif ok != want:
            yield TestOutcome(name, False, where, f"expected {case['expect']}, got "
                                                  f"{'allow' if ok else 'deny'} ({reason})")
        elif "reason" in case and str(case["reason"]) not in reason:
            yield TestOutcome(name, False, where, f"reason {reason!r} lacks {case['reason']!r}")
        else:
            yield TestOutcome(name, True, where)


def without_other_tests(source: str, keep: str) -> str:
    r"""A test module's source with every ``test_*`` rule but ``keep`` blanked (lines and columns unchanged).

    rego-cpp compiles a module's rules together: a test that crashes it (``with input as`` over a rule
    that depends on another rule) crashes every query of its module, so each test is run again alone.

    Examples
    --------
    >>> src = "package t\nimport rego.v1\ntest_a if { true }\ntest_b if {\n  1 == 1\n}\nhelper := 1\n"
    >>> print(without_other_tests(src, "test_b").replace(" ", "."))
    package.t
    import.rego.v1
    ..................
    test_b.if.{
    ..1.==.1
    }
    helper.:=.1
    <BLANKLINE>
    """
    out = list(source)
    for st in statements(rego_code(source)):
        if st.name.startswith("test_") and st.name != keep:
            out[st.start:st.end] = ["\n" if c == "\n" else " " for c in source[st.start:st.end]]
    return "".join(out)


def _rego_tests(bundle: CompiledBundle, path: Path, started: Started, alone: bool = False) -> Iterator[TestOutcome]:
    every = bundle.modules
    own = posixpath.normpath(path.relative_to(bundle.directory).as_posix())
    if own not in every:
        yield TestOutcome(f"{path.name}", False, f"{path}:1", "not a Rego module of the bundle (a hidden folder?)")
        return
    source = every[own][1]
    package = package_of(source)
    # The rules' modules, this test module and its package's other test modules: a test module that
    # breaks the engine then fails its own tests, not every test module's.
    modules = {k: v for k, v in every.items()
               if not is_test_module(k) or k == own or package_of(v[1]) == package}
    try:
        interp = new_interpreter(modules, bundle.params)
    except RegoCompileError as exc:
        yield from (TestOutcome(f"{path.name}: compile", False, str(i), i.message) for i in exc.issues)
        return
    names = rego_test_names(source)
    if not names:
        yield TestOutcome(f"{path.name}", False, f"{path}:1", "no test_* rules")
        return
    lines = source.splitlines()
    for name in names:
        # The rule's head: its name followed by what can follow a name (not test_a matching test_ab).
        head = re.compile(rf"{re.escape(name)}\b(?!\.)")
        line = next((n for n, text in enumerate(lines, 1) if head.match(text)), 1)
        if not started(f"{package}.{name}", f"{path}:{line}"):
            continue
        try:
            if alone:  # the test's module and its package's other test modules hold no other test
                interp = new_interpreter({k: (p, without_other_tests(src, name if k == own else ""))
                                          if is_test_module(k) else (p, src) for k, (p, src) in modules.items()},
                                         bundle.params)
            value = run_query(interp, f"data.{package}.{name}")
        except Exception as exc:
            yield TestOutcome(f"{package}.{name}", False, f"{path}:{line}", f"error: {exc}")
            continue
        passed = value is True
        yield TestOutcome(f"{package}.{name}", passed, f"{path}:{line}",
                          "" if passed else f"evaluated to {'undefined' if value is None else value}")


def run_bundle_tests(directory: str | Path) -> list[TestOutcome]:
    """Compile the bundle and run every test it names, in this process; a compile error is a failed test.

    rego-cpp can crash the process on some test constructs: tools that must survive that use
    :func:`policies.selftest_child.run_tests_isolated`, which runs this in a child.

    Examples
    --------
    >>> from policies.bundle import DEFAULT_BUNDLE
    >>> results = run_bundle_tests(DEFAULT_BUNDLE)
    >>> len(results) > 20, all(r.passed for r in results)
    (True, True)
    """
    return list(iter_bundle_tests(directory))


def iter_bundle_tests(directory: str | Path, started: Started = _run_all, *,
                      alone: bool = False) -> Iterator[TestOutcome]:
    """:func:`run_bundle_tests` one outcome at a time; ``started`` is asked before each test runs.

    With ``alone``, each Rego test runs in an interpreter of its own whose test modules hold no other
    test (see :func:`without_other_tests`); the tests, their order and names are the same.
    """
    try:
        bundle = compile_bundle(directory)
    except BundleError as exc:
        yield from (TestOutcome("compile", False, f"{i.path}:{i.line}:{i.column}", i.message) for i in exc.issues)
        return
    for rule in bundle.rules:
        for t in rule.spec.tests:
            path = bundle.directory / t
            if is_test_module(path.name):
                yield from _rego_tests(bundle, path, started, alone)
            elif path.suffix in (".yaml", ".yml"):
                yield from _case_table(bundle, rule, path, started)
            else:
                yield TestOutcome(f"{rule.spec.id}: {t}", False, f"{path}:1",
                                  "tests are *_test.rego modules or .yaml case tables")


def summary(results: list[TestOutcome]) -> str:
    """The closing line of ``infermesh policy test``.

    >>> summary([TestOutcome("a", True, "f:1"), TestOutcome("b", False, "f:2")])
    '1 passed, 1 failed'
    """
    passed = sum(r.passed for r in results)
    return f"{passed} passed, {len(results) - passed} failed"
