"""Calls to functions that do not exist, found when a bundle is checked rather than when a rule runs.

rego-cpp compiles a module that calls an unknown function and only fails when the call is reached:
every candidate of every request that gets there is then denied ("Function not found"), fail
closed, and ``policy check`` (and a hot reload, whose cases may not reach the call) would have
said the bundle was fine. A name is also unknown when it is an OPA built-in that rego-cpp does
not provide (``net.cidr_contains``, ``http.send``, ``print``).

The scan is conservative: it flags a call only when the name is certainly not resolvable, i.e. it
is not a rego-cpp built-in, not a function whose head starts a line in a module of the same
package, and does not go through ``data`` or an import. Strings and comments are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from decision.yaml_lines import line_col
from policies.errors import PolicyIssue
from policies.rego_engine import is_test_module, package_of

_KEYWORDS = frozenset({"if", "else", "not", "some", "every", "in", "contains", "default", "package", "import",
                       "with", "as", "true", "false", "null"})
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_CALL = re.compile(rf"(?<![\w.$\]\)])({_NAME}(?:\.{_NAME})*)\s*\(")
_HEAD = re.compile(rf"^(?:default\s+)?({_NAME})\s*\(", re.M)  # a function head starts its line
_IMPORT = re.compile(rf"^\s*import\s+((?:data|input)(?:\.{_NAME})*)(?:\s+as\s+({_NAME}))?", re.M)
# Strings (raw and interpreted) and comments, replaced by spaces so offsets stay put.
_SKIPPED = re.compile(r'"(?:\\.|[^"\\\n])*"|`[^`]*`|#[^\n]*')


def _blank(match: re.Match[str]) -> str:
    return "".join(c if c == "\n" else " " for c in match.group(0))


def _bound_names(code: str) -> set[str]:
    """What imports bind (``import data.lib.x`` binds ``x``; ``... as y`` binds ``y``), plus data and input."""
    names = {"data", "input"}
    for m in _IMPORT.finditer(code):
        names.add(m.group(2) or m.group(1).rsplit(".", 1)[-1])
    return names


def undefined_calls(modules: Mapping[str, tuple[str, str]], is_builtin: Callable[[str], bool]) -> list[PolicyIssue]:
    """Calls in ``modules`` (name -> (path to report, source)) to functions no one defines.

    Parameters
    ----------
    modules : mapping
        The bundle's Rego modules, as ``policies.bundle.rego_modules`` gives them.
    is_builtin : callable
        Whether a name is a built-in of the engine (``regopy.Interpreter().is_builtin``).

    Examples
    --------
    >>> src = '''package demo
    ... import rego.v1
    ... short(s) := substring(s, 0, 3)
    ... allow contains c.id if { some c in input.candidates; nosuchfn(short(c.id)) } # not: fn(x)
    ... '''
    >>> [str(i) for i in undefined_calls({"d.rego": ("b/d.rego", src)}, lambda n: n == "substring")]
    ['b/d.rego:4:54: function not found: nosuchfn (not a rego-cpp built-in, nor defined in package demo)']
    """
    code = {name: _SKIPPED.sub(_blank, src) for name, (_, src) in modules.items()}
    # Rules never load test modules: a function defined only in a *_test.rego is not there when a rule runs.
    defined: dict[bool, dict[str, set[str]]] = {False: {}, True: {}}
    for name, text in code.items():
        for in_tests in {True, is_test_module(name)}:
            defined[in_tests].setdefault(package_of(text), set()).update(_HEAD.findall(text))
    issues: list[PolicyIssue] = []
    for name, text in code.items():
        package = package_of(text)
        bound = _bound_names(text)
        known = defined[is_test_module(name)].get(package, set())
        for m in _CALL.finditer(text):
            called = m.group(1)
            first = called.split(".", 1)[0]
            if first in _KEYWORDS or first in bound or called in known or is_builtin(called):
                continue
            line, column = line_col(text, m.start())
            where = "nor defined in package " + package if "." not in called else "nor reached through an import"
            issues.append(PolicyIssue(modules[name][0], line, column,
                                      f"function not found: {called} (not a rego-cpp built-in, {where})"))
    return issues


# Built-ins whose answer changes from one call to the next: the clock, randomness, the outside world.
_VOLATILE = re.compile(r"^(?:time\.now_ns|rand\.\w+|uuid\.\w+|http\.send|opa\.runtime|net\.lookup_ip_addr)$")


def volatile_calls(modules: Mapping[str, tuple[str, str]], rule_module: str) -> list[PolicyIssue]:
    """Calls a rule makes (in its module, or in a module of a package it imports) to built-ins whose
    answer changes between calls; a memoised rule would keep its first answer for good.

    Examples
    --------
    >>> src = 'package w\\nimport rego.v1\\nallow contains c.id if { some c in input.candidates; time.now_ns() > 0 }'
    >>> [str(i) for i in volatile_calls({"w.rego": ("b/w.rego", src)}, "w.rego")]
    ['b/w.rego:3:54: time.now_ns gives another answer on every call']
    """
    code = {name: _SKIPPED.sub(_blank, src) for name, (_, src) in modules.items() if not is_test_module(name)}
    own = code.get(rule_module, "")
    imported = [m.group(1).split(".", 1)[1] for m in _IMPORT.finditer(own) if m.group(1).startswith("data.")]
    reached = [name for name, text in code.items() if name == rule_module or any(
        path == package_of(text) or path.startswith(package_of(text) + ".") for path in imported)]
    issues: list[PolicyIssue] = []
    for name in reached:
        text = code[name]
        for m in _CALL.finditer(text):
            if _VOLATILE.match(m.group(1)):
                line, column = line_col(text, m.start())
                issues.append(PolicyIssue(modules[name][0], line, column,
                                          f"{m.group(1)} gives another answer on every call"))
    return issues
