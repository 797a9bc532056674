"""Bundle snippets shared by the policy tests."""

from __future__ import annotations

import shutil
from pathlib import Path

from policies.bundle import DEFAULT_BUNDLE

# rego-cpp 1.5.2 segfaults on `with input as` over a rule that depends on another rule; test_crash is on line 4.
CRASHING_TEST = (
    "package crash_test\nimport rego.v1\nimport data.infermesh.residency\n"
    'test_crash if {\n  residency.allow == {"a"} with input as {"request": {"allowed_jurisdictions": [], '
    '"data_class": "public"}, "candidates": [{"id": "a", "endpoint": {"site_id": "s", "jurisdiction": "EU", '
    '"certifications": []}}]}\n}\n')


# A test module whose crashing test sits between tests that pass (and one that fails) on their own:
# rego-cpp compiles the module's rules together, so any query of the module crashes while test_crash is in it.
MIXED_CRASHING_TESTS = (
    "package crash_test\nimport rego.v1\nimport data.infermesh.residency\n\n"
    "test_before if { count(residency.site_violations({\"allowed_jurisdictions\": [\"EU\"], "
    "\"data_class\": \"public\"}, {\"jurisdiction\": \"US\"}, {})) == 1 }\n\n"
    + CRASHING_TEST.split("\n", 3)[3] +
    "\ntest_after if { 1 + 1 == 2 }\n\ntest_wrong if { 1 + 1 == 3 }\n")


def add_crashing_test(bundle: Path, source: str = CRASHING_TEST) -> Path:
    """Add ``source`` (default :data:`CRASHING_TEST`) to a copy of the default bundle as crash_test.rego, a test of
    the residency rule."""
    path = bundle / "crash_test.rego"
    path.write_text(source)
    manifest = bundle / "manifest.yaml"
    text = manifest.read_text()
    listed = "tests: [residency_test.rego, residency_cases.yaml]"
    assert listed in text
    manifest.write_text(text.replace(listed, "tests: [residency_test.rego, residency_cases.yaml, crash_test.rego]"))
    return path


def bundle_with_rule_field(tmp_path: Path, rule_file: str, field: str) -> tuple[Path, str]:
    """A copy of the default bundle whose rule reading ``rule_file`` gains the manifest line ``field``;
    returns the bundle and the manifest text before the edit."""
    bundle = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    manifest = bundle / "manifest.yaml"
    text = manifest.read_text()
    line = f"    file: {rule_file}\n"
    assert line in text
    manifest.write_text(text.replace(line, line + f"    {field}\n"))
    return bundle, text


def copied_bundle(tmp_path: Path) -> Path:
    """A copy of the default bundle to edit, under ``tmp_path/bundle``."""
    dst = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, dst)
    return dst


def edit_text(path: Path, old: str, new: str) -> None:
    """Replace the first ``old`` in the file with ``new``; ``old`` must be there."""
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
