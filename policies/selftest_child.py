"""A bundle's tests in a child process, so that an engine crash fails a test instead of the caller.

rego-cpp 1.5.2 can crash the process (SIGSEGV) on some test constructs (``with input as`` over
rules that depend on other rules). The child prints one JSON line as each test starts and one as
it ends, so a crash is pinned to the test that was running. rego-cpp compiles a module's rules
together, so the crashing construct may sit in another test of that module: after a crash, a new
child goes on from the test that was running with each Rego test alone in its module
(:func:`policies.selftest.without_other_tests`); a test that crashes alone fails, naming the crash,
and the next child goes on after it. ``infermesh policy test`` and the hot reloader both go through here.
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
    env = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "policies.selftest_child", str(directory), str(skip), *(["alone"] if alone else [])]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        stdout, stderr, failure = proc.stdout, proc.stderr, _ended(proc.returncode)
    except subprocess.TimeoutExpired as exc:
        out, err = exc.stdout or b"", exc.stderr or b""
        stdout = out.decode(errors="replace") if isinstance(out, bytes) else out
        stderr = err.decode(errors="replace") if isinstance(err, bytes) else err
        failure = f"did not finish in {timeout_s:.0f}s"
    outcomes: list[TestOutcome] = []
    started: list[tuple[str, str]] = []
    for line in stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue  # not ours
        if isinstance(msg, dict) and "started" in msg:
            started.append((str(msg["started"]), str(msg["where"])))
        elif isinstance(msg, dict) and "outcome" in msg:
            outcomes.append(TestOutcome(**msg["outcome"]))
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


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0, sys.argv[3:4] == ["alone"])
