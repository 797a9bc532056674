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
from dataclasses import dataclass

from decision.yaml_lines import line_col
from policies.errors import PolicyIssue
from policies.rego_engine import is_test_module, package_of

# Rego's keywords and a name (a rule, a variable, a step of a reference): shared with policies.declared.
KEYWORDS = frozenset({"if", "else", "not", "some", "every", "in", "contains", "default", "package", "import",
                      "with", "as", "true", "false", "null"})
NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_CALL = re.compile(rf"(?<![\w.$\]\)])({NAME}(?:\.{NAME})*)\s*\(")
_HEAD = re.compile(rf"^(?:default\s+)?({NAME})\s*\(", re.M)  # a function head starts its line
_IMPORT = re.compile(rf"^\s*import\s+((?:data|input)(?:\.{NAME})*)(?:\s+as\s+({NAME}))?", re.M)
# Strings (raw and interpreted) and comments, replaced by spaces so offsets stay put.
_SKIPPED = re.compile(r'"(?:\\.|[^"\\\n])*"|`[^`]*`|#[^\n]*')


def _blank(match: re.Match[str]) -> str:
    return "".join(c if c == "\n" else " " for c in match.group(0))


def rego_code(source: str) -> str:
    """``source`` with its strings and comments blanked (offsets, lines and columns unchanged), for scans
    that must not match inside them.

    >>> code = rego_code('x := "input.request" # input.request')
    >>> code.rstrip(), len(code)
    ('x :=', 36)
    """
    return _SKIPPED.sub(_blank, source)


@dataclass(frozen=True, slots=True)
class Statement:
    """One top-level statement of a module: a rule (or function) definition, ``package`` or ``import``.

    ``start`` and ``end`` are offsets into the source; ``name`` is the rule's name (``package`` and
    ``import`` for those); ``params`` are a function's parameters as (text, offset), None for a rule.
    """

    start: int
    end: int
    name: str
    params: tuple[tuple[str, int], ...] | None = None


_OPENERS, _CLOSERS = "([{", ")]}"
# A line at bracket depth 0 that carries on the statement before it (an else, a body on its own line).
_GOES_ON = re.compile(r"(?:else\b|if\b|\{|[)\]}|&+\-*/=<>!:,.])")
_LEFT_OPEN = re.compile(r"(?:[=|&+\-*/<>,:(\[{]|\b(?:if|else|contains|in|with|as|some|every|not|default))\s*$")


def statements(code: str) -> list[Statement]:
    r"""The top-level statements of a module's code (as :func:`rego_code` gives it), in order.

    A statement starts on a line at bracket depth 0, unless that line carries on the one before
    (``else``, a lone ``{``, a line the previous one leaves open with an operator).

    Examples
    --------
    >>> code = rego_code('package p\nimport rego.v1\nf(a, [b, c]) := a if {\n  b\n} else := c\nallow contains 1\n')
    >>> [(s.name, s.params) for s in statements(code)]
    [('package', None), ('import', None), ('f', (('a', 27), ('[b, c]', 30))), ('allow', None)]
    """
    out: list[Statement] = []
    starts: list[int] = []
    depth, offset, previous = 0, 0, ""
    for line in code.splitlines(keepends=True):
        text = line.strip()
        if text and depth == 0 and not (starts and (_GOES_ON.match(text) or _LEFT_OPEN.search(previous))):
            starts.append(offset + len(line) - len(line.lstrip()))
        for c in line:
            if c in _OPENERS:
                depth += 1
            elif c in _CLOSERS:
                depth = max(0, depth - 1)
        offset += len(line)
        previous = text or previous
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(code)
        head = _STATEMENT_HEAD.match(code, start)
        name = head.group(1) if head else ""
        params = split_arguments(code, head.end() - 1) if head and head.group(2) else None
        out.append(Statement(start, len(code[:end].rstrip()), name, params))
    return out


_STATEMENT_HEAD = re.compile(rf"(?:default\s+)?({NAME})(\s*\()?")


def split_arguments(code: str, open_at: int) -> tuple[tuple[str, int], ...]:
    """The comma-separated parts (text, offset) between the parenthesis at ``open_at`` and its match:
    a call's arguments, a function head's parameters.

    >>> split_arguments("f(a, [b, c])", 1)
    (('a', 2), ('[b, c]', 5))
    """
    return tuple((code[a:b].strip(), a + len(code[a:b]) - len(code[a:b].lstrip()))
                 for a, b in argument_spans(code, open_at))


def argument_spans(code: str, open_at: int) -> list[tuple[int, int]]:
    """Where each comma-separated part between the parenthesis at ``open_at`` and its match starts and ends
    (a part that is only a blanked string is still a part).

    >>> code = rego_code('object.get(x, "k", 0)')
    >>> argument_spans(code, 10)
    [(11, 12), (13, 17), (18, 20)]
    """
    spans, _ = _bracketed(code, open_at)
    return [] if len(spans) == 1 and not code[spans[0][0]:spans[0][1]].strip() else spans


def bracket_end(code: str, open_at: int) -> int:
    """The offset just after the bracket matching the one at ``open_at`` (the end of ``code`` if none does).

    >>> bracket_end("f(a, [b, c]) + 1", 1)
    12
    """
    return _bracketed(code, open_at)[1]


def _bracketed(code: str, open_at: int) -> tuple[list[tuple[int, int]], int]:
    """The comma-separated parts (start, end) at depth one of the bracket at ``open_at``, and the offset just
    after its match: the one walk of nested brackets behind :func:`argument_spans` and :func:`bracket_end`."""
    spans: list[tuple[int, int]] = []
    depth, begin = 0, open_at + 1
    for i in range(open_at, len(code)):
        c = code[i]
        if c in _OPENERS:
            depth += 1
        elif c in _CLOSERS:
            depth -= 1
        if (c == "," and depth == 1) or depth == 0:
            spans.append((begin, i))
            begin = i + 1
            if depth == 0:
                return spans, i + 1
    return spans, len(code)


def imported(code: str) -> dict[str, str]:
    r"""The names a module's imports bind, to what they import (``import data.lib.x`` binds ``x``,
    ``import input.request as r`` binds ``r``).

    >>> imported("package p\nimport rego.v1\nimport data.lib.x\nimport input.request as r\n")
    {'x': 'data.lib.x', 'r': 'input.request'}
    """
    return {m.group(2) or m.group(1).rsplit(".", 1)[-1]: m.group(1) for m in _IMPORT.finditer(code)}


def _bound_names(code: str) -> set[str]:
    """What imports bind, plus data and input."""
    return {"data", "input", *imported(code)}


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
    code = {name: rego_code(src) for name, (_, src) in modules.items()}
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
            if first in KEYWORDS or first in bound or called in known or is_builtin(called):
                continue
            line, column = line_col(text, m.start())
            where = "nor defined in package " + package if "." not in called else "nor reached through an import"
            issues.append(PolicyIssue(modules[name][0], line, column,
                                      f"function not found: {called} (not a rego-cpp built-in, {where})"))
    return issues


# Built-ins whose answer changes from one call to the next: the clock, randomness, the outside world.
_VOLATILE = re.compile(r"^(?:time\.now_ns|rand\.\w+|uuid\.\w+|http\.send|opa\.runtime|net\.lookup_ip_addr)$")


_DATA_REF = re.compile(rf"(?<![\w.$])data((?:\.{NAME})+)")


def reached_modules(code: Mapping[str, str], rule_module: str) -> list[str]:
    """The rule's module and the modules of every package it refers to (``import data.x``,
    ``data.x.y``), transitively; ``code`` is each module's :func:`rego_code`.

    >>> reached_modules({"r": "package r\\nallow if data.lib.ok", "lib": "package lib\\nok if data.deep.x",
    ...                  "deep": "package deep\\nx := 1", "other": "package other"}, "r")
    ['deep', 'lib', 'r']
    """
    packages = {name: package_of(text) for name, text in code.items()}
    seen, queue = {rule_module}, [rule_module]
    while queue:
        text = code[queue.pop()]
        paths = [p[len("data."):] for p in imported(text).values() if p.startswith("data.")]
        paths += [m.group(1).lstrip(".") for m in _DATA_REF.finditer(text)]
        for name, pkg in packages.items():
            if name not in seen and any(p == pkg or p.startswith(pkg + ".") or pkg.startswith(p + ".")
                                        for p in paths):
                seen.add(name)
                queue.append(name)
    return sorted(seen)


def volatile_calls(modules: Mapping[str, tuple[str, str]], rule_module: str) -> list[PolicyIssue]:
    """Calls a rule makes (in its module, or in a module of a package it imports) to built-ins whose
    answer changes between calls; a memoised rule would keep its first answer for good.

    Examples
    --------
    >>> src = 'package w\\nimport rego.v1\\nallow contains c.id if { some c in input.candidates; time.now_ns() > 0 }'
    >>> [str(i) for i in volatile_calls({"w.rego": ("b/w.rego", src)}, "w.rego")]
    ['b/w.rego:3:54: time.now_ns gives another answer on every call']
    """
    code = {name: rego_code(src) for name, (_, src) in modules.items() if not is_test_module(name)}
    issues: list[PolicyIssue] = []
    for name in reached_modules(code, rule_module) if rule_module in code else ():
        text = code[name]
        for m in _CALL.finditer(text):
            if _VOLATILE.match(m.group(1)):
                line, column = line_col(text, m.start())
                issues.append(PolicyIssue(modules[name][0], line, column,
                                          f"{m.group(1)} gives another answer on every call"))
    return issues
