"""The learner replica id: ``INFERMESH_REPLICA`` (each process's own) wins over ``learner.replica`` (a file
several processes may read), as a worker of ``serve --workers`` is given it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from decision.config import LearnerSection, ServiceConfig, Settings, learner_replica, load_settings
from decision.workers import worker_replica
from tests.conftest import ROOT


def _config(replica: str) -> ServiceConfig:
    return ServiceConfig(fleet=Path("f.yaml"), learner=LearnerSection(replica=replica))


def test_the_environment_s_replica_id_wins_over_the_config_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_REPLICA", "pod-7")
    assert learner_replica(_config("from-file"), load_settings()) == "pod-7"


def test_the_config_s_replica_id_is_used_where_the_environment_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFERMESH_REPLICA", raising=False)
    assert learner_replica(_config("from-file"), load_settings()) == "from-file"
    assert learner_replica(_config(""), load_settings()) == ""  # the single instance


def test_a_worker_keeps_the_id_its_parent_made_from_the_environment() -> None:
    # serve --workers: the parent makes each worker's id from the same choice and passes it in INFERMESH_REPLICA.
    cfg = _config("from-file")
    parent = Settings(replica="pod-7")
    given = worker_replica(learner_replica(cfg, parent), 1)
    assert given == "pod-7-w1"
    assert learner_replica(cfg, Settings(replica=given, worker=1)) == "pod-7-w1"


def test_a_worker_given_no_id_takes_the_config_s_with_its_index() -> None:
    cfg = _config("from-file")
    assert worker_replica(learner_replica(cfg, Settings(replica="")), 2) == "from-file-w2"
    assert learner_replica(cfg, Settings(replica="", worker=2)) == "from-file-w2"


@pytest.mark.slow
def test_serve_workers_take_their_ids_from_the_environment_over_the_config(fresh_pg_url: str, tmp_path: Path) -> None:
    """Both candidate ids of worker 0 are held: the one it is refused under says which it took."""
    from tests.test_learners_replica_cli import CONFIG, _env, _hold_demo_learner_id, _said
    from tests.test_learners_support import migrate

    config = tmp_path / "infermesh.yaml"
    config.write_text(CONFIG.read_text().replace("fleet: fleet.yaml", f"fleet: {CONFIG.parent / 'fleet.yaml'}")
                      .replace("policies: ../../policies/bundles/default\n", "")  # the built-in rule: quicker
                      .replace("learner:\n", "learner:\n  replica: from-file\n"))
    migrate(fresh_pg_url)
    holders = [_hold_demo_learner_id(fresh_pg_url, replica) for replica in ("pod-x-w0", "from-file-w0")]
    try:
        done = subprocess.run([sys.executable, "-m", "decision.cli", "serve", "--workers", "2", "--config",
                               str(config), "--grpc-port", "0", "--http-port", "0"], cwd=ROOT,
                              env=_env(fresh_pg_url, tmp_path / "var", INFERMESH_REPLICA="pod-x"),
                              capture_output=True, text=True, timeout=180)
    finally:
        for holder in holders:
            holder.close()
    said = _said(done.stderr)
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(said) == 1 and "ReplicaInUse" in said[0] and "'pod-x-w0'" in said[0], said
