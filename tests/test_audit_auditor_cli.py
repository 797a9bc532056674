"""The auditors' documented CLI workflows, as an auditor runs them: keys, exports, verify, which database."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import psycopg
import pytest

from audit import database, keys
from decision.cli import main
from decision.fleet import Fleet
from tests.test_audit_store import decided_and_reported


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str | None,
         *args: str) -> tuple[int, str, str]:
    """``infermesh audit ARGS`` with ``INFERMESH_DATABASE_URL`` set to ``url`` (unset if ``None``)."""
    if url is None:
        monkeypatch.delenv("INFERMESH_DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv("INFERMESH_DATABASE_URL", url)
    code = main(["audit", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def db(fresh_pg_url: str) -> str:
    database.prepare(fresh_pg_url)
    return fresh_pg_url


def test_keys_create_names_the_key_id_and_revoke_takes_the_id_the_prefix_or_the_key(
        db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    made = []
    for name in ("by-id", "by-prefix", "by-key"):
        code, out, err = _cli(monkeypatch, capsys, db, "keys", "create", "--name", name)
        secret = out.strip()
        assert code == 0 and out.count("\n") == 1 and secret.startswith("imk_")  # stdout: the key alone
        key_id = secret.split("_")[1]
        assert f"key id {key_id} " in err and "shown this once" in err and secret not in err
        made.append((key_id, secret))
    (id1, _), (id2, _), (id3, key3) = made
    for given, key_id in ((id1, id1), (f"imk_{id2}", id2), (key3, id3)):
        code, out, err = _cli(monkeypatch, capsys, db, "keys", "revoke", given)
        assert code == 0 and f"revoked key {key_id}" in out, (given, out, err)
        assert key3 not in out + err  # a whole key given is never echoed
    with psycopg.connect(db) as conn:
        for key_id, secret in made:
            assert keys.lookup(conn, secret=secret) is None, key_id  # revoked, so the API refuses it
    code, out, err = _cli(monkeypatch, capsys, db, "keys", "revoke", id1)
    assert code == 1 and f"key {id1} was already revoked" in err
    code, _, err = _cli(monkeypatch, capsys, db, "keys", "revoke", "0badc0de")
    assert code == 1 and "no key with id 0badc0de" in err
    code, _, err = _cli(monkeypatch, capsys, db, "keys", "revoke", "imk_")
    assert code == 2 and "KEY" in err


def test_revoking_with_a_mistyped_whole_key_revokes_nothing(
        db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _cli(monkeypatch, capsys, db, "keys", "create", "--name", "x")
    secret = out.strip()
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    code, out, err = _cli(monkeypatch, capsys, db, "keys", "revoke", wrong)
    assert code == 1 and "is not that key" in err and wrong not in out + err
    with psycopg.connect(db) as conn:
        assert keys.lookup(conn, secret=secret) is not None


def test_keys_list_shows_every_key_without_its_hash(
        db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        a = keys.create_key(conn, name="alice", role="auditor")
        b = keys.create_key(conn, name="ops", role="admin", tenant="acme")
        assert keys.revoke_key(conn, key_id=keys.key_ref(a)[0])
        hashes = [r[0] for r in conn.execute("SELECT key_hash FROM api_keys")]
    code, out, _ = _cli(monkeypatch, capsys, db, "keys", "list", "--json")
    assert code == 0
    listed = json.loads(out)
    assert [(k["key_id"], k["name"], k["role"], k["tenant"]) for k in listed] == [
        (keys.key_ref(a)[0], "alice", "auditor", None), (keys.key_ref(b)[0], "ops", "admin", "acme")]
    assert listed[0]["revoked_at"] is not None and listed[1]["revoked_at"] is None
    assert all(k["created_at"] for k in listed)
    code, table, _ = _cli(monkeypatch, capsys, db, "keys", "list")
    assert code == 0 and table.splitlines()[0].split() == ["KEY_ID", "NAME", "ROLE", "TENANT", "CREATED", "REVOKED"]
    row = next(line for line in table.splitlines() if line.startswith(keys.key_ref(b)[0]))
    assert row.split()[1:4] == ["ops", "admin", "acme"] and row.split()[-1] == "-"
    for text in (out, table):
        assert a not in text and b not in text and not any(h in text for h in hashes)


def test_export_traces_are_json_lines_only_and_csv_with_trace_is_refused(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    w, _ = decided_and_reported(db, demo_fleet, tmp_path / "spool", 3, batch_size=3)
    w.close()
    earlier = tmp_path / "evidence.csv"
    earlier.write_text("kept\n")
    code, out, err = _cli(monkeypatch, capsys, db, "export", "--format", "csv", "--trace", "-o", str(earlier))
    assert code == 2 and out == "" and "--trace: traces are exported as JSON lines only" in err
    assert earlier.read_text() == "kept\n"  # the refusal came before anything was written
    code, out, _ = _cli(monkeypatch, capsys, db, "export", "--trace")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 3 and all("stages" in r["trace"] for r in rows)


def test_verify_takes_times_like_query_as_the_whole_utc_days_they_fall_in(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    w, _ = decided_and_reported(db, demo_fleet, tmp_path / "spool", 3, batch_size=3)
    w.close()
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT DISTINCT (decided_at AT TIME ZONE 'UTC')::date FROM decision_events").fetchone()
    assert row is not None
    day: dt.date = row[0]
    nxt = day + dt.timedelta(days=1)
    code, out, err = _cli(monkeypatch, capsys, db, "verify", "--from", f"{day}T00:00:00Z")
    assert code == 0 and out.startswith("ok: 3 decisions") and f"every day from {day} on" in err, (out, err)
    # 23:30 the day before in UTC-05:00 is day's 04:30 UTC; an exclusive end at the next midnight ends with day.
    code, out, err = _cli(monkeypatch, capsys, db, "verify", "--from", f"{day - dt.timedelta(days=1)}T23:30:00-05:00",
                          "--to", f"{nxt}T00:00:00+00:00")
    assert code == 0 and out.startswith("ok: 3 decisions") and " over 1 days" in out and f"the day {day}" in err
    code, out, _ = _cli(monkeypatch, capsys, db, "verify", "--from", day.isoformat(), "--to", day.isoformat())
    assert code == 0 and out.startswith("ok: 3 decisions")  # a date alone, as before
    code, out, _ = _cli(monkeypatch, capsys, db, "verify", "--to", f"{day}T00:00:00Z")  # exclusive: day is not in it
    assert code == 0 and out.startswith("ok: 0 decisions")
    code, out, err = _cli(monkeypatch, capsys, db, "verify", "--from", f"{nxt}T10:00:00Z", "--to", f"{nxt}T00:00:00Z")
    assert code == 2 and "after --to" in err and "ok" not in out
    for flag, bad in (("--from", "2026-11-29 08:00 CET"), ("--to", "yesterday"), ("--to", "0001-01-01T00:00:00Z"),
                      ("--from", "20261129")):
        code, out, err = _cli(monkeypatch, capsys, db, "verify", flag, bad)
        # One line naming the option, as query and export say it (audit.time_range reads all three).
        assert code == 2 and out == "" and err.startswith(f"infermesh audit verify: {flag}: {bad!r}"), err
        assert err.count("\n") == 1 and "Traceback" not in err and "fromisoformat" not in err


def test_every_audit_command_takes_database_url_before_the_environment(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    w, made = decided_and_reported(db, demo_fleet, tmp_path / "spool", 2, batch_size=2)
    w.close()
    monkeypatch.setenv("INFERMESH_DATA_DIR", str(tmp_path / "var"))  # no embedded log there
    dead = "postgresql://nobody:s3cret@127.0.0.1:1/none?connect_timeout=2"
    for env in (None, dead):  # unset, or set to another database: --database-url wins, as in learn evaluate
        for argv, want in ((["why", made[0].decision_id], 0), (["query"], 0), (["export"], 0), (["verify"], 0),
                           (["checkpoint"], 0), (["keys", "list"], 0), (["keys", "revoke", "0badc0de"], 1),
                           (["retention", "--days", "3650"], 0)):
            code, out, err = _cli(monkeypatch, capsys, env, *argv, "--database-url", db)
            assert code == want, (env, argv, err)
        code, out, _ = _cli(monkeypatch, capsys, env, "query", "--database-url", db)
        assert all(m.decision_id in out for m in made)
    code, _, err = _cli(monkeypatch, capsys, db, "query", "--database-url", dead)
    assert code == 2 and "cannot reach the audit database postgresql://nobody:***@127.0.0.1:1" in err
    assert "s3cret" not in err
    code, _, err = _cli(monkeypatch, capsys, None, "query", "--database-url", "")  # empty: as if not given
    assert code == 2 and f"no audit log under {tmp_path / 'var' / 'pgdata'}" in err
    assert not (tmp_path / "var").exists()


def test_database_url_names_an_unmigrated_database_and_migrates_nothing(
        fresh_pg_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(monkeypatch, capsys, None, "verify", "--database-url", fresh_pg_url)
    assert code == 2 and "holds no audit log (no InferMesh migrations applied)" in err
    with psycopg.connect(fresh_pg_url) as conn:
        assert conn.execute("SELECT to_regclass('alembic_version')").fetchone() == (None,)


def test_query_limit_help_states_both_bounds_and_the_cli_takes_its_own(
        db: str, demo_fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["audit", "query", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "1-10000" in text and "at most 500" in text and "--database-url" in text
    w, _ = decided_and_reported(db, demo_fleet, tmp_path / "spool", 3, batch_size=3)
    w.close()
    code, out, _ = _cli(monkeypatch, capsys, db, "query", "--limit", "10000")  # past the API's 500
    assert code == 0 and len(out.splitlines()) == 3 and "more:" not in out
    code, out, _ = _cli(monkeypatch, capsys, db, "query", "--limit", "2")
    assert code == 0 and out.splitlines()[-1].startswith("more: --cursor ")
    with pytest.raises(SystemExit) as exit_:
        _cli(monkeypatch, capsys, db, "query", "--limit", "10001")
    assert exit_.value.code == 2 and "--limit" in capsys.readouterr().err
