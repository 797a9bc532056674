"""Bundle snippets shared by the policy tests."""

from __future__ import annotations

from pathlib import Path

# rego-cpp 1.5.2 segfaults on `with input as` over a rule that depends on another rule; test_crash is on line 4.
CRASHING_TEST = (
    "package crash_test\nimport rego.v1\nimport data.infermesh.residency\n"
    'test_crash if {\n  residency.allow == {"a"} with input as {"request": {"allowed_jurisdictions": [], '
    '"data_class": "public"}, "candidates": [{"id": "a", "endpoint": {"site_id": "s", "jurisdiction": "EU", '
    '"certifications": []}}]}\n}\n')


def add_crashing_test(bundle: Path) -> Path:
    """Add :data:`CRASHING_TEST` to a copy of the default bundle as a test of the residency rule."""
    path = bundle / "crash_test.rego"
    path.write_text(CRASHING_TEST)
    manifest = bundle / "manifest.yaml"
    text = manifest.read_text()
    listed = "tests: [residency_test.rego, residency_cases.yaml]"
    assert listed in text
    manifest.write_text(text.replace(listed, "tests: [residency_test.rego, residency_cases.yaml, crash_test.rego]"))
    return path
