"""The audit CLI reads only an audit log that exists: it never creates, migrates or reports on an empty one."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit import migrate
from decision.cli import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["audit", *argv])
    return code, capsys.readouterr().err


def test_no_embedded_log_in_the_data_directory_is_an_error_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("INFERMESH_DATABASE_URL", raising=False)
    monkeypatch.setenv("INFERMESH_DATA_DIR", str(tmp_path / "var"))
    for argv in (["verify"], ["query"], ["why", "01900000-0000-7000-8000-000000000000"], ["checkpoint"],
                 ["keys", "create", "--name", "x"], ["retention", "--days", "3"]):
        code, err = _run(argv, capsys)
        assert code == 2, argv
        assert f"no audit log under {tmp_path / 'var' / 'pgdata'}" in err and "INFERMESH_DATABASE_URL" in err
    assert not (tmp_path / "var").exists()  # no empty database was started there to report "ok" on


def test_a_database_without_the_schema_is_named_not_migrated(
        fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("INFERMESH_DATABASE_URL", fresh_pg_url)
    code, err = _run(["verify"], capsys)
    assert code == 2 and "holds no audit log (no InferMesh migrations applied)" in err
    code, err = _run(["query"], capsys)
    assert code == 2 and "holds no audit log" in err
    migrate.upgrade(fresh_pg_url, "0006")  # an older release's schema: readers would misread it
    code, err = _run(["verify"], capsys)
    (head,) = migrate.script_heads_and_revisions()[0]
    assert code == 2 and "schema revision 0006" in err and head in err
    migrate.upgrade(fresh_pg_url)
    code, err = _run(["verify"], capsys)
    assert code == 0, err


def test_an_unreachable_database_is_one_line_without_its_password(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("INFERMESH_DATABASE_URL", "postgresql://auditor:s3cret@127.0.0.1:1/infermesh")
    code, err = _run(["query"], capsys)
    assert code == 2
    assert "cannot reach the audit database postgresql://auditor:***@127.0.0.1:1/infermesh" in err
    assert "s3cret" not in err and "Traceback" not in err


def test_a_malformed_url_is_one_line_without_its_password(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for url in ("host=127.0.0.1 port=1 password=s3cret dbname=x connect_timeout=2",
                "postgresql+psycopg://auditor:s3cret@127.0.0.1:1/x",
                "postgresql://127.0.0.1:1/x?user=auditor&password=s3cret&connect_timeout=2"):
        monkeypatch.setenv("INFERMESH_DATABASE_URL", url)
        code, err = _run(["query"], capsys)
        assert code == 2 and err.startswith("infermesh audit: ") and err.count("\n") == 1, err
        assert "s3cret" not in err and "Traceback" not in err


def test_a_newer_schema_is_not_advised_to_migrate(
        fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import psycopg

    migrate.upgrade(fresh_pg_url)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '9999'")
    monkeypatch.setenv("INFERMESH_DATABASE_URL", fresh_pg_url)
    code, err = _run(["verify"], capsys)
    assert code == 2 and "schema revision 9999" in err and "a newer release wrote it" in err


def test_export_does_not_truncate_its_output_when_there_is_no_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("INFERMESH_DATABASE_URL", raising=False)
    monkeypatch.setenv("INFERMESH_DATA_DIR", str(tmp_path / "var"))
    earlier = tmp_path / "evidence.jsonl"
    earlier.write_text('{"decision_id": "kept"}\n')
    code, _ = _run(["export", "-o", str(earlier)], capsys)
    assert code == 2 and earlier.read_text() == '{"decision_id": "kept"}\n'


def test_an_export_cut_short_leaves_the_earlier_file_and_no_partial_one(
        fresh_pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import psycopg

    import audit.api

    migrate.upgrade(fresh_pg_url)
    monkeypatch.setenv("INFERMESH_DATABASE_URL", fresh_pg_url)

    def rows_then_the_database_goes(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        yield b'{"decision_id": "first"}\n'
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(audit.api, "_jsonl", rows_then_the_database_goes)
    earlier = tmp_path / "evidence.jsonl"
    earlier.write_text('{"decision_id": "kept"}\n')
    code, err = _run(["export", "-o", str(earlier)], capsys)
    assert code != 0 and "server closed the connection" in err
    assert earlier.read_text() == '{"decision_id": "kept"}\n'  # not half of a new export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evidence.jsonl"]
    monkeypatch.undo()
    monkeypatch.setenv("INFERMESH_DATABASE_URL", fresh_pg_url)
    code, err = _run(["export", "-o", str(earlier)], capsys)
    assert code == 0 and earlier.read_text() == ""  # an empty log, exported whole
