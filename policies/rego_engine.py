"""Rego rules through ``regopy`` (rego-cpp, in process, Rego v1).

A Rego rule module is evaluated once per request over all the candidates it has to judge:
``input`` is ``{"request": {...}, "candidates": [{"id", "endpoint", "telemetry", "age_s"}],
"state": {...}}`` and ``data.params`` holds the bundle's parameters. The module defines

* ``allow``: the set of candidate ids it allows (for a request-scope rule: the boolean true),
* ``reason`` (optional): an object from candidate id to why it was denied (request scope: a string).

A candidate missing from ``allow`` is denied: undefined fails closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import regopy
from regopy.rego_shared import rego_bundle_query_entrypoint, rego_free_output, rego_output_string, rego_query

from decision.yaml_lines import line_col
from policies.errors import PolicyIssue, line_col_of_offset

_PACKAGE_RE = re.compile(r"^\s*package\s+([A-Za-z_][A-Za-z0-9_.]*)", re.M)
_TEST_RE = re.compile(r"^(test_[A-Za-z0-9_]*)\b", re.M)
_STDOUT_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """rego-cpp prints compile errors on fd 1; we report them ourselves, located, instead."""
    with _STDOUT_LOCK:
        sys.stdout.flush()
        saved = os.dup(1)
        try:
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), 1)
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def _take(text: str, pos: int) -> tuple[str, int]:
    """Read a rego-cpp length-prefixed string ``N:chars`` at ``pos``."""
    colon = text.index(":", pos)
    n = int(text[pos:colon])
    return text[colon + 1: colon + 1 + n], colon + 1 + n


def translate_error(text: str, sources: Mapping[str, bytes], paths: Mapping[str, str]) -> list[PolicyIssue]:
    """Turn a regopy error s-expression (byte offsets) into ``file:line:col`` issues.

    ``sources`` maps module names to their bytes, ``paths`` module names to the path to report.

    >>> err = "(rego-errorseq\\n  (error 6:m.rego|11|2\\n    (errormsg 7:Bad (x))\\n))"
    >>> [str(i) for i in translate_error(err, {"m.rego": b"package x\\n\\nallow if"}, {"m.rego": "b/m.rego"})]
    ['b/m.rego:3:1: Bad (x)']
    """
    issues: list[PolicyIssue] = []
    for m in re.finditer(r"\(error ", text):
        pos = m.end()
        module, offset = "", 0
        try:
            if text[pos].isdigit():
                module, pos = _take(text, pos)
                rest = re.match(r"\|(\d+)\|(\d+)", text[pos:])
                offset = int(rest.group(1)) if rest else 0
            mm = text.index("(errormsg ", pos)
            message, _ = _take(text, mm + len("(errormsg "))
        except (ValueError, IndexError):
            continue
        src = sources.get(module, b"")
        line, col = line_col_of_offset(src, offset) if src else (1, 1)
        issues.append(PolicyIssue(paths.get(module, module or "<rego>"), line, col, message))
    if not issues:
        issues.append(PolicyIssue(next(iter(paths.values()), "<rego>"), 1, 1, text.strip()))
    return issues


def package_of(source: str) -> str:
    """The module's package, e.g. ``infermesh.residency``.

    >>> package_of("# c\\npackage infermesh.residency\\nimport rego.v1")
    'infermesh.residency'
    """
    m = _PACKAGE_RE.search(source)
    return m.group(1) if m else ""


def is_test_module(name: str) -> bool:
    """Whether a bundle's Rego module (by file name) holds tests, which rules never load.

    >>> is_test_module("residency_test.rego"), is_test_module("residency.rego")
    (True, False)
    """
    return name.endswith("_test.rego")


def rego_test_names(source: str) -> list[str]:
    """Names of the ``test_*`` rules of a test module, in file order, each once."""
    return list(dict.fromkeys(_TEST_RE.findall(source)))


class RegoCompileError(ValueError):
    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__("\n".join(map(str, issues)))
        self.issues = issues


def new_interpreter(modules: Mapping[str, tuple[str, str]], params: Mapping[str, Any]) -> regopy.Interpreter:
    """An interpreter holding ``modules`` (name -> (path, source)) and ``data.params``.

    Raises :class:`RegoCompileError` with located issues if a module does not parse.
    """
    interp = regopy.Interpreter()
    interp.add_data({"params": dict(params)})
    sources = {name: src.encode() for name, (_, src) in modules.items()}
    paths = {name: path for name, (path, _) in modules.items()}
    with _quiet_stdout():
        for name, (_, src) in modules.items():
            try:
                interp.add_module(name, src)
            except regopy.RegoError as exc:
                raise RegoCompileError(translate_error(str(exc), sources, paths)) from None
    return interp


class RegoEvalError(RuntimeError):
    """A rule's evaluation failed (rego-cpp's message, e.g. ``Function not found: f``)."""


def _output(impl: Any) -> Any:
    """regopy's ``Output`` of a query, or :class:`RegoEvalError` with rego-cpp's own message.

    regopy 1.5 marks an evaluation error (a call to a function that does not exist, conflicting
    values of a complete rule) as an ok output whose text is an error s-expression, which its
    ``Output`` then fails to parse as JSON: the reason a denial carried was "Expecting value: line 1
    column 1". The text is read here first.
    """
    text = rego_output_string(impl)
    if text.startswith("(error"):
        rego_free_output(impl)
        messages = [_take(text, m.end())[0] for m in re.finditer(r"\(errormsg ", text)]
        raise RegoEvalError("; ".join(dict.fromkeys(messages)) or "rego evaluation error")
    try:
        return regopy.Output(impl)  # owns impl from here, even when it fails (its __del__ frees it)
    except json.JSONDecodeError as exc:
        # rego-cpp 1.x writes some strings unescaped (sprintf's %s of a string with quotes that
        # concat built): name where, so the policy author can find the expression.
        near = text[max(0, exc.pos - 40): exc.pos + 40]
        raise RegoEvalError(f"rego-cpp returned a value that is not valid JSON ({exc.msg} near {near!r}); "
                            "a string with quotes passed through sprintf's %s does this: join with concat") from None


def query_entry(interp: regopy.Interpreter, bundle: regopy.Bundle, entry: str) -> Any:
    """``interp.query_bundle_entrypoint(bundle, entry)``, raising :class:`RegoEvalError` on an evaluation error."""
    return _output(rego_bundle_query_entrypoint(interp._impl, bundle._impl, entry))


def query(interp: regopy.Interpreter, text: str) -> Any:
    """``interp.query(text)``, raising :class:`RegoEvalError` on an evaluation error."""
    return _output(rego_query(interp._impl, text))


def _value(output: Any) -> Any:
    """The first expression's value of a query output; ``None`` when undefined."""
    if not output.ok():
        raise RuntimeError(str(output).strip() or "rego evaluation error")
    results = output.results
    if not results or not results[0].expressions:
        return None
    return results[0].expressions[0]


@dataclass
class RegoProgram:
    """One compiled Rego rule: a query bundle over ``data.<package>.allow`` and ``reason``.

    Examples
    --------
    >>> src = '''package demo
    ... import rego.v1
    ... allow contains c.id if { some c in input.candidates; c.endpoint.tier != "device" }
    ... reason[c.id] := "devices are off limits" if { some c in input.candidates; c.endpoint.tier == "device" }
    ... '''
    >>> prog = compile_rego({"demo.rego": ("demo.rego", src)}, "demo.rego", {})
    >>> prog.evaluate_candidates({}, [{"id": "a", "endpoint": {"tier": "edge"}},
    ...                               {"id": "b", "endpoint": {"tier": "device"}}], {})
    [(True, 'ok'), (False, 'devices are off limits')]
    """

    path: str
    package: str
    interp: Any
    bundle: Any
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _query(self, entry: str, document: Mapping[str, Any]) -> Any:
        # One interpreter per rule: queries on it must not interleave (set_input, then query).
        with self._lock:
            # JSON text is parsed in C++; regopy's Input() walks Python objects, ~100x slower.
            self.interp.set_input_term(json.dumps(document))
            return _value(query_entry(self.interp, self.bundle, f"{self.package.replace('.', '/')}/{entry}"))

    def evaluate_candidates(self, request: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]],
                            state: Mapping[str, Any]) -> list[tuple[bool, str]]:
        """(allow, reason) per candidate, from one evaluation over all of them."""
        if not candidates:
            return []
        doc = {"request": request, "candidates": list(candidates), "state": state}
        try:
            allowed = self._query("allow", doc)
        except Exception as exc:
            return [(False, f"error: {exc}")] * len(candidates)
        # Candidate ids are strings: anything else in the set (an object, a number) allows nothing.
        ids = {a for a in allowed if isinstance(a, str)} if isinstance(allowed, list) else set()
        reasons: Any = {}
        if len(ids) < len(candidates):
            try:
                reasons = self._query("reason", doc) or {}
            except Exception as exc:
                reasons = {c["id"]: f"error: {exc}" for c in candidates}
        out: list[tuple[bool, str]] = []
        for c in candidates:
            cid = c["id"]
            if cid in ids:
                out.append((True, "ok"))
            elif allowed is None:
                out.append((False, f"undefined: {self.package}.allow has no value (fail closed)"))
            else:
                why = reasons.get(cid) if isinstance(reasons, dict) else None
                out.append((False, str(why) if why else f"not in {self.package}.allow"))
        return out

    def evaluate_request(self, request: Mapping[str, Any], state: Mapping[str, Any]) -> tuple[bool, str]:
        """(allow, reason) of a request-scope rule: ``allow`` must be exactly true."""
        doc = {"request": request, "candidates": [], "state": state}
        try:
            allowed = self._query("allow", doc)
            if allowed is True:
                return True, "ok"
            why = self._query("reason", doc)
        except Exception as exc:
            return False, f"error: {exc}"
        if allowed is None and not why:
            return False, f"undefined: {self.package}.allow has no value (fail closed)"
        return False, str(why) if why else f"{self.package}.allow is {json.dumps(allowed)}"


def compile_rego(modules: Mapping[str, tuple[str, str]], rule_module: str,
                 params: Mapping[str, Any]) -> RegoProgram:
    """Compile the rule module (with every other module it may import) into a query bundle."""
    path, source = modules[rule_module]
    package = package_of(source)
    if not package:
        raise RegoCompileError([PolicyIssue(path, 1, 1, "no package declaration")])
    # Rego merges the modules of one package: another module's allow would be this rule's allow too
    # (one rule's deny undone by another's allow, every case table still passing).
    sharing = sorted(p for name, (p, src) in modules.items() if name != rule_module and package_of(src) == package)
    if sharing:
        m = _PACKAGE_RE.search(source)
        line = line_col(source, m.start(1))[0] if m else 1
        raise RegoCompileError([PolicyIssue(path, line, 1, f"package {package} is also declared by {sharing[0]}: "
                                                          "Rego would merge that module's allow and reason into "
                                                          "this rule's; give each rule module a package of its "
                                                          "own (shared helpers go in a package the rules import)")])
    interp = new_interpreter(modules, params)
    base = package.replace(".", "/")
    try:
        with _quiet_stdout():
            bundle = interp.build(None, [f"{base}/allow", f"{base}/reason"])
    except regopy.RegoError as exc:
        sources = {name: src.encode() for name, (_, src) in modules.items()}
        raise RegoCompileError(translate_error(str(exc), sources, {n: p for n, (p, _) in modules.items()})) \
            from None
    if not bundle.ok():
        raise RegoCompileError([PolicyIssue(path, 1, 1, "rego bundle failed to build")])
    return RegoProgram(path, package, regopy.Interpreter(), bundle)


def builtin_checker() -> Callable[[str], bool]:
    """Whether a name is one of rego-cpp's built-in functions (what OPA offers and rego-cpp does not is not)."""
    interp = regopy.Interpreter()
    seen: dict[str, bool] = {}

    def is_builtin(name: str) -> bool:
        if name not in seen:
            seen[name] = bool(interp.is_builtin(name))
        return seen[name]

    return is_builtin


def run_query(interp: Any, text: str) -> Any:
    """Evaluate an ad-hoc query (tests); ``None`` when undefined, raises on evaluation errors."""
    return _value(query(interp, text))
