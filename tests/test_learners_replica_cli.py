"""A learner replica id another process holds stops `infermesh demo` and `serve --workers` with one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from decision.config import load_config
from decision.service import build_learner, make_features
from learners.store import LearnerStore
from learners.sync import LearnerSync
from tests.conftest import ROOT
from tests.test_learners_support import migrate

CONFIG = ROOT / "deploy" / "demo" / "infermesh.yaml"


def _hold_demo_learner_id(url: str, replica: str) -> LearnerStore:
    """A store holding ``replica`` of the demo config's learner, as a running serve's does."""
    cfg = load_config(CONFIG)
    features = make_features(cfg.learner.features)
    learner, _ = build_learner(cfg, len(features.names))
    store = LearnerStore(url)
    name, version = LearnerSync(learner, store, features.names, replica=replica).key
    store.claim_replica(learner=name, version=version, replica=replica)
    return store


def _env(url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "INFERMESH_DATABASE_URL": url, "INFERMESH_DATA_DIR": str(data_dir), **extra}
    if "INFERMESH_REPLICA" not in extra:
        env.pop("INFERMESH_REPLICA", None)
    return env


def _said(stderr: str) -> list[str]:
    """What the command said on stderr besides its JSON log lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


@pytest.mark.slow
def test_demo_against_a_running_serve_on_the_same_database_says_one_line_and_exits_2(
        fresh_pg_url: str, tmp_path: Path) -> None:
    migrate(fresh_pg_url)
    holder = _hold_demo_learner_id(fresh_pg_url, "")  # a serve without a replica id
    try:
        done = subprocess.run([sys.executable, "-m", "decision.cli", "demo", "--config", str(CONFIG),
                               "--duration", "1"], cwd=ROOT, env=_env(fresh_pg_url, tmp_path),
                              capture_output=True, text=True, timeout=120)
    finally:
        holder.close()
    said = _said(done.stderr)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert len(said) == 1 and said[0].startswith("infermesh: ") and "ReplicaInUse" in said[0], said
    assert "single instance" in said[0] and "INFERMESH_REPLICA" in said[0]


@pytest.mark.slow
def test_serve_workers_whose_worker_id_is_held_says_one_line_and_exits_2(fresh_pg_url: str, tmp_path: Path) -> None:
    migrate(fresh_pg_url)
    holder = _hold_demo_learner_id(fresh_pg_url, "pod-x-w0")  # worker 0's id, held elsewhere
    try:
        done = subprocess.run([sys.executable, "-m", "decision.cli", "serve", "--workers", "2", "--config",
                               str(CONFIG), "--grpc-port", "0", "--http-port", "0"], cwd=ROOT,
                              env=_env(fresh_pg_url, tmp_path, INFERMESH_REPLICA="pod-x"),
                              capture_output=True, text=True, timeout=180)
    finally:
        holder.close()
    said = _said(done.stderr)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert len(said) == 1 and "ReplicaInUse" in said[0] and "'pod-x-w0'" in said[0], said
    assert "did not all start" not in done.stderr
