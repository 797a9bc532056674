"""CEL rules through Google's ``cel-expr-python``: typed declarations, errors as denials.

A CEL rule is one boolean expression over ``request``, ``endpoint``, ``telemetry``, ``age_s``,
``state`` and ``params``; true allows. An optional ``message`` expression (a string) explains
a denial. An evaluation that yields a CEL error value denies, with the error as the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cel_expr_python import cel
from cel_expr_python.ext import ext_bindings, ext_strings

from policies.errors import PolicyIssue

_T = cel.Type
_DYN_MAP = _T.Map(_T.STRING, _T.DYN)
VARIABLES: dict[str, Any] = {
    "request": _DYN_MAP,
    "endpoint": _DYN_MAP,
    "telemetry": _T.Map(_T.STRING, _T.DOUBLE),
    "age_s": _T.Map(_T.STRING, _T.INT),
    "state": _DYN_MAP,
    "params": _DYN_MAP,
}
# cel.bind() and the strings extension (join, format...) keep rules and messages short.
_ENV = cel.NewEnv(variables=VARIABLES, extensions=[ext_bindings.ExtBindings(), ext_strings.ExtStrings()])
_ERROR_RE = re.compile(r"ERROR: <input>:(\d+):(\d+): (.*?)(?=\n \||\nERROR: |\s*\[[A-Z_]+\]\s*$|$)", re.S)


def _issues(path: str, message: str) -> list[PolicyIssue]:
    """Turn cel-expr-python's ``ERROR: <input>:L:C: msg`` text into located issues."""
    found = [PolicyIssue(path, int(m.group(1)), int(m.group(2)), m.group(3).strip())
             for m in _ERROR_RE.finditer(message)]
    return found or [PolicyIssue(path, 1, 1, message.strip())]


@dataclass(frozen=True, slots=True)
class CelProgram:
    """A compiled CEL rule (and its optional message expression).

    Examples
    --------
    >>> prog = compile_cel("telemetry.gpu_temp_c <= double(params.max_c)", "t.cel",
    ...                    message='"too hot"')
    >>> prog.evaluate({"telemetry": {"gpu_temp_c": 90.0}, "params": {"max_c": 85}})
    (False, 'too hot')
    >>> prog.evaluate({"telemetry": {}, "params": {"max_c": 85}})[1]
    'error: NOT_FOUND: Key not found in map : "gpu_temp_c"'
    """

    source: str
    path: str
    expr: Any
    message: Any | None
    # The ``params`` keys the rule and its message read (None: it reads ``params`` some other way).
    params_used: tuple[str, ...] | None = None

    def params_view(self, params: Mapping[str, Any]) -> Mapping[str, Any]:
        """The part of ``params`` this rule reads: converting all of it costs as much as the evaluation."""
        if self.params_used is None:
            return params
        return {k: params[k] for k in self.params_used if k in params}

    def evaluate(self, activation: Mapping[str, Any]) -> tuple[bool, str]:
        """(allow, reason) for one activation; an error value or a non-bool result denies."""
        try:
            value = self.expr.eval(data=activation)
        except Exception as exc:  # the binding raises on conversion problems: deny, say why
            return False, f"error: {exc}"
        # Only a BOOL true gives Python's True (an error's value is its text, an INT 1 is 1): the
        # common answer skips asking the value's type, which costs more than the answer itself.
        answer = value.value()
        if answer is True:
            return True, "ok"
        kind = value.type().name()
        if kind == "ERROR":
            return False, f"error: {answer}"
        if kind != "BOOL":
            return False, f"error: rule returned {kind.lower()}, not bool"
        return False, self._reason(activation)

    def _reason(self, activation: Mapping[str, Any]) -> str:
        if self.message is None:
            return f"denied by {self.path}"
        try:
            msg = self.message.eval(data=activation)
        except Exception as exc:
            return f"denied by {self.path} (message failed: {exc})"
        if msg.type().name() == "STRING":
            return str(msg.value())
        return f"denied by {self.path} (message gave {msg.type().name().lower()}: {msg.value()})"


class CelCompileError(ValueError):
    def __init__(self, issues: list[PolicyIssue]) -> None:
        super().__init__("\n".join(map(str, issues)))
        self.issues = issues


_PARAMS_RE = re.compile(r"\bparams\b(?:\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)\b(?!\s*\()"  # params.key, not a method
                        r"|\s*\[\s*(?:\"([^\"\\]*)\"|'([^'\\]*)')\s*\])?")  # params["key"]


def referenced_params(*sources: str) -> tuple[str, ...] | None:
    """The ``params`` keys read as ``params.k`` or ``params["k"]``; None if ``params`` is used otherwise.

    >>> referenced_params('telemetry.t <= double(params.max_t)', '"over " + string(params["max_t"])')
    ('max_t',)
    >>> referenced_params('params.exists(k, k == "x")') is None  # a macro over the whole map
    True
    >>> referenced_params('has(params[request.key])') is None
    True
    """
    keys: dict[str, None] = {}
    for src in sources:
        for m in _PARAMS_RE.finditer(src):
            key = m.group(1) or m.group(2) or m.group(3)
            if key is None:
                return None
            keys.setdefault(key, None)
    return tuple(keys)


def compile_cel(source: str, path: str, *, message: str = "", message_path: str = "") -> CelProgram:
    """Type-check and compile a rule; raises :class:`CelCompileError` with file:line:col issues.

    >>> compile_cel("telemetry.gpu_temp_c > ", "t.cel")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    policies.cel_engine.CelCompileError: t.cel:1:24: Syntax error: mismatched input '<EOF>' expecting ...
    """
    try:
        expr = _ENV.compile(source)
    except RuntimeError as exc:
        raise CelCompileError(_issues(path, str(exc))) from None
    kind = expr.return_type().name()
    if kind not in ("BOOL", "DYN"):
        raise CelCompileError([PolicyIssue(path, 1, 1, f"a rule must evaluate to bool, this gives {kind.lower()}")])
    msg_expr = None
    if message:
        where = message_path or f"{path} (message)"
        try:
            msg_expr = _ENV.compile(message)
        except RuntimeError as exc:
            raise CelCompileError(_issues(where, str(exc))) from None
        if msg_expr.return_type().name() not in ("STRING", "DYN"):
            raise CelCompileError([PolicyIssue(where, 1, 1, "a message must evaluate to a string")])
    return CelProgram(source, path, expr, msg_expr, referenced_params(source, message))
