"""A bundle's tests in a child process, so that an engine crash fails a test instead of the caller.

rego-cpp 1.5.2 can crash the process (SIGSEGV) on some test constructs (``with input as`` over
rules that depend on other rules). The child prints one JSON line as each test starts and one as
it ends, so a crash is pinned to the test that was running. rego-cpp compiles a module's rules
together, so the crashing construct may sit in another test of that module: after a crash, a new
child goes on from the test that was running with each Rego test alone in its module
(:func:`policies.selftest.without_other_tests`); a test that crashes alone fails, naming the crash,
and the next child goes on after it. ``infermesh policy test`` and the hot reloader both go through here.

rego-cpp can also abort the process (SIGABRT, an uncaught C++ exception) while it merely parses a
module, e.g. on the malformed head ``f(a, data.x. b) := a``. :func:`compile_isolated` therefore
compiles a bundle in a child first; ``policy check``, ``serve`` and every reload call it before
compiling in their own process, and a crash refuses the bundle at the statement that crashed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from decision.yaml_lines import line_col
from policies.errors import BundleError, PolicyIssue
from policies.selftest import TestOutcome, iter_bundle_tests

_ROOT = str(Path(__file__).resolve().parent.parent)


def run_tests_isolated(directory: str | Path, timeout_s: float = 300.0, max_crashes: int = 10) -> list[TestOutcome]:
    """Every test's outcome, as :func:`policies.selftest.run_bundle_tests`; a crash or a timeout is a failure.

    A crash is first taken as the module's (any of its tests may hold what crashes rego-cpp): the tests
    from the one that was running on are run again, each alone in its module, and a test that still
    crashes fails. Up to ``max_crashes`` such tests, all within ``timeout_s``.

    Examples
    --------
    >>> from policies.bundle import DEFAULT_BUNDLE
    >>> results = run_tests_isolated(DEFAULT_BUNDLE)
    >>> len(results) > 20, all(r.passed for r in results)
    (True, True)
    """
    results: list[TestOutcome] = []
    skip, alone, crashes = 0, False, 0
    deadline = time.monotonic() + timeout_s
    while True:
        outcomes, started, failure, stderr = _child(directory, skip, max(1.0, deadline - time.monotonic()), alone)
        results.extend(outcomes)
        if not failure:
            if not results:
                results.append(TestOutcome("bundle tests", False, str(directory), "the test process reported nothing"))
            return results
        tail = stderr.strip()[-300:]
        running = started[-1] if len(started) > len(outcomes) else None
        name, where = running or ("bundle tests", str(directory))
        crashed_at = (f"the test process {failure} while running this test{' alone in its module' if alone else ''}"
                      + (f": {tail}" if tail else ""))
        if running is None or failure.startswith("did not finish") or time.monotonic() >= deadline:
            results.append(TestOutcome(name, False, where, crashed_at + "; later tests were not run"))
            return results
        if not alone:
            # Not yet known to be this test's crash: run it and the rest again, each test alone.
            alone = True
            skip += len(started) - 1
            continue
        crashes += 1
        results.append(TestOutcome(name, False, where, crashed_at))
        skip += len(started)  # go on after the test that crashed
        if crashes >= max_crashes:
            results.append(TestOutcome("bundle tests", False, str(directory),
                                       f"{crashes} tests crashed the test process; later tests were not run"))
            return results


def _child(directory: str | Path, skip: int, timeout_s: float, alone: bool = False
           ) -> tuple[list[TestOutcome], list[tuple[str, str]], str, str]:
    """(outcomes, tests started, failure or "", stderr) of one child run skipping the first ``skip`` tests."""
    lines, failure, stderr = _run([str(directory), str(skip), *(["alone"] if alone else [])], timeout_s)
    outcomes: list[TestOutcome] = []
    started: list[tuple[str, str]] = []
    for msg in lines:
        if "started" in msg:
            started.append((str(msg["started"]), str(msg["where"])))
        elif "outcome" in msg:
            outcomes.append(TestOutcome(**msg["outcome"]))  # type: ignore[arg-type]
    return outcomes, started, failure, stderr


def _ended(returncode: int) -> str:
    """How a child ended, if not well: ``exit 1``, or ``exit -11 (SIGSEGV)`` for a signal.

    >>> _ended(0), _ended(1), _ended(-11)
    ('', 'exit 1', 'exit -11 (SIGSEGV)')
    """
    if returncode >= 0:
        return f"exit {returncode}" if returncode else ""
    try:
        return f"exit {returncode} ({signal.Signals(-returncode).name})"
    except ValueError:
        return f"exit {returncode}"


def _run(args: list[str], timeout_s: float) -> tuple[list[dict[str, object]], str, str]:
    """(JSON lines printed, failure or "", stderr) of ``python -m policies.selftest_child *args``."""
    env = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run([sys.executable, "-m", "policies.selftest_child", *args], capture_output=True,
                              text=True, timeout=timeout_s, env=env, check=False)
        stdout, stderr, failure = proc.stdout, proc.stderr, _ended(proc.returncode)
    except subprocess.TimeoutExpired as exc:
        out, err = exc.stdout or b"", exc.stderr or b""
        stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
        stderr = err.decode(errors="replace") if isinstance(err, bytes) else err
        failure = f"did not finish in {timeout_s:.0f}s"
    lines = []
    for line in stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict):
            lines.append(msg)
    return lines, failure, stderr


def compile_isolated(directory: str | Path, timeout_s: float = 120.0) -> None:
    """Compile the bundle in a child; raises :class:`BundleError` if the child crashed (or hung).

    A bundle that only fails to compile is left to the caller's own compile, which reports it; this
    catches what would kill the caller. Each Rego module is first added alone, so a crash names its
    module, and then a second child adds that module's statements one at a time to name the statement.

    Examples
    --------
    >>> from policies.bundle import DEFAULT_BUNDLE
    >>> compile_isolated(DEFAULT_BUNDLE)
    """
    lines, failure, stderr = _run(["--compile", str(directory)], timeout_s)
    if not failure:
        return
    tail = " ".join(stderr.strip()[-300:].split())
    what = f"the Rego engine crashed ({failure}{': ' + tail if tail else ''})"
    steps = [str(m["compiling"]) for m in lines if "compiling" in m]
    module = steps[-1] if steps else ""
    if not module or failure.startswith("did not finish"):
        raise BundleError([PolicyIssue(str(directory), 1, 1, f"compiling the bundle: {what}; the bundle is "
                                                              "refused")])
    from policies.bundle import rego_modules  # imported here: policies.bundle does not need the child

    path, source = rego_modules(Path(directory))[module]
    located, _, _ = _run(["--locate", str(directory), module], timeout_s)
    at = [int(str(m["statement"])) for m in located if "statement" in m]
    line, col = line_col(source, at[-1]) if at else (1, 1)
    raise BundleError([PolicyIssue(path, line, col, f"compiling this {'statement' if at else 'module'}: {what}; "
                                                    "a malformed rule head (a parameter such as data.x. b) can "
                                                    "do this: the bundle is refused")])


def _compile_main(directory: str) -> None:
    from policies.bundle import compile_bundle, rego_modules
    from policies.manifest import load_manifest

    try:
        params = dict(load_manifest(Path(directory))[0].params)
        modules = rego_modules(Path(directory))
    except Exception:
        return  # the caller's own compile reports it
    for name, module in modules.items():
        print(json.dumps({"compiling": name}), flush=True)
        _build_alone({name: module}, name, params)
    print(json.dumps({"compiling": ""}), flush=True)
    try:
        compile_bundle(directory)
    except Exception:
        return


def _locate_main(directory: str, module: str) -> None:
    from policies.bundle import rego_modules
    from policies.rego_calls import rego_code, statements

    path, source = rego_modules(Path(directory))[module]
    sts = statements(rego_code(source))
    keep = [st for st in sts if st.name in ("package", "import")]
    for st in sts:
        if st.name in ("package", "import"):
            continue
        out = [c if c == "\n" else " " for c in source]
        for s in [*keep, st]:
            out[s.start:s.end] = source[s.start:s.end]
        print(json.dumps({"statement": st.start}), flush=True)
        _build_alone({module: (path, "".join(out))}, module, {})


def _build_alone(modules: dict[str, tuple[str, str]], name: str, params: dict[str, object]) -> None:
    """Parse and build one module as a rule is built (what crashes rego-cpp crashes here); errors are ignored."""
    from policies.rego_engine import new_interpreter, package_of

    try:
        interp = new_interpreter(modules, params)
        base = package_of(modules[name][1]).replace(".", "/")
        if base:
            interp.build(None, [f"{base}/allow", f"{base}/reason"])
    except Exception:
        pass


def _main(directory: str, skip: int, alone: bool = False) -> None:
    seen = 0

    def started(name: str, where: str) -> bool:
        nonlocal seen
        seen += 1
        if seen <= skip:
            return False
        print(json.dumps({"started": name, "where": where}), flush=True)
        return True

    for outcome in iter_bundle_tests(directory, started, alone=alone):
        print(json.dumps({"outcome": asdict(outcome)}), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--compile"]:
    _compile_main(sys.argv[2])
elif __name__ == "__main__" and sys.argv[1:2] == ["--locate"]:
    _locate_main(sys.argv[2], sys.argv[3])
elif __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0, sys.argv[3:4] == ["alone"])
