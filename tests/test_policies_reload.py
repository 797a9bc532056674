"""Hot reload: good bundles swap in, broken or failing ones never do; decisions see one revision."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from decision.contracts import Guard
from decision.domain import RequestContext
from decision.engine import DecisionEngine
from decision.fleet import Fleet
from decision.telemetry import TelemetryStore
from learners.least_ttft import LeastExpectedTtft
from policies.bundle import DEFAULT_BUNDLE
from policies.reload import PolicyReloader
from tests.policy_support import add_crashing_test


def _setup(tmp_path: Path, fleet: Fleet) -> tuple[Path, PolicyReloader, DecisionEngine]:
    bundle = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    holder: dict[str, DecisionEngine] = {}
    reloader = PolicyReloader(bundle, lambda g: holder["engine"].set_guard(g), poll_interval_s=0.2)
    guard = reloader.load()
    store = TelemetryStore({e.endpoint_id: e.node_id for e in fleet.endpoints})
    holder["engine"] = DecisionEngine(fleet, store, guard, LeastExpectedTtft())
    return bundle, reloader, holder["engine"]


def _bump_temperature(bundle: Path, value: int) -> None:
    manifest = bundle / "manifest.yaml"
    text = manifest.read_text()
    start = text.index("max_gpu_temp_c:")
    end = text.index("\n", start)
    manifest.write_text(text[:start] + f"max_gpu_temp_c: {value}" + text[end:])


def _touch(bundle: Path, tag: str) -> None:
    """A harmless edit (a comment): a new revision that still passes its tests."""
    manifest = bundle / "manifest.yaml"
    manifest.write_text(manifest.read_text() + f"# edit {tag}\n")


def test_good_bundle_swaps_in(tmp_path: Path, demo_fleet: Fleet) -> None:
    bundle, reloader, engine = _setup(tmp_path, demo_fleet)
    before = engine.guard.revision
    assert reloader.reload().changed is False
    _touch(bundle, "a")
    result = reloader.reload()
    assert result.ok and result.changed and result.revision != before
    assert engine.guard.revision == result.revision == reloader.revision
    assert reloader.reloads == 1 and reloader.reload_failures == 0


def test_broken_bundle_never_replaces_the_running_one(tmp_path: Path, demo_fleet: Fleet) -> None:
    bundle, reloader, engine = _setup(tmp_path, demo_fleet)
    before = engine.guard.revision
    rule = bundle / "device_owner.cel"
    good = rule.read_text()
    rule.write_text('endpoint.tier != "device" ||\n')
    result = reloader.reload()
    assert not result.ok and "device_owner.cel:" in result.error
    assert engine.guard.revision == before == reloader.revision
    assert reloader.reload_failures == 1 and reloader.last_error == result.error
    d = engine.decide(RequestContext("r", "globex", model="llama-3.1-8b"))
    assert d.policy_revision == before
    rule.write_text(good)  # the edit is reverted: health no longer reports its error
    assert reloader.reload().ok and reloader.last_error == "" and reloader.revision == before


def test_bundle_failing_its_own_tests_is_rejected(tmp_path: Path, demo_fleet: Fleet) -> None:
    bundle, reloader, engine = _setup(tmp_path, demo_fleet)
    before = engine.guard.revision
    _bump_temperature(bundle, 60)  # compiles, but the case table expects 85C to be allowed
    result = reloader.reload()
    assert not result.ok and "test(s) failed" in result.error
    assert engine.guard.revision == before and reloader.reload_failures == 1


def test_file_watch_reloads(tmp_path: Path, demo_fleet: Fleet) -> None:
    bundle, reloader, engine = _setup(tmp_path, demo_fleet)
    before = engine.guard.revision
    reloader.start()
    try:
        _touch(bundle, "watched")
        deadline = time.monotonic() + 60
        while engine.guard.revision == before and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        reloader.stop()
    assert engine.guard.revision != before and reloader.reloads == 1


def test_concurrent_decisions_during_reload_see_one_revision(tmp_path: Path, demo_fleet: Fleet) -> None:
    bundle, reloader, engine = _setup(tmp_path, demo_fleet)
    seen: list[tuple[str, set[str]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def decide() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                # Premium tier: three tight loops must not reach the per-minute quota (not under test here).
                d = engine.decide(RequestContext(f"r{i}", "globex", user_tier="premium", model_family="llama"))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return
            revs = {v["revision"] for v in d.trace["stages"]["guard"]["verdicts"]}
            seen.append((d.policy_revision, revs))

    threads = [threading.Thread(target=decide) for _ in range(3)]
    for t in threads:
        t.start()
    revisions = {engine.guard.revision}
    for tag in ("x", "y"):
        _touch(bundle, tag)
        result = reloader.reload()
        assert result.ok
        revisions.add(result.revision)
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert seen and all(revs == {rev} for rev, revs in seen)
    assert {rev for rev, _ in seen} <= revisions
    assert isinstance(engine.guard, Guard)


def test_a_bundle_whose_tests_crash_the_rego_engine_is_rejected(tmp_path: Path, demo_fleet: Fleet) -> None:
    # rego-cpp 1.5.2 segfaults on `with input as` over a rule that depends on another rule.
    bundle, reloader, engine = _setup(tmp_path, demo_fleet)
    before = engine.guard.revision
    add_crashing_test(bundle)
    result = reloader.reload()
    assert not result.ok and engine.guard.revision == before and reloader.reload_failures == 1


def test_a_bundle_swapped_in_while_the_service_starts_reaches_the_engine(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The file watcher runs from the moment the policies load; the engine is built seconds later (the
    # audit log starts in between). A swap in that window must not be dropped.
    from decision import service as service_module
    from decision.config import Settings, load_config

    real = service_module.build_policies
    swapped: list[Guard] = []

    def policies_then_a_swap(config, settings, fleet, on_swap, on_failure=None):  # type: ignore[no-untyped-def]
        parts = real(config, settings, fleet, on_swap, on_failure)
        newer = service_module.load_guard(DEFAULT_BUNDLE, fleet)  # what the watcher would have compiled
        swapped.append(newer)
        on_swap(newer)
        return parts

    monkeypatch.setattr(service_module, "build_policies", policies_then_a_swap)
    service = service_module.Service(load_config("deploy/demo/infermesh.yaml"), Settings(), audit_enabled=False)
    try:
        assert service.engine is not None and service.engine.guard is swapped[0]
        assert service.engine.guard is not service.policies.guard
    finally:
        service.stop(0)


def test_a_bundle_edited_while_it_loads_is_not_swapped_in_untested(tmp_path: Path, demo_fleet: Fleet,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests run seconds after the compile; an edit in between must not swap in a bundle whose
    # compiled rules nobody tested (here: a GPU temperature rule that lets everything through). They
    # run on the snapshot that was compiled, so they test the compiled rule, and it fails them.
    from policies import bundle as bundle_module
    from policies import reload as reload_module

    bundle, reloader, engine = _setup(tmp_path, demo_fleet)
    before = reloader.revision
    real = bundle_module.compile_bundle
    rule = bundle / "gpu_temperature.cel"
    original = rule.read_text()

    def compile_then_edited(directory: Path) -> bundle_module.CompiledBundle:
        compiled = real(directory)
        rule.write_text(original)  # the author's next save lands before the tests run
        return compiled

    rule.write_text("true\n")
    monkeypatch.setattr(reload_module, "compile_bundle", compile_then_edited)
    result = reloader.reload()
    assert not result.ok and "test(s) failed" in result.error and "gpu_temperature_cases.yaml" in result.error
    assert reloader.revision == before and engine.guard.revision == before
    monkeypatch.undo()
    _touch(bundle, "after")
    assert reloader.reload().ok and engine.guard.revision == reloader.revision != before


def _configmap_mount(root: Path, content: Path, stamp: str) -> None:
    """The layout kubelet gives a ConfigMap volume: files in a hidden ..<stamp>/ folder, ..data linking to
    it, and each visible name linking through ..data; an update swaps the ..data link atomically."""
    shutil.copytree(content, root / f"..{stamp}")
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(f"..{stamp}")
    tmp_link.replace(root / "..data")
    for f in (root / "..data").iterdir():
        if not (root / f.name).is_symlink():
            (root / f.name).symlink_to(f"..data/{f.name}")


def test_a_bundle_mounted_from_a_configmap_loads_and_reloads(tmp_path: Path, demo_fleet: Fleet) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(DEFAULT_BUNDLE, plain)
    mount = tmp_path / "mount"
    mount.mkdir()
    _configmap_mount(mount, plain, "2026_11_29_01")
    swaps: list[Guard] = []
    reloader = PolicyReloader(mount, swaps.append)
    guard = reloader.load()  # compiled, snapshotted and tested: the hidden folders are not part of it
    assert guard.revision == PolicyReloader(plain, swaps.append, run_tests=False).load().revision
    (plain / "manifest.yaml").write_text((plain / "manifest.yaml").read_text() + "# reviewed\n")
    _configmap_mount(mount, plain, "2026_11_29_02")
    result = reloader.reload()
    assert result.ok and result.changed, result.error
    assert swaps[-1].revision == reloader.revision != guard.revision


def test_the_watcher_fingerprint_survives_another_thread_listing_every_object(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A test counting objects (gc.get_objects()) while a service's watcher ran made CPython refuse to
    # grow the tuple the watcher was building (SystemError), and the watcher thread died.
    import gc

    import policies.reload as reload

    files = []
    for name in ("a.cel", "b.rego", "manifest.yaml"):
        (tmp_path / name).write_text(name)
        files.append(tmp_path / name)
    held: list[list[object]] = []

    def listing(directory: Path) -> Iterator[Path]:
        for f in files:
            held.append(gc.get_objects())  # what another thread may do at any moment
            yield f

    monkeypatch.setattr(reload, "bundle_files", listing)
    fingerprint = PolicyReloader(tmp_path, lambda g: None, run_tests=False)._fingerprint()
    assert [f for f, _, _ in fingerprint] == [str(f) for f in files]
