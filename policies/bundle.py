"""Compiling a bundle folder into rules ready to evaluate, collecting every error on the way."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from policies.cel_engine import CelCompileError, CelProgram, compile_cel
from policies.declared import undeclared_cel_reads, undeclared_rego_reads
from policies.errors import BundleError, PolicyIssue, read_source
from policies.manifest import MANIFEST, ManifestSpec, RuleSpec, bundle_files, bundle_revision, load_manifest
from policies.rego_calls import undefined_calls, volatile_calls
from policies.rego_engine import (
    RegoCompileError,
    RegoProgram,
    builtin_checker,
    compile_rego,
    is_test_module,
    new_interpreter,
)

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "bundles" / "default"


@dataclass(frozen=True)
class CompiledRule:
    spec: RuleSpec
    program: CelProgram | RegoProgram
    path: str


@dataclass(frozen=True)
class CompiledBundle:
    """A bundle that compiled: its manifest, revision and rules, in manifest order, and its Rego
    modules (test modules too) as :func:`rego_modules` read them."""

    directory: Path
    revision: str
    spec: ManifestSpec
    rules: tuple[CompiledRule, ...]
    modules: Mapping[str, tuple[str, str]]

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.spec.params)


def rego_modules(directory: Path) -> dict[str, tuple[str, str]]:
    """Module name (bundle-relative path) -> (path to report, source) of the bundle's Rego files,
    test modules included."""
    out: dict[str, tuple[str, str]] = {}
    issues: list[PolicyIssue] = []
    for p in bundle_files(directory):  # the files the revision hashes: a hidden module must not run unnamed
        if p.suffix != ".rego":
            continue
        try:
            out[p.relative_to(directory).as_posix()] = (str(p), read_source(p))
        except BundleError as exc:
            issues.extend(exc.issues)
    if issues:
        raise BundleError(issues)
    return out


_MESSAGE = "\0message"  # where compile_cel reports a message expression's issues (no file has this name)


def compile_bundle(directory: str | Path) -> CompiledBundle:
    """Compile every rule (and parse every Rego test module); raises :class:`BundleError`.

    Examples
    --------
    >>> b = compile_bundle(DEFAULT_BUNDLE)
    >>> b.revision.startswith("pol-"), sorted({r.spec.engine for r in b.rules})
    (True, ['cel', 'rego'])
    """
    root = Path(directory)
    revision = bundle_revision(root) if root.is_dir() else ""
    spec, doc = load_manifest(root)
    issues: list[PolicyIssue] = []
    try:
        test_modules = rego_modules(root)
    except BundleError as exc:  # unreadable modules: reported with whatever else is wrong
        issues.extend(exc.issues)
        test_modules = {}
    modules = {k: v for k, v in test_modules.items() if not is_test_module(k)}
    rules: list[CompiledRule] = []
    reads: list[PolicyIssue] = []  # not compile errors: kept apart, the scans below still run
    is_builtin = builtin_checker()
    for n, rule in enumerate(spec.rules):
        path = root / rule.file

        def in_manifest(i: PolicyIssue, n: int = n, rule: RuleSpec = rule) -> PolicyIssue:
            # A message expression's problems are at its key in the manifest (the column is the expression's).
            if i.path != _MESSAGE:
                return i
            return PolicyIssue(str(root / MANIFEST), *doc.position_of(("rules", n, "message")),
                               f"rules[{n}](id={rule.id}).message: column {i.column} of the expression: {i.message}")

        try:
            if rule.engine == "cel":
                source = read_source(path)
                cel = compile_cel(source, str(path), message=rule.message, message_path=_MESSAGE)
                # A rule is given only what it declares: reading anything else fails closed here (an error
                # denies), but it is a mistake all the same, refused now rather than found in production.
                reads.extend(undeclared_cel_reads(cel.expr, source, str(path), rule))
                if cel.message is not None:
                    reads.extend(map(in_manifest, undeclared_cel_reads(cel.message, rule.message, _MESSAGE, rule)))
                program: CelProgram | RegoProgram = cel
            else:
                name = posixpath.normpath(Path(rule.file).as_posix())  # "./x/../y.rego" is module "y.rego"
                if name not in modules:
                    if any(i.path == str(path) for i in issues):
                        continue  # already reported (unreadable)
                    issues.append(PolicyIssue(str(path), 1, 1, "a Rego rule file must end in .rego, not in "
                                                               "_test.rego, and not sit in a hidden folder"))
                    continue
                program = compile_rego(modules, name, spec.params)
                # In Rego an undeclared read is undefined and a deny condition on it allows: fail open.
                reads.extend(undeclared_rego_reads(modules, name, rule, is_builtin))
                if rule.scope == "candidate" and not rule.per_request:  # verdicts memoised: kept, not redone
                    issues.extend(replace(i, message=f"{i.message}, but the verdicts of rule {rule.id} are "
                                                     "memoised (kept while what it declared it reads is "
                                                     "unchanged): set memoise: false on it")
                                  for i in volatile_calls(modules, name))
        except (CelCompileError, RegoCompileError, BundleError) as exc:
            issues.extend(map(in_manifest, exc.issues))
            continue
        rules.append(CompiledRule(rule, program, str(path)))
    # Test modules must parse too: a bundle whose tests cannot even load is broken.
    if len(test_modules) > len(modules) and not any(str(i.path).endswith(".rego") for i in issues):
        try:
            new_interpreter(test_modules, spec.params)
        except RegoCompileError as exc:
            issues.extend(exc.issues)
    if not any(str(i.path).endswith(".rego") for i in issues):  # what compiles may still call what is not there
        issues.extend(undefined_calls(test_modules, is_builtin))
    issues.extend(reads)
    if issues:
        raise BundleError(sorted(set(issues), key=lambda i: (i.path, i.line, i.column)))
    return CompiledBundle(root, revision, spec, tuple(rules), test_modules)
