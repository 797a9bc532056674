"""The reloader compiles in its own process exactly the bytes the crash-probing child compiled: an edit
landing between the two compiles never reaches the Rego engine here unprobed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from decision.contracts import Guard
from policies.bundle import DEFAULT_BUNDLE, CompiledBundle, compile_bundle, rego_modules
from policies.guard import PolicyGuard
from policies.manifest import bundle_revision
from policies.reload import PolicyReloader
from policies.selftest_child import compile_isolated

EDIT = "\n# an edit the crash probe never compiled\n"


def _probed_and_compiled(monkeypatch: pytest.MonkeyPatch, folder: Path) -> tuple[list[Any], list[CompiledBundle]]:
    """Record the Rego sources the child is asked to compile and the bundles compiled here; just before
    the compile here, once the child's has passed, ``folder``'s rule module is edited (the window closed)."""
    probed: list[Any] = []
    compiled: list[CompiledBundle] = []

    def probe(directory: str | Path, timeout_s: float = 120.0) -> None:
        probed.append({name: source for name, (_, source) in rego_modules(Path(directory)).items()})
        compile_isolated(directory, timeout_s)

    def compile_here(directory: str | Path) -> CompiledBundle:
        if not compiled:
            rule = folder / "residency.rego"
            rule.write_text(rule.read_text() + EDIT)
        bundle = compile_bundle(directory)
        compiled.append(bundle)
        return bundle

    monkeypatch.setattr("policies.reload.compile_isolated", probe)
    monkeypatch.setattr("policies.reload.compile_bundle", compile_here)
    return probed, compiled


@pytest.mark.parametrize("run_tests", [False, True])
def test_an_edit_between_the_probe_and_the_compile_never_reaches_the_engine_unprobed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_tests: bool) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, folder)
    probed_revision = bundle_revision(folder)
    probed, compiled = _probed_and_compiled(monkeypatch, folder)
    swapped: list[Guard] = []
    guard = PolicyReloader(folder, swapped.append, run_tests=run_tests).load()
    assert EDIT in (folder / "residency.rego").read_text()  # the edit did land in the window
    sources = {name: source for name, (_, source) in compiled[0].modules.items()}
    assert sources == probed[0] and all(EDIT not in s for s in sources.values())
    assert guard.revision == probed_revision != bundle_revision(folder)
    # The guard names the bundle folder, not the snapshot it was compiled from (gone by now).
    assert isinstance(guard, PolicyGuard) and guard.bundle.directory == folder
    assert all(path.startswith(str(folder)) for path, _ in guard.bundle.modules.values())
    assert all(r.path.startswith(str(folder)) and r.program.path == r.path for r in guard.bundle.rules)


def test_a_rejected_bundle_is_reported_in_its_folder_not_in_the_snapshot(tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, folder)
    reloader = PolicyReloader(folder, lambda _g: None, run_tests=False)
    reloader.load()
    (folder / "device_owner.cel").write_text('endpoint.tier != "device" ||\n')
    result = reloader.reload()
    assert not result.ok and f"{folder / 'device_owner.cel'}:" in result.error
    assert "infermesh-bundle-" not in result.error
    missing = PolicyReloader(tmp_path / "nowhere", lambda _g: None, run_tests=False).reload()
    assert not missing.ok and f"{tmp_path / 'nowhere' / 'manifest.yaml'}:1:1: no manifest.yaml" in missing.error


def test_a_bundle_edited_while_it_is_read_is_refused_then_loaded_once_it_stops_changing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, folder)
    reloader = PolicyReloader(folder, lambda _g: None, run_tests=False)
    before = reloader.load().revision
    real_copy = shutil.copytree

    def copy_while_edited(src: Any, dst: Any, **kwargs: Any) -> Any:  # the save lands mid-copy
        (folder / "manifest.yaml").write_text((folder / "manifest.yaml").read_text() + "# edited\n")
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copy_while_edited)
    result = reloader.reload(force=True)  # as ReloadPolicies asks: the folder was unchanged when it was asked
    assert not result.ok and "changed while it was being loaded" in result.error and reloader.revision == before
    monkeypatch.undo()
    assert reloader.reload().ok and reloader.revision == bundle_revision(folder) != before
