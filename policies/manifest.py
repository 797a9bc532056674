"""The bundle manifest: which rules a bundle holds, and how each one is evaluated.

A bundle is a folder with a ``manifest.yaml``, the rule files it names (``.cel`` expressions,
``.rego`` modules) and their tests (``*_test.rego``, CEL case tables in YAML). Every rule
declares what it reads, so the guard can give it exactly that and memoise what is static.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from decision.telemetry import CANONICAL
from decision.yaml_lines import LocatedYaml, YamlSyntaxError, field_path, load_located_file
from policies.errors import BundleError, PolicyIssue

MANIFEST = "manifest.yaml"

# Request fields a rule may declare (RequestContext.as_dict keys).
REQUEST_FIELDS: frozenset[str] = frozenset({
    "request_id", "tenant", "user_tier", "model", "model_family", "modality", "prompt_class",
    "estimated_input_tokens", "expected_output_tokens", "allowed_jurisdictions", "data_class",
    "client_region", "session_id", "ttft_target_ms", "max_cost_per_1k_tokens", "labels",
})

# Endpoint facts a rule may declare (policies.inputs.endpoint_view keys).
ENDPOINT_FIELDS: frozenset[str] = frozenset({
    "id", "model", "family", "modality", "safety_tier", "runtime", "node_id", "gpu_type", "site_id",
    "region", "jurisdiction", "tier", "certifications", "owner_tenant", "warm",
})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RuleSpec(_Strict):
    """One rule of the manifest.

    ``scope: candidate`` rules give one verdict per candidate; ``scope: request`` rules one per
    request (quota). A candidate rule that reads neither telemetry nor state depends only on
    the static inventory and its ``request_fields``, so its verdicts are memoised.
    """

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    kind: Literal["residency", "quota", "safety", "other"]
    engine: Literal["cel", "rego"]
    file: str = Field(min_length=1)
    severity: Literal["deny", "warn"] = "deny"
    scope: Literal["candidate", "request"] = "candidate"
    description: str = ""
    request_fields: list[str] = []
    endpoint_fields: list[str] | None = Field(
        default=None, description="endpoint facts the rule reads (default: all); verdicts are shared "
                                  "by endpoints that agree on them")
    telemetry: list[str] = Field(default=[], description="metrics whose values the rule reads")
    ages: list[str] = Field(default=[], description="metrics whose ages (whole seconds, rounded up) it reads")
    state: bool = Field(default=False, description="reads pre-fetched state (quota counters)")
    message: str = Field(default="", description="CEL only: a string expression giving the denial reason")
    tests: list[str] = Field(default=[], description="test files: *_test.rego or CEL case tables")
    memoise: bool = Field(
        default=True, description="false for a Rego rule whose verdict on one candidate depends on the other "
                                  "candidates: it then sees all of a request's candidates in one input, every "
                                  "decision. Memoised rules see only the distinct inputs that missed the memo")

    @field_validator("request_fields")
    @classmethod
    def _known_fields(cls, v: list[str]) -> list[str]:
        unknown = sorted(set(v) - REQUEST_FIELDS)
        if unknown:
            raise ValueError(f"unknown request fields {unknown}; known: {', '.join(sorted(REQUEST_FIELDS))}")
        return v

    @field_validator("telemetry", "ages")
    @classmethod
    def _metric_names(cls, v: list[str]) -> list[str]:
        # The store keeps canonical names only (exporter names are mapped on the way in): any other
        # name would never have a value, and a rule where unknown means allowed would allow everything.
        unknown = [m for m in v if m not in CANONICAL]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; the telemetry a rule can read is named "
                             f"{', '.join(CANONICAL)}")
        return v

    @field_validator("endpoint_fields")
    @classmethod
    def _known_endpoint_fields(cls, v: list[str] | None) -> list[str] | None:
        unknown = sorted(set(v or ()) - ENDPOINT_FIELDS)
        if unknown:
            raise ValueError(f"unknown endpoint fields {unknown}; known: {', '.join(sorted(ENDPOINT_FIELDS))}")
        return v

    @property
    def memoisable(self) -> bool:
        """Static: depends only on inventory and declared request fields."""
        return (self.scope == "candidate" and self.memoise and not self.state and not self.telemetry
                and not self.ages)

    @property
    def per_request(self) -> bool:
        """Evaluated on every decision over all the request's candidates (no memo)."""
        return self.scope == "candidate" and (self.state or not self.memoise)


class ManifestSpec(_Strict):
    version: Literal[1] = 1
    name: str = "policies"
    params: dict[str, Any] = {}
    rules: list[RuleSpec] = Field(min_length=1)


def ignored_part(name: str) -> bool:
    """Whether a file or folder name is not part of a bundle: hidden ones and Python caches.

    A Kubernetes ConfigMap mount keeps its real files under hidden ``..<timestamp>/`` folders behind
    a ``..data`` link; the visible names link into them. Loading, hashing and snapshotting all use
    this one test, so what is compiled is exactly what the revision names.
    """
    return name.startswith(".") or name == "__pycache__"


def bundle_files(directory: Path) -> list[Path]:
    """Every file that makes up a bundle (what its revision hashes), in a stable order."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and not any(ignored_part(part) for part in p.relative_to(directory).parts))


def bundle_revision(directory: str | Path) -> str:
    """Content hash of every file in the bundle: the same bytes give the same revision.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "manifest.yaml").write_text("rules: []")
    >>> bundle_revision(d) == bundle_revision(d), bundle_revision(d).startswith("pol-")
    (True, True)
    """
    root = Path(directory)
    h = hashlib.sha256()
    for p in bundle_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return "pol-" + h.hexdigest()[:12]


def _inside(directory: str | Path, name: str) -> bool:
    root = Path(directory).resolve()
    return (root / name).resolve().is_relative_to(root)


def load_manifest(directory: str | Path) -> tuple[ManifestSpec, LocatedYaml]:
    """Parse and validate ``manifest.yaml``; raises :class:`BundleError` naming file:line:col."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise BundleError([PolicyIssue(str(path), 1, 1, "no manifest.yaml in the bundle")])
    try:
        doc = load_located_file(path)
    except YamlSyntaxError as exc:
        raise BundleError([PolicyIssue(exc.path, exc.line, exc.column, exc.message)]) from None
    if not isinstance(doc.data, dict):
        raise BundleError([PolicyIssue(str(path), 1, 1, "expected a mapping at the top level")])
    try:
        spec = ManifestSpec.model_validate(doc.data)
    except ValidationError as exc:
        raise BundleError([PolicyIssue(str(path), *doc.position_of(e["loc"]),
                                       f"{field_path(tuple(e['loc']), doc.data)}: {e['msg']}")
                           for e in exc.errors()]) from None
    issues: list[PolicyIssue] = []
    seen: set[str] = set()
    for i, rule in enumerate(spec.rules):
        def issue(field: str, msg: str, i: int = i) -> None:
            issues.append(PolicyIssue(str(path), *doc.position_of(("rules", i, field)),
                                      f"rules[{i}](id={spec.rules[i].id}).{field}: {msg}"))
        if rule.id in seen:
            issue("id", f"duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        for field, name in [("file", rule.file), *(("tests", t) for t in rule.tests)]:
            try:  # a NUL, or a name too long for the file system, raises rather than answers
                inside = _inside(directory, name)
                found = inside and (Path(directory) / name).is_file()
            except (OSError, ValueError) as exc:
                issue(field, f"{name[:60]!r}{'...' if len(name) > 60 else ''} cannot be a file name: {exc}")
                continue
            if not inside:
                # The bundle's revision hashes the bundle folder: a rule read from elsewhere could change
                # while every audited decision still named the old revision, and the reloader would miss it.
                issue(field, f"{name!r} is outside the bundle folder; rules and tests must live in it")
            elif not found:
                issue(field, f"no such file {name!r}")
        if not rule.tests:
            issue("tests", "every rule needs tests (a *_test.rego module or a CEL case table)")
        if rule.message and rule.engine != "cel":
            issue("message", "only CEL rules take a message expression")
        if rule.scope == "request" and (rule.telemetry or rule.ages):
            issue("telemetry", "a request-scope rule sees no candidate, hence no telemetry")
        if not rule.memoise and (rule.engine != "rego" or rule.scope != "candidate"):
            issue("memoise", "only candidate-scope Rego rules see several candidates at once; "
                             "a CEL rule sees one candidate, a request rule none")
        if rule.kind == "quota" and rule.scope != "request":
            issue("scope", "quota rules are request-scope")
    bad = not_json(spec.params)
    if bad is not None:  # rules see params as JSON: YAML's dates, for one, are not
        where = ".".join(map(str, ("params", *bad)))
        issues.append(PolicyIssue(str(path), *doc.position_of(("params", *bad)),
                                  f"{where}: not a JSON value (strings, numbers, booleans, null, lists and "
                                  "mappings with string keys; quote a date or a time)"))
    if issues:
        raise BundleError(issues)
    return spec, doc


def not_json(value: Any, at: tuple[str | int, ...] = ()) -> tuple[str | int, ...] | None:
    """Where in ``value`` the first part JSON cannot carry is (``()``: ``value`` itself); None if all can.

    >>> import datetime
    >>> not_json({"a": [1, "x", {"b": datetime.date(2026, 1, 1)}]})
    ('a', 2, 'b')
    >>> not_json({"a": [1.5, None, True]}) is None, not_json({"a": float("nan")})
    (True, ('a',))
    """
    if value is None or isinstance(value, (str, bool, int)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else at
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = not_json(item, (*at, i))
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for k, item in value.items():
            found = (*at, k) if not isinstance(k, str) else not_json(item, (*at, k))
            if found is not None:
                return found
        return None
    return at
