"""Hot reload: a bundle replaces the running one only if it compiles and passes its own tests.

Triggers: :meth:`PolicyReloader.reload` (admin RPC, SIGHUP) and a polling file watcher. The
swap is one reference assignment (``on_swap``, e.g. ``DecisionEngine.set_guard``), so each
decision sees exactly one revision. Failures are logged and counted, never swapped in.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from decision.contracts import Guard
from policies.bundle import CompiledBundle, CompiledRule, compile_bundle
from policies.errors import BundleError, BundleRejected
from policies.guard import PolicyGuard
from policies.manifest import bundle_files, bundle_revision, ignored_part
from policies.quota import InMemoryQuotaCounters, QuotaCounters
from policies.selftest_child import compile_isolated, run_tests_isolated

log = logging.getLogger("infermesh.policies.reload")


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    revision: str
    error: str = ""
    changed: bool = False


class PolicyReloader:
    """Loads a bundle folder into guards and swaps them in when the folder changes.

    Attributes ``revision``, ``reloads``, ``reload_failures``, ``last_error`` and
    ``last_reload_at`` are for ``/metrics`` and health details.
    """

    def __init__(self, directory: str | Path, on_swap: Callable[[Guard], None], *,
                 counters: QuotaCounters | None = None, run_tests: bool = True,
                 poll_interval_s: float = 2.0, on_failure: Callable[[str], None] | None = None) -> None:
        self.directory = Path(directory)
        self.on_swap = on_swap
        # Told of every rejected bundle, whatever triggered the reload (the file watcher included).
        self.on_failure = on_failure
        self.counters: QuotaCounters = counters if counters is not None else InMemoryQuotaCounters()
        self.run_tests = run_tests
        self.poll_interval_s = poll_interval_s
        self.revision = ""
        self.guard: PolicyGuard | None = None
        self.reloads = 0
        self.reload_failures = 0
        self.last_error = ""
        self.last_reload_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _build(self) -> PolicyGuard:
        # The folder is read once, into a snapshot, and everything below uses those bytes: rego-cpp aborts
        # the process on some malformed modules (f(a, data.x. b) := a), so a child compiles the snapshot
        # first, and only what it survived is compiled here and tested. Read from the folder again, an
        # edit landing between the child's compile and this one would be compiled here unprobed.
        with tempfile.TemporaryDirectory(prefix="infermesh-bundle-") as tmp:
            snapshot = self._snapshot(Path(tmp) / "bundle")
            try:
                compile_isolated(snapshot)
                bundle = compile_bundle(snapshot)
            except BundleError as exc:  # located in the bundle folder, not in the snapshot
                raise BundleError([replace(i, path=self._in_folder(i.path, snapshot),
                                           message=self._in_folder(i.message, snapshot))
                                   for i in exc.issues]) from None
            if self.run_tests:
                # In a child: rego-cpp can crash on some test constructs, which must reject the bundle,
                # not kill the server.
                failed = [self._in_folder(str(t), snapshot) for t in run_tests_isolated(snapshot) if not t.passed]
                if failed:
                    raise BundleRejected(f"{self.directory}: {len(failed)} bundle test(s) failed: "
                                         + "; ".join(failed[:5]))
        return PolicyGuard(self._named_in_folder(bundle, snapshot), counters=self.counters)

    def _snapshot(self, snapshot: Path) -> Path:
        """A copy of the bundle's files in ``snapshot``; a bundle that changed while it was copied is
        refused (the copy could mix two revisions), and loaded again once it stops changing."""
        before = bundle_revision(self.directory)
        if self.directory.is_dir():
            shutil.copytree(self.directory, snapshot, ignore=lambda _d, names: [n for n in names if ignored_part(n)])
        else:  # compile_bundle names what is missing (no manifest.yaml), located in the bundle folder
            snapshot.mkdir()
        if bundle_revision(snapshot) != before:
            raise BundleRejected("the bundle changed while it was being loaded; it is loaded again "
                                 "once it stops changing (the file watcher, SIGHUP or ReloadPolicies)")
        return snapshot

    def _in_folder(self, text: str, snapshot: Path) -> str:
        """``text`` (a path or a message) naming the bundle folder where it names the snapshot."""
        return text.replace(str(snapshot), str(self.directory))

    def _named_in_folder(self, bundle: CompiledBundle, snapshot: Path) -> CompiledBundle:
        """``bundle``, compiled from ``snapshot``, with its paths in the bundle folder: a CEL rule's
        denial reason names its file, which must not be a deleted snapshot's."""
        def rule(r: CompiledRule) -> CompiledRule:
            program = replace(r.program, path=self._in_folder(r.program.path, snapshot))
            return replace(r, path=self._in_folder(r.path, snapshot), program=program)

        modules = {name: (self._in_folder(path, snapshot), source) for name, (path, source) in bundle.modules.items()}
        return replace(bundle, directory=self.directory, rules=tuple(map(rule, bundle.rules)), modules=modules)

    def load(self) -> PolicyGuard:
        """The first load: raises if the bundle is broken (start-up fails fast)."""
        with self._lock:
            guard = self._build()
            self.guard, self.revision, self.last_reload_at = guard, guard.revision, time.time()
            return guard

    def reload(self, *, force: bool = False) -> ReloadResult:
        """Swap in the folder's bundle if it changed, compiles and passes its tests."""
        with self._lock:
            try:
                current = bundle_revision(self.directory)
                if current == self.revision and not force:
                    self.last_error = ""  # a rejected edit was reverted: the folder is what runs again
                    return ReloadResult(True, self.revision)
                guard = self._build()
            except Exception as exc:
                self.reload_failures += 1
                self.last_error = str(exc)
                log.error("policy bundle %s rejected, keeping %s: %s", self.directory, self.revision or "none", exc)
                if self.on_failure is not None:
                    self.on_failure(str(exc))
                return ReloadResult(False, self.revision, str(exc))
            self.on_swap(guard)
            changed = guard.revision != self.revision
            self.guard, self.revision, self.last_error = guard, guard.revision, ""
            self.reloads += 1
            self.last_reload_at = time.time()
            log.info("policy bundle %s now at revision %s", self.directory, guard.revision)
            return ReloadResult(True, guard.revision, changed=changed)

    def health(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "revision": self.revision, "reloads": self.reloads,
                "reload_failures": self.reload_failures, "last_error": self.last_error,
                "last_reload_at": self.last_reload_at}

    # -- the file watcher: polling mtimes and sizes is enough for a folder of small files --
    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        # A list first: tuple() of a generator grows its tuple in place, which CPython refuses
        # (SystemError) when another thread holds a reference to it meanwhile; gc.get_objects()
        # hands out such references (seen in CI while a test counted objects).
        files: list[tuple[str, int, int]] = []
        try:
            for p in bundle_files(self.directory):
                st = p.stat()  # once per file: its time and size from the same look
                files.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            return ()
        return tuple(files)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        # Fingerprint now, not in the thread: an edit right after start() must count as a change.
        seen = self._fingerprint()
        self._thread = threading.Thread(target=self._watch, args=(seen,), name="policy-watch", daemon=True)
        self._thread.start()

    def _watch(self, seen: tuple[tuple[str, int, int], ...]) -> None:
        while not self._stop.wait(self.poll_interval_s):
            now = self._fingerprint()
            if now != seen:
                seen = now
                self.reload()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
