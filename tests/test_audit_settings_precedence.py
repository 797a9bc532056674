"""``INFERMESH_AUDIT_<KEY>`` wins over the config's ``audit.<key>``, as ``INFERMESH_REPLICA`` wins over
``learner.replica``: at load time (a bad variable is reported as the variable's) and in the running
writer's settings, which one function (``AuditSettings.from_section``) builds for both."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.integration import build_audit_parts, resolve_audit_settings
from audit.settings import AuditSettings
from audit.writer import AuditWriter
from decision.config import ConfigError, Settings, load_config
from tests.conftest import ROOT


def _config(tmp_path: Path, audit: str) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\naudit:\n{audit}")
    return cfg


def test_the_environment_wins_over_the_section(monkeypatch: pytest.MonkeyPatch) -> None:
    assert AuditSettings.from_section({"batch_size": 99, "enabled": True}).batch_size == 99
    monkeypatch.setenv("INFERMESH_AUDIT_BATCH_SIZE", "7")
    monkeypatch.setenv("INFERMESH_AUDIT_MASK_FIELDS", '["labels.user"]')
    resolved = AuditSettings.from_section({"batch_size": 99, "mask_fields": ["request_id"], "queue_max": 5})
    assert (resolved.batch_size, resolved.mask_fields, resolved.queue_max) == (7, ["labels.user"], 5)
    # What the class is given itself still wins (the writer process rebuilds its parent's resolved settings).
    assert AuditSettings(**resolved.model_dump()).batch_size == 7
    assert AuditSettings(batch_size=99).batch_size == 99


def test_the_running_writer_takes_the_environment_over_the_config(
        fresh_pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_AUDIT_BATCH_SIZE", "7")
    section = load_config(_config(tmp_path, "  writer: thread\n  batch_size: 99\n")).audit
    parts = build_audit_parts(section, settings=Settings(database_url=fresh_pg_url, data_dir=tmp_path / "data"))
    try:
        assert isinstance(parts.sink, AuditWriter)
        assert parts.sink.settings.batch_size == 7
    finally:
        assert parts.close is not None
        parts.close()


def test_the_spool_folder_of_the_environment_is_used_and_a_worker_gets_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = Settings(data_dir=tmp_path / "data")
    assert resolve_audit_settings({}, data).spool_dir == tmp_path / "data" / "audit-spool"
    assert resolve_audit_settings({"spool_dir": tmp_path / "conf"}, data).spool_dir == tmp_path / "conf"
    monkeypatch.setenv("INFERMESH_AUDIT_SPOOL_DIR", str(tmp_path / "env"))
    assert resolve_audit_settings({"spool_dir": tmp_path / "conf"}, data).spool_dir == tmp_path / "env"
    worker = Settings(data_dir=tmp_path / "data", worker=1)
    assert resolve_audit_settings({}, worker).spool_dir == tmp_path / "env" / "worker-1"  # one writer a spool


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("INFERMESH_AUDIT_BATCH_SIZE", "0", r"^environment INFERMESH_AUDIT_BATCH_SIZE: Input should be greater"),
    ("INFERMESH_AUDIT_MASK_FIELDS", "labels.user", r"^environment INFERMESH_AUDIT_MASK_FIELDS: not JSON"),
])
def test_a_bad_variable_is_reported_as_the_variables_though_the_section_sets_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str) -> None:
    cfg = _config(tmp_path, "  batch_size: 99\n  mask_fields: [request_id]\n")
    load_config(cfg)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=expected):
        load_config(cfg)


def test_a_bad_key_of_the_section_is_still_reported_at_its_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERMESH_AUDIT_QUEUE_MAX", "10")
    with pytest.raises(ConfigError, match=r"c\.yaml:4: audit\.batch_size: Input should be a valid integer"):
        load_config(_config(tmp_path, "  queue_max: 5\n  batch_size: lots\n"))
