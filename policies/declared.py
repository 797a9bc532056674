"""Reads of inputs a rule does not declare, refused when a bundle is compiled rather than found when it runs.

A rule is given only the request fields, endpoint facts, metrics and ages its manifest entry declares
(:mod:`policies.inputs`). Anything else it reads is not there: in Rego the read is undefined, and an
undefined deny condition (``not violation[c.id]``) lets every candidate through, so a forgotten
declaration silently fails open; in CEL it is an error, which denies every candidate. Every compile
(``policy check``, ``serve``, a reload, ``decide``) refuses such a read, located at the read.

Rego is scanned as :mod:`policies.rego_calls` scans calls (code with strings and comments blanked,
statement by statement), following the input through variables (``r := input.request``), walks
(``some c in input.candidates``), package-level aliases, imports and the bundle's own functions
(``tier_violations(input.request, c.endpoint, data.params)`` makes ``req.prompt_class`` in that
function a read of ``request.prompt_class``). CEL is walked on the checked expression the engine
compiled. Much of what cannot be checked is refused:

* a key that is not written out (``input.request[k]``, ``object.get(input.request, k, d)``, CEL
  ``request[k]``, ``k in request``), unless ``k`` walks the same object's own keys (a name in brackets
  that nothing declares or binds iterates, as a key of ``some k`` does: ``[k | input.request[k]]``);
* an input object used as a whole other than by a variable, a walk, a function of the bundle,
  ``count`` (and ``object.keys``, ``size``): passed to another built-in, compared, put in a collection;
* ``data[...]`` (a package or rule reached through a bracket).

Enumerating keys is a read of every field the enumeration finds, so it is checked against what the
rule declares (``Declared.undeclared``):

* a record (``input.request``, a candidate's ``endpoint``; ``input`` and a candidate themselves) whose
  fields the rule does not all declare may not be enumerated at all: ``some k, v in input.request``,
  ``every``, ``c.endpoint[_]``, ``some k`` then ``input.request[k]``, ``object.keys``, ``count``, CEL
  ``request.exists(k, ...)`` and the other macros, ``size(request)``. Its fields mean different
  things, so whatever the walk tests (``startswith(k, "prompt")``, ``v == "medical"``) is a field the
  rule is never given: absent, the deny condition on it lets every candidate through. A record the
  rule declares whole (``endpoint_fields`` left out gives every field) may be walked, and so may a
  declared field's own value (``some k, v in input.request.labels`` with ``labels`` declared);
* a metric map (``telemetry``, ``age_s``) holds one kind of value, and a walk may treat every metric
  the rule declares alike (``some v in c.age_s``, ``c.age_s[_]``, ``count``, CEL
  ``age_s.all(m, age_s[m] <= 30)``); using the key other than to read the same map back
  (``startswith(m, "gpu")``, ``m == "gpu_temp_c"``, collecting keys, ``object.keys``) picks metrics out
  by name, and is refused unless the rule declares every metric. A CEL message decides nothing: it
  may name the metrics it walks.

This check scans source text, and a construct it does not follow may still get past it. The case
tables are the backstop (:mod:`policies.selftest` runs every case again with undeclared fields
present and fails it when the verdict changes); a disguised read that no case exercises is caught by
neither.
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2

from decision.telemetry import CANONICAL
from decision.yaml_lines import line_col
from policies.errors import PolicyIssue
from policies.manifest import ENDPOINT_FIELDS, REQUEST_FIELDS, RuleSpec
from policies.rego_calls import (
    KEYWORDS,
    NAME,
    Statement,
    argument_spans,
    bracket_end,
    imported,
    reached_modules,
    rego_code,
    statements,
)
from policies.rego_engine import is_test_module, package_of

# The checked expression cel-expr-python serialises (cel.expr.CheckedExpr; the protos come with xds-protos).
_checked: Any = importlib.import_module("cel.expr.checked_pb2")

# An input object with declared fields: its name in the rule's input, the manifest key that declares
# them, and every name the guard can give.
_SECTIONS: dict[str, tuple[str, frozenset[str]]] = {
    "request": ("request_fields", REQUEST_FIELDS),
    "endpoint": ("endpoint_fields", ENDPOINT_FIELDS),
    "telemetry": ("telemetry", frozenset(CANONICAL)),
    "age_s": ("ages", frozenset(CANONICAL)),
}
_WHAT = {"input": "input", "candidates": "input.candidates", "candidate": "a candidate",
         "request": "input.request", "endpoint": "a candidate's endpoint", "telemetry": "a candidate's telemetry",
         "age_s": "a candidate's age_s"}
# Records, whose fields mean different things (walking one that is not fully declared reads in disguise
# whichever field the walk finds), and maps of one kind of value by metric name (a walk may treat every
# metric it is given alike; it reads in disguise only when it looks at the key).
_RECORDS = ("request", "endpoint")
_METRICS = ("telemetry", "age_s")
_CANDIDATE_KEYS: dict[str, str | None] = {"id": None, "endpoint": "endpoint", "telemetry": "telemetry",
                                           "age_s": "age_s"}
_INPUT_KEYS: dict[str, str | None] = {"request": "request", "candidates": "candidates", "state": "state"}


@dataclass(frozen=True)
class Declared:
    """What one rule declares it reads, by input object (``request``, ``endpoint``, ``telemetry``, ``age_s``).

    Examples
    --------
    >>> d = Declared.of(RuleSpec(id="r", kind="other", engine="cel", file="r.cel", request_fields=["tenant"]))
    >>> sorted(d.fields["request"]), len(d.fields["endpoint"]) == len(ENDPOINT_FIELDS), d.state
    (['tenant'], True, False)
    """

    rule_id: str
    engine: str
    fields: Mapping[str, frozenset[str]]
    state: bool

    @classmethod
    def of(cls, rule: RuleSpec) -> Declared:
        endpoint = ENDPOINT_FIELDS if rule.endpoint_fields is None else frozenset(rule.endpoint_fields)
        return cls(rule.id, rule.engine, {"request": frozenset(rule.request_fields), "endpoint": endpoint,
                                          "telemetry": frozenset(rule.telemetry), "age_s": frozenset(rule.ages)},
                   rule.state)

    def field_problem(self, section: str, key: str, text: str) -> str | None:
        """Why reading ``key`` of ``section`` (written ``text``) is wrong for this rule; None if it is not."""
        manifest_key, known = _SECTIONS[section]
        if key in self.fields[section]:
            return None
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; it has {', '.join(sorted(known))}"
            noun = "field" if section in ("request", "endpoint") else "metric"
            return f"{text}: {_WHAT[section]} has no {noun} {key!r}{hint}"
        effect = ("the read is undefined, and a deny condition on it lets every candidate through"
                  if self.engine == "rego" else "reading it is an error, which denies every candidate; has() or "
                                                "in on it is always false")
        return (f"{text}: rule {self.rule_id} reads {section}.{key} but does not declare it, so it is never "
                f"given it ({effect}); add {key} to the rule's {manifest_key} in manifest.yaml")

    def undeclared(self, kind: str) -> list[str]:
        """What an object of ``kind`` can hold that the rule does not declare (empty: fully declared).

        >>> d = Declared.of(RuleSpec(id="r", kind="other", engine="cel", file="r.cel", ages=["xid_errors"]))
        >>> d.undeclared("endpoint"), d.undeclared("age_s")[:2], d.undeclared("candidate")[:2]
        ([], ['fb_free_mib', 'fb_used_mib'], ['telemetry.fb_free_mib', 'telemetry.fb_used_mib'])
        """
        if kind in _SECTIONS:
            return sorted(_SECTIONS[kind][1] - self.fields[kind])
        if kind == "candidate":
            return [f"{part}.{name}" for part in ("endpoint", "telemetry", "age_s") for name in self.undeclared(part)]
        if kind == "candidates":
            return self.undeclared("candidate")
        if kind == "input":
            state = [] if self.state else ["state"]
            return ([f"request.{name}" for name in self.undeclared("request")] + state
                    + [f"candidates[_].{name}" for name in self.undeclared("candidate")])
        return []  # state: given whole once declared (read undeclared, it is refused on its own)

    def enumeration_problem(self, kind: str, text: str, how: str) -> str | None:
        """Why enumerating the keys of ``kind`` (``text``, which ``how`` says how) is wrong; None if it is not."""
        missing = self.undeclared(kind)
        if not missing:
            return None
        noun = "metrics" if kind in _METRICS else "fields"
        return (f"{text}: {how} {_WHAT[kind]}, but rule {self.rule_id} does not declare all of its {noun} (not "
                f"{_listed(missing)}), so it reads {noun} the rule is never given, in disguise (absent, a deny "
                f"condition on one lets every candidate through): read the {noun} by name and declare them, or "
                f"declare every one")

    def key_problem(self, kind: str, text: str, walk: str) -> str | None:
        """Why looking at the key of a walk of the metric map ``kind`` (at ``text``) is wrong; None if it is not."""
        missing = self.undeclared(kind)
        if not missing:
            return None
        return (f"{text}: looks at the key of a walk of {_WHAT[kind]}, but rule {self.rule_id} does not declare "
                f"all of its metrics (not {_listed(missing)}), so it picks out by name metrics the rule is never given "
                f"(absent, a deny condition on one lets every candidate through): read the metric by name "
                f"({kind}.gpu_temp_c) and declare it, or walk without looking at the key ({walk})")

    def may_walk(self, kind: str) -> bool:
        """Whether the rule may walk the keys of ``kind``, one of its input's objects with declared fields:
        a metric map, or a record whose every field it declares."""
        return kind in _METRICS or (kind in _RECORDS and not self.undeclared(kind))

    def state_problem(self, text: str) -> str | None:
        if self.state:
            return None
        return (f"{text}: rule {self.rule_id} reads state but does not declare it, so it is never given it; "
                "add state: true to the rule in manifest.yaml")


def _assigned(var: str, body: str) -> bool:
    """Whether ``body`` gives ``var`` a value (``var := ...``, ``var = ...``, ``... = var``)."""
    return re.search(rf"(?<![\w.$]){var}\s*(?::=|=(?!=))|(?<![=!<>:])=\s*{var}\b", body) is not None


def _dynamic(text: str, what: str, walk: str | None) -> str:
    """A key that is not written out; ``walk`` is how to walk the object instead, when the rule may."""
    hint = f" (walking every key, {walk}, is allowed)" if walk else ""
    return (f"{text}: reads {what} with a key that is not written out, so policy check cannot tell whether the "
            "rule declares it (a field it does not declare is never given to it): name the field, "
            f"e.g. .tenant or [\"tenant\"]{hint}")


def _listed(names: list[str], limit: int = 4) -> str:
    """``a, b, c, d and 3 more``: what a rule does not declare, short enough for one message."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def _whole(text: str, what: str, how: str) -> str:
    return (f"{text}: uses {what} as a whole ({how}), so policy check cannot tell which fields the rule reads "
            "(one it does not declare is never given to it): read fields by name, bind it to a variable "
            "(x := ...) or pass it to a function of the bundle")


# -- Rego ---------------------------------------------------------------------------------------------

_WORD = re.compile(rf"(?<![\w.$\]\)])({NAME})")
_DOT = re.compile(rf"[ \t]*\.[ \t]*({NAME})")
_STRING = re.compile(r'\s*("(?:\\.|[^"\\])*"|`[^`]*`)\s*')
_ARRAY_OF_STRINGS = re.compile(r'\s*\[\s*((?:"(?:\\.|[^"\\])*"\s*,?\s*)+)\]\s*')
_WALK = re.compile(rf"\b(?:some|every)\s+({NAME})(?:\s*,\s*({NAME}))?\s+in\s+$")
_SOME = re.compile(rf"\bsome\s+({NAME}(?:\s*,\s*{NAME})*)[ \t]*(?=$|[\n;}}\]])", re.M)
_BRACKET_NAME = re.compile(rf"\[\s*({NAME})\s*\]")
_DECLARES = re.compile(rf"\b(?:some|every)\s+({NAME}(?:\s*,\s*{NAME})*)|(?<![\w.$])({NAME})\s*:=")
_BINDER = re.compile(rf"\b(?:some|every)\s+(?:{NAME}\s*,\s*)*$")
_ALIAS = re.compile(rf"(?<![\w.$])({NAME})\s*(?::=|(?<![=!<>:])=)\s*$")
_ALIAS_END = re.compile(r"[ \t]*(?:$|[\n;}\])]|if\b)")
_ASSIGNED = re.compile(r"\s*(?::=|=(?!=))")
_CALLEE = re.compile(rf"(?<![\w.$])({NAME}(?:\.{NAME})*)\s*$")


@dataclass(frozen=True)
class _Acc:
    """One step of a reference: ``.name`` / ``["name"]`` (key set), or a bracket whose key is not a string;
    ``at`` is where it starts in the module (-1 for a step no source spells, such as an import's)."""

    key: str | None
    raw: str
    at: int = -1

    def key_at(self) -> int:
        """Where the key of a bracket step starts."""
        inner = self.raw[1:]
        return self.at + 1 + len(inner) - len(inner.lstrip())


@dataclass
class _Module:
    name: str
    path: str
    src: str
    code: str
    package: str
    stmts: list[Statement]
    imports: dict[str, str]


class _RegoReads:
    """The reads one Rego rule makes of its input, in its module and in what that module reaches."""

    def __init__(self, modules: Mapping[str, tuple[str, str]], decl: Declared,
                 is_builtin: Callable[[str], bool]) -> None:
        self.decl = decl
        self.is_builtin = is_builtin
        self.mods: dict[str, _Module] = {}
        for name, (path, src) in modules.items():
            if is_test_module(name):  # rules never load test modules
                continue
            code = rego_code(src)
            self.mods[name] = _Module(name, path, src, code, package_of(code), statements(code), imported(code))
        self.local: dict[tuple[str, int], dict[str, set[str]]] = {}
        self.globals: dict[str, dict[str, set[str]]] = {}
        self.todo: list[tuple[str, int]] = []
        self.scope: set[str] = set()  # the modules the rule reaches
        self.included: set[tuple[str, int]] = set()  # their statements the rule refers to: only they are scanned
        self.issues: dict[tuple[str, int, int, str], PolicyIssue] = {}
        # The keys of walks of metric maps: where one is used, where one reads its own map back
        # (c.age_s[m], which does not look at it), and which maps a key of some k (no domain) walks.
        self.key_uses: set[tuple[str, int, str, str, int, str]] = set()  # module, statement, var, kind, at, text
        self.read_back: set[tuple[str, int]] = set()  # module, at
        self.walked_by: dict[tuple[str, int, str], set[str]] = {}  # module, statement, var -> kinds

    # -- what to scan --
    def reached(self, rule_module: str) -> list[str]:
        """The rule's module and the modules of every package it refers to, transitively."""
        return reached_modules({name: mod.code for name, mod in self.mods.items()}, rule_module)

    def referenced(self, rule_module: str) -> set[tuple[str, int]]:
        """The statements the rule reaches: all of its module's, and of the others (helper packages) only
        those it refers to by name (``lib.f(...)``, ``data.lib.x``, a name of the same package), transitively."""
        out = {(rule_module, i) for i in range(len(self.mods[rule_module].stmts))}
        queue = sorted(out)
        while queue:
            name, index = queue.pop()
            mod, st = self.mods[name], self.mods[name].stmts[index]
            if st.name in ("package", "import"):
                continue  # import data.lib refers to nothing until lib.x does
            text = mod.code[st.start:st.end]
            wanted: list[tuple[str, str | None]] = []  # (package, rule name or None for all of it)
            for m in re.finditer(rf"(?<![\w.$])({NAME}(?:[ \t]*\.[ \t]*{NAME})*)", text):
                parts = [x.strip() for x in m.group(1).split(".")]
                if parts[0] == "data":
                    path = parts[1:]
                elif mod.imports.get(parts[0], "").startswith("data."):
                    path = mod.imports[parts[0]].split(".")[1:] + parts[1:]
                else:
                    wanted.append((mod.package, parts[0]))
                    continue
                for j in range(len(path) + 1):
                    wanted.append((".".join(path[:j]), path[j] if j < len(path) else None))
            for other in sorted(self.scope):
                for i, ost in enumerate(self.mods[other].stmts):
                    if (other, i) not in out and ost.name not in ("package", "import") and any(
                            self.mods[other].package == pkg and (rule is None or ost.name == rule)
                            for pkg, rule in wanted):
                        out.add((other, i))
                        queue.append((other, i))
        return out

    def run(self, rule_module: str) -> list[PolicyIssue]:
        self.scope = set(self.reached(rule_module))
        self.included = self.referenced(rule_module)
        self.todo.extend(sorted(self.included))
        for name in sorted(self.scope):
            mod = self.mods[name]
            for m in re.finditer(r"(?<![\w.$])data\s*\[", mod.code):  # data["lib"].x: a path not written out
                text = _shorten(mod.src[m.start():_accessors(mod, m.end() - 1, len(mod.code))[1]])
                self.issue(mod, m.start(), f"{text}: reads data with a bracket, so policy check cannot tell which "
                                           "package or rule it reaches (and what that reads of the input): write the "
                                           "path out, data.<package>.<rule>, or import it")
        while self.todo:  # a new binding queues its statement again; bindings only grow, so this ends
            self.scan(*self.todo.pop(0))
        self.looked_at_keys()
        return sorted(self.issues.values(), key=lambda i: (i.path, i.line, i.column, i.message))

    def looked_at_keys(self) -> None:
        """Report a key of a walk of a metric map used other than to read that map back (``startswith(m, ...)``,
        ``m == "gpu_temp_c"``, a comprehension's head), unless the rule declares every metric. A walk of a
        record that is not fully declared is refused where it walks; its keys are not reported again."""
        for name, index, var, kind, at, text in sorted(self.key_uses):
            if (name, at) in self.read_back:
                continue
            walked = {kind[4:]} if kind != "key:*" else self.walked_by.get((name, index, var), set())
            for section in sorted(walked & set(_METRICS)):
                self.issue(self.mods[name], at, self.decl.key_problem(section, text, "some v in c." + section))

    def bind(self, where: tuple[str, int], var: str, kind: str) -> None:
        if var == "_":
            return  # every _ is a variable of its own
        kinds = self.local.setdefault(where, {}).setdefault(var, set())
        if kind not in kinds:
            kinds.add(kind)
            if where not in self.todo:
                self.todo.append(where)

    def bind_global(self, package: str, var: str, kind: str) -> None:
        kinds = self.globals.setdefault(package, {}).setdefault(var, set())
        if kind not in kinds:
            kinds.add(kind)
            for where in sorted(self.included):  # any statement the rule reaches may refer to it
                if where not in self.todo:
                    self.todo.append(where)

    def issue(self, mod: _Module, pos: int, message: str | None) -> None:
        if message is None:
            return
        line, col = line_col(mod.src, pos)
        self.issues.setdefault((mod.path, line, col, message), PolicyIssue(mod.path, line, col, message))

    # -- one statement --
    def scan(self, name: str, index: int) -> None:
        mod = self.mods[name]
        st = mod.stmts[index]
        if st.name in ("package", "import"):
            return
        code = mod.code
        head_end = bracket_end(code, code.index("(", st.start)) if st.params is not None else st.start
        body = code[st.start:st.end]
        for some in _SOME.finditer(code, st.start, st.end):
            for var in re.findall(NAME, some.group(1)):
                if not _assigned(var, body):
                    self.bind((name, index), var, "key:*")  # declared, never given a value: it enumerates
        for var in self.implicit_keys(mod, st, body):
            self.bind((name, index), var, "key:*")
        local = self.local.get((name, index), {})
        # Names this statement declares (parameters, some, :=) hide the package's rules of that name.
        # A name declared in braces (a body, a comprehension, an every) hides them only within those braces.
        hidden: dict[str, list[tuple[int, int]]] = {param: [(st.start, st.end)] for param, _ in st.params or ()}
        for d in _DECLARES.finditer(code, st.start, st.end):
            span = _scope(code, st.start, st.end, d.start(), every=code.startswith("every", d.start()))
            for v in re.findall(NAME, d.group(1) or d.group(2)):
                hidden.setdefault(v, []).append(span)
        for m in _WORD.finditer(code, st.start, st.end):
            var, p = m.group(1), m.start()
            if p < head_end or var in KEYWORDS:
                continue
            accs, q = _accessors(mod, m.end(), st.end)
            if code[q:st.end].lstrip().startswith("("):
                continue  # a call (lib.f(...)): its arguments are scanned on their own
            shadowed = any(lo <= p < hi for lo, hi in hidden.get(var, ()))
            roots = self.roots(mod, var, local, accs) if var in local or not shadowed else []
            if not roots:
                continue
            if not accs and (_BINDER.search(code, st.start, p) or _ASSIGNED.match(code, m.end())):
                continue  # where the variable is bound, not a read
            text = _shorten(mod.src[p:q])
            for kinds, rest in roots:
                for kind in kinds:
                    if kind.startswith("key:"):  # a key of a walk: it reads nothing, unless it is looked at
                        self.key_uses.add((name, index, var, kind, p, text))
                        continue
                    left = self.walk(mod, (name, index), p, text, kind, rest)
                    if left is not None:
                        self.context(mod, index, p, q, text, left)

    def implicit_keys(self, mod: _Module, st: Statement, body: str) -> set[str]:
        """Names in brackets that nothing declares or binds: Rego iterates over them, as over a key
        of ``some k`` (``[k | input.request[k]]``, ``x := input.request[k]``)."""
        found = {m.group(1) for m in _BRACKET_NAME.finditer(body)} - KEYWORDS - {"_", "input", "data"}
        if not found:
            return set()
        declared = {v for d in _DECLARES.finditer(body) for v in re.findall(NAME, d.group(1) or d.group(2))}
        params = {param for param, _ in st.params or ()}
        rules = {other.name for other in mod.stmts}  # a rule of the package: a value, not an iteration
        globals_ = self.globals.get(mod.package, {})
        return {v for v in found - declared - params - rules
                if v not in mod.imports and v not in globals_ and not _assigned(v, body)}

    def roots(self, mod: _Module, var: str, local: Mapping[str, set[str]],
              accs: list[_Acc]) -> list[tuple[set[str], list[_Acc]]]:
        """What ``var`` (followed by ``accs``) may be: input objects, and the steps left after resolving it."""
        if var in local:
            return [(local[var], accs)]
        if var == "input":
            return [({"input"}, accs)]
        target = mod.imports.get(var)
        if target is not None and target.split(".")[0] == "input":
            return [({"input"}, [_Acc(k, "." + k) for k in target.split(".")[1:]] + accs)]
        if target is None and var in self.globals.get(mod.package, {}):
            return [(self.globals[mod.package][var], accs)]
        if var != "data" and target is None:
            return []
        prefix = [] if var == "data" else target.split(".")[1:] if target else []
        keys = prefix + _leading_keys(accs)
        for j in range(len(keys)):
            package, rule = ".".join(keys[:j]), keys[j]
            found = self.globals.get(package, {}).get(rule)
            if found and j + 1 >= len(prefix):
                return [(found, accs[j - len(prefix) + 1:])]
        return []

    def walk(self, mod: _Module, where: tuple[str, int], pos: int, text: str, kind: str,
             accs: list[_Acc]) -> str | None:
        """Follow ``accs`` from an object of ``kind`` (read in statement ``where``): reports what is wrong; the
        kind it ends on, None for a value."""
        for acc in accs:
            if kind == "state":
                break
            if kind in ("input", "candidate"):
                keys: Mapping[str, str | None] = _INPUT_KEYS if kind == "input" else _CANDIDATE_KEYS
                if acc.key is None:
                    self.issue(mod, pos, _dynamic(text, _WHAT[kind], None))
                    return None
                if acc.key not in keys:
                    self.issue(mod, pos, f"{text}: {_WHAT[kind]} has no key {acc.key!r}, only "
                                         f"{', '.join(keys)} (what is not there is undefined, and a deny "
                                         "condition on it lets every candidate through)")
                    return None
                nxt = keys[acc.key]
                if nxt is None:
                    return None
                kind = nxt
            elif kind == "candidates":
                if acc.key is not None and not acc.raw.startswith("["):
                    self.issue(mod, pos, f"{text}: input.candidates is a list: walk it (some c in "
                                         "input.candidates) or index it")
                    return None
                kind = "candidate"
            else:
                if acc.key is not None:
                    self.issue(mod, pos, self.decl.field_problem(kind, acc.key, text))
                else:
                    self.index(mod, where, pos, text, kind, acc)
                return None
        if kind == "state":
            self.issue(mod, pos, self.decl.state_problem(text))
            return None
        return kind

    def index(self, mod: _Module, where: tuple[str, int], pos: int, text: str, kind: str, acc: _Acc) -> None:
        """A bracket whose key is not written out, on an object of ``kind``: a walk's key reading its object
        back, a walk of its own (``[_]``, a key declared by ``some k``), or a read that cannot be checked."""
        var = acc.raw[1:-1].strip()
        kinds = self.local.get(where, {}).get(var, set())
        if "key:" + kind in kinds:  # the walk that gave the key was checked where it walks
            self.read_back.add((mod.name, acc.key_at()))
        elif var == "_" or "key:*" in kinds:
            if kind in _RECORDS:
                self.issue(mod, pos, self.decl.enumeration_problem(kind, text, "walks"))
            elif var != "_":
                self.read_back.add((mod.name, acc.key_at()))
                self.walked_by.setdefault((*where, var), set()).add(kind)
        else:
            base = text[:len(text) - len(acc.raw)] if text.endswith(acc.raw) else "..."
            walk = f"some k, v in {base}" if self.decl.may_walk(kind) else None
            self.issue(mod, pos, _dynamic(text, _WHAT[kind], walk))

    def context(self, mod: _Module, index: int, p: int, q: int, text: str, kind: str) -> None:
        """An input object used whole at ``code[p:q]``: where it goes."""
        code, st = mod.code, mod.stmts[index]
        before, after = code[st.start:p], code[q:st.end]
        if re.search(r"\bwith\s+$", before):
            return  # the target of a with: replaced, not read
        walk = _WALK.search(before)
        if walk:
            key, value = (walk.group(1), walk.group(2)) if walk.group(2) else (None, walk.group(1))
            if kind == "candidates":
                self.bind((mod.name, index), value, "candidate")
            elif kind in _SECTIONS:
                if kind in _RECORDS:
                    at = st.start + walk.start()
                    self.issue(mod, at, self.decl.enumeration_problem(kind, _shorten(mod.src[at:q]), "walks"))
                if key:
                    self.bind((mod.name, index), key, "key:" + kind)
            else:
                self.issue(mod, p, _dynamic(text, _WHAT[kind], None))
            return
        if re.search(r"\bin\s+$", before):
            if kind != "candidates":
                self.issue(mod, p, _whole(text, _WHAT[kind], "a membership test"))
            return
        alias = _ALIAS.search(before)
        if alias and _ALIAS_END.match(after):
            if not before[:alias.start(1)].strip():  # the whole statement: a rule of the package
                self.bind_global(mod.package, alias.group(1), kind)
            else:
                self.bind((mod.name, index), alias.group(1), kind)
            return
        call = _argument_of(code, st.start, p, q)
        if call is None:
            self.issue(mod, p, _whole(text, _WHAT[kind], "in an expression"))
            return
        callee, n, args = call
        defs = self.functions(mod, callee)
        if defs:
            for where, params in defs:
                if n < len(params):
                    param, at = params[n]
                    if re.fullmatch(NAME, param):
                        self.bind(where, param, kind)
                    else:
                        self.issue(self.mods[where[0]], at, _whole(param, _WHAT[kind], f"matched by a pattern "
                                                                   f"parameter of {callee}"))
            return
        if not self.is_builtin(callee):
            return  # a function that does not exist is refused on its own (rego_calls.undefined_calls)
        if callee == "count" or (callee == "object.keys" and kind in _SECTIONS):
            # Counting a list, or a metric map's entries alike, looks at no key; otherwise both enumerate keys.
            if not (callee == "count" and kind in ("candidates", *_METRICS)):
                how = "counts the keys of" if callee == "count" else "takes the keys of"
                self.issue(mod, p, self.decl.enumeration_problem(kind, f"{callee}({text})", how))
            return
        if callee == "object.get" and n == 0 and len(args) > 1:
            key_text = mod.src[args[1][0]:args[1][1]]
            keys = _literal_keys(key_text)
            if keys is None:
                hint = f"some k, v in {text}" if self.decl.may_walk(kind) else None
                self.issue(mod, p, _dynamic(f"object.get({text}, {_shorten(key_text)}, ...)", _WHAT[kind], hint))
            else:
                text = f"object.get({text}, {_shorten(key_text)}, ...)"
                left = self.walk(mod, (mod.name, index), p, text, kind, [_Acc(k, f'["{k}"]') for k in keys])
                if left is not None:
                    self.issue(mod, p, _whole(text, _WHAT[left], "the result of object.get"))
            return
        self.issue(mod, p, _whole(text, _WHAT[kind], f"passed to {callee}"))

    def functions(self, mod: _Module, callee: str) -> list[tuple[tuple[str, int], tuple[tuple[str, int], ...]]]:
        """The definitions (statement, parameters) of the bundle function ``callee`` names in ``mod``."""
        parts = callee.split(".")
        if len(parts) == 1:
            package = mod.package
        elif parts[0] == "data":
            package = ".".join(parts[1:-1])
        elif mod.imports.get(parts[0], "").startswith("data."):
            package = ".".join([*mod.imports[parts[0]].split(".")[1:], *parts[1:-1]])
        else:
            return []
        return [((other.name, i), st.params) for other in self.mods.values() if other.package == package
                for i, st in enumerate(other.stmts) if st.name == parts[-1] and st.params is not None]


def _scope(code: str, start: int, end: int, at: int, every: bool = False) -> tuple[int, int]:
    """The span a name declared at ``at`` is visible in: the innermost brackets around it (an ``every``'s
    own braces after its domain), else the statement ``code[start:end]``."""
    if every:
        depth = 0
        for i in range(at, end):
            if code[i] in "([" or (code[i] == "{" and depth):
                depth += 1
            elif code[i] in ")]}" and depth:
                depth -= 1
            elif code[i] == "{":
                return i, bracket_end(code, i)
            elif code[i] in ")]}":
                break
    depth = 0
    for i in range(at - 1, start - 1, -1):
        if code[i] in ")]}":
            depth += 1
        elif code[i] in "([{" and depth:
            depth -= 1
        elif code[i] in "([{":
            return i, bracket_end(code, i)
    return start, end


def _accessors(mod: _Module, at: int, end: int) -> tuple[list[_Acc], int]:
    """The ``.name`` and ``[...]`` steps of a reference from ``at``, and where they end."""
    out: list[_Acc] = []
    code = mod.code
    while at < end:
        dot = _DOT.match(code, at, end)
        if dot:
            out.append(_Acc(dot.group(1), "." + dot.group(1), at))
            at = dot.end()
        elif code.startswith("[", at):
            close = bracket_end(code, at)
            raw = mod.src[at:close]
            literal = _STRING.fullmatch(raw, 1, len(raw) - 1)
            out.append(_Acc(_string(literal.group(1)) if literal else None, raw, at))
            at = close
        else:
            break
    return out, at


def _string(literal: str) -> str:
    """A Rego string literal's value (interpreted with JSON's escapes, or raw between backquotes)."""
    if literal.startswith("`"):
        return literal[1:-1]
    value = json.loads(literal)
    return value if isinstance(value, str) else literal


def _literal_keys(text: str) -> list[str] | None:
    """``"k"`` -> [k]; ``["a", "b"]`` -> [a, b] (an object.get path); None when not written out."""
    single = _STRING.fullmatch(text)
    if single:
        return [_string(single.group(1))]
    many = _ARRAY_OF_STRINGS.fullmatch(text)
    if many:
        return [_string(s) for s in re.findall(r'"(?:\\.|[^"\\])*"', many.group(1))]
    return None


def _leading_keys(accs: list[_Acc]) -> list[str]:
    """The keys of the steps up to the first that is not written out (``data.lib.x[k]`` -> lib, x)."""
    out: list[str] = []
    for a in accs:
        if a.key is None:
            break
        out.append(a.key)
    return out


def _argument_of(code: str, start: int, p: int, q: int) -> tuple[str, int, list[tuple[int, int]]] | None:
    """(function, argument index, arguments) when ``code[p:q]`` is exactly one argument of a call."""
    if not re.match(r"\s*[,)]", code[q:]) or not code[start:p].rstrip().endswith((",", "(")):
        return None
    depth, commas = 0, 0
    for i in range(p - 1, start - 1, -1):
        c = code[i]
        if c in ")]}":
            depth += 1
        elif c in "([{" and depth:
            depth -= 1
        elif c in "([{":
            callee = _CALLEE.search(code, start, i) if c == "(" else None
            if callee is None or callee.group(1) in KEYWORDS:
                return None  # a list, a set, parentheses that only group
            return callee.group(1), commas, argument_spans(code, i)
        elif c == "," and not depth:
            commas += 1
    return None


def _shorten(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def undeclared_rego_reads(modules: Mapping[str, tuple[str, str]], rule_module: str, rule: RuleSpec,
                          is_builtin: Callable[[str], bool] = lambda name: True) -> list[PolicyIssue]:
    """Reads the Rego rule in ``rule_module`` makes of inputs its manifest entry does not declare.

    Parameters
    ----------
    modules : mapping
        The bundle's Rego modules, name -> (path to report, source), as ``policies.bundle.rego_modules``
        gives them (test modules are skipped: rules never load them).
    rule_module : str
        The name of the rule's module in ``modules``.
    rule : RuleSpec
        The rule's manifest entry.
    is_builtin : callable, optional
        Whether a name is a rego-cpp built-in (``rego_engine.builtin_checker()``): an input object passed
        to a function that is neither a built-in nor the bundle's is left to ``undefined_calls``.

    Returns
    -------
    list of PolicyIssue
        One per offending read, at the read (which may be in a function the rule's module calls).

    Examples
    --------
    >>> src = '''package demo
    ... import rego.v1
    ... too_big(req) if req.estimated_input_tokens > 1000  # "input.request.x" here is not a read
    ... allow contains c.id if { some c in input.candidates; not too_big(input.request) }
    ... '''
    >>> spec = RuleSpec(id="demo.size", kind="other", engine="rego", file="d.rego", request_fields=["tenant"])
    >>> issues = undeclared_rego_reads({"d.rego": ("b/d.rego", src)}, "d.rego", spec)
    >>> print(*issues)  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    b/d.rego:3:17: req.estimated_input_tokens: rule demo.size reads request.estimated_input_tokens but does
    not declare it, ...; add estimated_input_tokens to the rule's request_fields in manifest.yaml
    """
    return _RegoReads(modules, Declared.of(rule), is_builtin).run(rule_module)


# -- CEL ----------------------------------------------------------------------------------------------

_MACRO = re.compile(r"\.\s*([A-Za-z_]\w*)\s*$")
_CEL_ROOTS = {"request": "request", "endpoint": "endpoint", "telemetry": "telemetry", "age_s": "age_s",
              "state": "state"}


class _CelReads:
    """The reads a CEL expression makes of its variables, from its checked syntax tree.

    A macro's key variable is bound to ``key:<object>@<macro id>``; ``looked`` holds the macros whose key
    was used other than to read its own object back. ``verdict`` is False for a message, which decides
    nothing: it may name the metrics it walks.
    """

    def __init__(self, source: str, path: str, decl: Declared, positions: Mapping[int, int], verdict: bool) -> None:
        self.source, self.path, self.decl, self.positions, self.verdict = source, path, decl, positions, verdict
        self.issues: list[PolicyIssue] = []
        self.looked: set[int] = set()

    def issue(self, node: Any, message: str | None) -> None:
        if message is not None:
            line, col = line_col(self.source, self.positions.get(node.id, 0))
            self.issues.append(PolicyIssue(self.path, line, col, message))

    def visit(self, e: Any, env: Mapping[str, str | None]) -> str | None:
        """Report what ``e`` reads wrongly; the input object it is (or ``keys:<object>``), None for a value."""
        which = e.WhichOneof("expr_kind")
        if which == "ident_expr":
            name = e.ident_expr.name
            if name in env:
                walked = _walk_key(env[name])
                if walked is not None:
                    self.looked.add(walked[1])  # the key itself, not the read of its object (see key())
                return env[name]
            kind = _CEL_ROOTS.get(name)
            if kind == "state":
                self.issue(e, self.decl.state_problem(name))
                return None
            return kind
        if which == "select_expr":
            kind = self.visit(e.select_expr.operand, env)
            if kind in _SECTIONS:
                self.issue(e.select_expr.operand,
                           self.decl.field_problem(kind, e.select_expr.field, f"{kind}.{e.select_expr.field}"))
            return None
        if which == "call_expr":
            return self.call(e, env)
        if which == "comprehension_expr":
            return self.comprehension(e, env)
        if which == "list_expr":
            self.values(e.list_expr.elements, env, "in a list")
        elif which == "struct_expr":
            for entry in e.struct_expr.entries:
                self.values([entry.map_key] if entry.HasField("map_key") else [], env, "as a map key")
                self.values([entry.value], env, "in a map")
        return None

    def values(self, nodes: Iterable[Any], env: Mapping[str, str | None], how: str) -> None:
        """Visit operands that must not be input objects as a whole."""
        for node in nodes:
            kind = self.visit(node, env)
            if kind in _SECTIONS:
                self.issue(node, _whole(kind, kind, how))

    def key(self, kind: str | None, key: Any, at: Any, env: Mapping[str, str | None]) -> None:
        """An index or membership test of ``kind`` by the expression ``key``."""
        if kind not in _SECTIONS:
            self.visit(key, env)
            return
        if key.WhichOneof("expr_kind") == "const_expr" and key.const_expr.WhichOneof("constant_kind") == "string_value":
            name = key.const_expr.string_value
            self.issue(at, self.decl.field_problem(kind, name, f"{kind}[{json.dumps(name)}]"))
        elif not _reads_back(key, kind, env):
            self.issue(at, _dynamic(kind + "[...]", kind, f"{kind}.all(k, ...)" if self.decl.may_walk(kind) else None))
            self.visit(key, env)

    def call(self, e: Any, env: Mapping[str, str | None]) -> str | None:
        c = e.call_expr
        args = list(c.args)
        if c.function in ("_[_]", "_[?_]") and len(args) == 2:
            self.key(self.visit(args[0], env), args[1], args[0], env)
        elif c.function == "@in" and len(args) == 2:  # "gpu_temp_c" in telemetry: located at the key
            self.key(self.visit(args[1], env), args[0], args[0], env)
        elif c.function == "_?._" and len(args) == 2:  # request.?field
            self.key(self.visit(args[0], env), args[1], args[0], env)
        elif c.function == "size":  # of a metric map, it looks at no key; of a record, it enumerates them
            for node in [c.target] * c.HasField("target") + args:
                kind = self.visit(node, env)
                if kind in _RECORDS:
                    self.issue(node, self.decl.enumeration_problem(kind, f"size({kind})", "counts the fields of"))
        else:
            how = "with an operator" if c.function.startswith(("_", "@", "!")) else f"passed to {c.function}"
            self.values([c.target] * c.HasField("target") + args, env, how)
        return None

    def comprehension(self, e: Any, env: Mapping[str, str | None]) -> str | None:
        c = e.comprehension_expr
        over = self.visit(c.iter_range, env)
        inner = dict(env)
        keys_of = over if over in _SECTIONS else over[5:] if over and over.startswith("keys:") else None
        inner[c.iter_var] = f"key:{keys_of}@{e.id}" if keys_of else None  # a macro walks the keys it is given
        walked = over if over in _SECTIONS else f"{keys_of}.filter(...)"  # keys lists come from filter
        text = f"{walked}.{self.macro(e)}({c.iter_var}, ...)"
        if over in _RECORDS:  # (a list of a record's keys was refused where it was made)
            self.issue(c.iter_range, self.decl.enumeration_problem(over, text, "walks"))
        if c.iter_var2:
            inner[c.iter_var2] = None
        init = self.visit(c.accu_init, env)
        inner[c.accu_var] = init if init in _SECTIONS else None  # cel.bind(r, request, r.tenant)
        self.visit(c.loop_condition, inner)
        self.visit(c.loop_step, inner)
        result = self.visit(c.result, inner)
        if keys_of in _METRICS and e.id in self.looked and self.verdict:
            self.issue(c.iter_range, self.decl.key_problem(keys_of, text, f"{keys_of}.all(m, {keys_of}[m] <= 30)"))
        if keys_of and _is_filter(c):
            return "keys:" + keys_of  # age_s.filter(m, ...) is a list of age_s's keys
        return result


    def macro(self, e: Any) -> str:
        """The name of the macro a comprehension was written as (``all``, ``filter``...): the word before
        the parenthesis the engine locates it at."""
        name = _MACRO.search(self.source, 0, self.positions.get(e.id, 0))
        return name.group(1) if name else "<macro>"


def _walk_key(value: str | None) -> tuple[str, int] | None:
    """(object, macro id) when ``value`` is a macro's key variable, ``key:<object>@<macro id>``."""
    if value is None or not value.startswith("key:"):
        return None
    kind, _, macro = value[4:].partition("@")
    return kind, int(macro)


def _reads_back(key: Any, kind: str, env: Mapping[str, str | None]) -> bool:
    """Whether ``key`` is the key variable of a macro over ``kind`` itself: ``age_s[m]`` in ``age_s.all(m, ...)``."""
    walked = _walk_key(env.get(key.ident_expr.name)) if key.WhichOneof("expr_kind") == "ident_expr" else None
    return walked is not None and walked[0] == kind


def _is_filter(c: Any) -> bool:
    """Whether a comprehension is the filter macro: the step keeps the element, ``cond ? acc + [x] : acc``."""
    step = c.loop_step.call_expr
    if step.function != "_?_:_" or len(step.args) != 3:
        return False
    keep = step.args[1].call_expr
    return (keep.function == "_+_" and len(keep.args) == 2 and keep.args[0].ident_expr.name == c.accu_var
            and [x.ident_expr.name for x in keep.args[1].list_expr.elements] == [c.iter_var])


def undeclared_cel_reads(expr: Any, source: str, path: str, rule: RuleSpec) -> list[PolicyIssue]:
    """Reads a compiled CEL expression (the rule's, or its message's) makes of inputs ``rule`` does not declare.

    Parameters
    ----------
    expr : cel_expr_python expression
        As ``policies.cel_engine.compile_cel`` compiled it (``CelProgram.expr`` or ``.message``).
    source : str
        Its text, to turn the engine's offsets into lines and columns.
    path : str
        Where to say the issues are.
    rule : RuleSpec
        The rule's manifest entry.

    Examples
    --------
    >>> from policies.cel_engine import compile_cel
    >>> spec = RuleSpec(id="safety.owner", kind="safety", engine="cel", file="o.cel", request_fields=["user_tier"])
    >>> src = '// not request.model\\nendpoint.owner_tenant == request.tenant'
    >>> issues = undeclared_cel_reads(compile_cel(src, "o.cel").expr, src, "o.cel", spec)
    >>> print(*issues)  # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
    o.cel:2:26: request.tenant: rule safety.owner reads request.tenant but does not declare it, ...;
    add tenant to the rule's request_fields in manifest.yaml
    """
    wrapped = any_pb2.Any()
    wrapped.ParseFromString(expr.serialize())
    checked = _checked.CheckedExpr()
    wrapped.Unpack(checked)
    verdict = checked.type_map[checked.expr.id].primitive != _checked.Type.STRING  # a message is a string
    reads = _CelReads(source, path, Declared.of(rule), checked.source_info.positions, verdict)
    top = reads.visit(checked.expr, {})
    if top in _SECTIONS:
        reads.issue(checked.expr, _whole(top, top, "as the result"))
    return sorted(set(reads.issues), key=lambda i: (i.line, i.column, i.message))
