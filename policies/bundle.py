"""Compiling a bundle folder into rules ready to evaluate, collecting every error on the way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policies.cel_engine import CelCompileError, CelProgram, compile_cel
from policies.errors import BundleError, PolicyIssue
from policies.manifest import ManifestSpec, RuleSpec, bundle_revision, load_manifest
from policies.rego_calls import undefined_calls
from policies.rego_engine import RegoCompileError, RegoProgram, builtin_checker, compile_rego, new_interpreter

DEFAULT_BUNDLE = Path(__file__).resolve().parent / "bundles" / "default"


@dataclass(frozen=True)
class CompiledRule:
    spec: RuleSpec
    program: CelProgram | RegoProgram
    path: str


@dataclass(frozen=True)
class CompiledBundle:
    """A bundle that compiled: its manifest, revision and rules, in manifest order."""

    directory: Path
    revision: str
    spec: ManifestSpec
    rules: tuple[CompiledRule, ...]

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.spec.params)


def rego_modules(directory: Path, *, tests: bool) -> dict[str, tuple[str, str]]:
    """Module name (bundle-relative path) -> (path to report, source) of the bundle's Rego files."""
    out: dict[str, tuple[str, str]] = {}
    for p in sorted(directory.rglob("*.rego")):
        if p.name.endswith("_test.rego") and not tests:
            continue
        out[p.relative_to(directory).as_posix()] = (str(p), p.read_text(encoding="utf-8"))
    return out


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
    spec, _ = load_manifest(root)
    issues: list[PolicyIssue] = []
    modules = rego_modules(root, tests=False)
    rules: list[CompiledRule] = []
    for rule in spec.rules:
        path = root / rule.file
        try:
            if rule.engine == "cel":
                program: CelProgram | RegoProgram = compile_cel(
                    path.read_text(encoding="utf-8"), str(path), message=rule.message,
                    message_path=f"{root / 'manifest.yaml'} (rule {rule.id} message)")
            else:
                name = Path(rule.file).as_posix()
                if name not in modules:
                    issues.append(PolicyIssue(str(path), 1, 1, "a Rego rule file must end in .rego "
                                                               "and not in _test.rego"))
                    continue
                program = compile_rego(modules, name, spec.params)
        except (CelCompileError, RegoCompileError) as exc:
            issues.extend(exc.issues)
            continue
        rules.append(CompiledRule(rule, program, str(path)))
    # Test modules must parse too: a bundle whose tests cannot even load is broken.
    test_modules = rego_modules(root, tests=True)
    if len(test_modules) > len(modules) and not any("rego" in str(i.path) for i in issues):
        try:
            new_interpreter(test_modules, spec.params)
        except RegoCompileError as exc:
            issues.extend(exc.issues)
    if not any(str(i.path).endswith(".rego") for i in issues):  # what compiles may still call what is not there
        issues.extend(undefined_calls(test_modules, builtin_checker()))
    if issues:
        raise BundleError(sorted(set(issues), key=lambda i: (i.path, i.line, i.column)))
    return CompiledBundle(root, revision, spec, tuple(rules))
