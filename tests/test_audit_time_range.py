"""``from``/``to`` read alike by ``infermesh audit`` and the auditors' HTTP API: one table, both doors.

Every row goes through ``infermesh audit query --from --to`` and ``GET /v1/decisions?from=&to=``;
each must accept it with the same bounds (what reaches the database's WHERE) or refuse it naming
the option or parameter. They used to differ: a time without a zone was UTC to the CLI and refused
by the API, and the API read numbers as Unix seconds (``20261129`` as 1970-08-23, where the CLI
read it as 2026-11-29).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from audit import database, keys
from audit.api import create_app
from audit.repository import DecisionFilter
from audit.time_range import BadBound, parse_range
from decision.cli import main
from decision.fleet import Fleet
from tests.conftest import ADMIN_URL
from tests.test_audit_store import decided_and_reported

UTC = dt.UTC


def at(day: int, hour: int = 0, minute: int = 0, micro: int = 0) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, minute, 0, micro, tzinfo=UTC)


@dataclass(frozen=True)
class Refused:
    """The value named ``name`` (``from`` or ``to``) is refused with a message containing ``says``."""

    name: str
    says: str


Expected = tuple[dt.datetime | None, dt.datetime | None] | Refused

# (from, to, what both must make of them); None: not given.
TABLE: list[tuple[str | None, str | None, Expected]] = [
    # A date alone is a UTC day: from its start; to through its end (the next day's 00:00, exclusive).
    ("2026-11-29", None, (at(29), None)),
    (None, "2026-11-29", (None, at(30))),
    ("2026-11-29", "2026-11-29", (at(29), at(30))),
    (None, "9999-12-31", (None, None)),  # through the last day there is: no upper bound
    # Date-times, with a zone or without one (UTC).
    ("2026-11-29T08:00:00Z", "2026-11-29T10:30:00+01:00", (at(29, 8), at(29, 9, 30))),
    ("2026-11-29T08:00:00", "2026-11-29T17:00", (at(29, 8), at(29, 17))),
    ("2026-11-29 08:00:00.25", "2026-11-29t09:00:00z", (at(29, 8, 0, 250_000), at(29, 9))),
    ("2026-11-29T08:00:00.000Z", None, (at(29, 8), None)),  # what the page sends (toISOString)
    ("2026-11-29T09:00:00+0100", "2026-11-29T12:00:00-05", (at(29, 8), at(29, 17))),
    ("2026-11-29T08:00:00-05:00", "2026-11-29", (at(29, 13), at(30))),
    # Numbers: neither Unix seconds (the API's old reading) nor basic-format dates (the CLI's).
    ("1764400000", None, Refused("from", "is a number")),
    ("20261129", None, Refused("from", "is a number")),
    (None, "1764400000000", Refused("to", "is a number")),
    ("-1", None, Refused("from", "is a number")),
    # Not of the forms, or no such date or time.
    ("yesterday", None, Refused("from", "is not a date (YYYY-MM-DD) or an ISO 8601 date-time")),
    ("2026-W48-7", None, Refused("from", "is not a date")),
    (None, "2026-11-29 08:00 CET", Refused("to", "is not a date")),
    (" 2026-11-29", None, Refused("from", "is not a date")),
    ("2026-02-30", None, Refused("from", "names no real date or time")),
    (None, "2026-11-29T24:00:00Z", Refused("to", "names no real date or time")),
    ("2026-11-29T08:00:00.1234567Z", None, Refused("from", "more than 6 fractional digits")),
    ("0001-01-01T00:00:00+01:00", None, Refused("from", "outside the years 1-9999")),
    # from must be before to: an empty range is a mistake, not an answer.
    ("2026-11-30", "2026-11-29", Refused("from", "is not before")),
    ("2026-11-29T08:00:00Z", "2026-11-29T08:00:00", Refused("from", "is not before")),  # no zone: UTC
    ("2026-11-29T09:00:00+01:00", "2026-11-29T07:59:59Z", Refused("from", "is not before")),
]
IDS = [f"{start}..{end}" for start, end, _ in TABLE]


@pytest.fixture(scope="module")
def log(demo_fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An audit log of its own (decisions made now), and an auditor's key for it."""
    with database.scratch_database(ADMIN_URL, "infermesh_test") as url:
        database.prepare(url)
        w, _ = decided_and_reported(url, demo_fleet, tmp_path_factory.mktemp("spool"), 4, batch_size=4)
        w.close()
        with psycopg.connect(url, autocommit=True) as conn:
            key = keys.create_key(conn, name="auditor", role="auditor")
        yield {"url": url, "key": key}


@pytest.fixture(scope="module")
def client(log: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(log["url"])) as c:
        yield c


@pytest.fixture()
def bounds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[dt.datetime | None, dt.datetime | None]]:
    """The (start, end) of every filter that reaches the database, in order: what a bound became."""
    seen: list[tuple[dt.datetime | None, dt.datetime | None]] = []
    where = DecisionFilter.where

    def recording(self: DecisionFilter) -> tuple[str, list[Any]]:
        seen.append((self.start, self.end))
        return where(self)

    monkeypatch.setattr(DecisionFilter, "where", recording)
    return seen


def _args(start: str | None, end: str | None, *, flag: str = "--") -> list[str]:
    return [*([f"{flag}from", start] if start is not None else []), *([f"{flag}to", end] if end is not None else [])]


def _params(start: str | None, end: str | None) -> dict[str, str]:
    return {k: v for k, v in (("from", start), ("to", end)) if v is not None}


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], url: str,
         *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("INFERMESH_DATABASE_URL", url)
    code = main(["audit", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(("start", "end", "expected"), TABLE, ids=IDS)
def test_the_cli_reads_from_and_to_as_the_table_says(
        start: str | None, end: str | None, expected: Expected, log: dict[str, str],
        bounds: list[tuple[dt.datetime | None, dt.datetime | None]], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _cli(monkeypatch, capsys, log["url"], "query", *_args(start, end))
    if isinstance(expected, Refused):
        assert code == 2 and err.count("\n") == 1, err  # one line, no usage block, no traceback
        assert err.startswith(f"infermesh audit query: --{expected.name}: ") and expected.says in err, err
        assert bounds == []  # refused before the log was read
    else:
        assert code == 0 and err == "", err
        assert bounds == [expected]


@pytest.mark.parametrize(("start", "end", "expected"), TABLE, ids=IDS)
def test_the_api_reads_from_and_to_as_the_table_says(
        start: str | None, end: str | None, expected: Expected, log: dict[str, str], client: TestClient,
        bounds: list[tuple[dt.datetime | None, dt.datetime | None]]) -> None:
    r = client.get("/v1/decisions", params=_params(start, end), headers={"Authorization": f"Bearer {log['key']}"})
    if isinstance(expected, Refused):
        detail = r.json()["detail"]
        # A sentence naming the parameter, as the API's other refusals ("trace: ...") are shaped.
        assert r.status_code == 422 and isinstance(detail, str), r.text
        assert detail.startswith(f"{expected.name}: ") and expected.says in detail, detail
        assert bounds == []
    else:
        assert r.status_code == 200, r.text
        assert bounds == [expected]


def test_every_command_and_route_taking_from_and_to_reads_them_alike(
        log: dict[str, str], client: TestClient, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    auth = {"Authorization": f"Bearer {log['key']}"}
    for route in ("/v1/export", "/v1/stats"):
        r = client.get(route, params={"from": "2026-11-29T08:00"}, headers=auth)
        assert r.status_code == 200, (route, r.text)  # no zone: UTC, as the CLI always took it
        r = client.get(route, params={"to": "1764400000"}, headers=auth)
        assert r.status_code == 422 and r.json()["detail"].startswith("to: '1764400000' is a number"), route
    code, _, err = _cli(monkeypatch, capsys, log["url"], "export", "--from", "2026-11-29T08:00")
    assert code == 0 and err == "", err
    for command in ("export", "verify"):
        code, out, err = _cli(monkeypatch, capsys, log["url"], command, "--to", "1764400000")
        assert code == 2 and out == "" and err.count("\n") == 1, (command, err)
        assert err.startswith(f"infermesh audit {command}: --to: '1764400000' is a number"), err
    code, out, err = _cli(monkeypatch, capsys, log["url"], "verify", "--from", "2000-01-01T00:00")  # no zone: UTC
    assert code == 0 and out.startswith("ok: 4 decisions") and "every day from 2000-01-01 on" in err, (out, err)


def test_the_cli_and_the_api_find_the_same_decisions_for_the_same_arguments(
        log: dict[str, str], client: TestClient, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with psycopg.connect(log["url"]) as conn:
        times = sorted(r[0].astimezone(UTC) for r in conn.execute("SELECT decided_at FROM decision_events"))
    first, last = times[0], times[-1]
    day = first.date()
    naive = "%Y-%m-%dT%H:%M:%S.%f"  # no zone: UTC

    def cli_ids(start: str | None, end: str | None) -> list[str]:
        out = tmp_path / "export.jsonl"
        code, _, err = _cli(monkeypatch, capsys, log["url"], "export", *_args(start, end), "-o", str(out))
        assert code == 0, err
        return [json.loads(line)["decision_id"] for line in out.read_text().splitlines()]

    def api_ids(start: str | None, end: str | None) -> list[str]:
        r = client.get("/v1/export", params=_params(start, end), headers={"Authorization": f"Bearer {log['key']}"})
        assert r.status_code == 200, r.text
        return [json.loads(line)["decision_id"] for line in r.text.splitlines()]

    cases = [((day.isoformat(), day.isoformat()), sum(t.date() == day for t in times)),
             ((first.strftime(naive), (last + dt.timedelta(microseconds=1)).strftime(naive)), len(times)),
             ((None, first.strftime(naive)), 0),  # to is exclusive
             ((last.strftime(naive), None), times.count(last)),
             (((first + dt.timedelta(microseconds=1)).isoformat(), None), sum(t > first for t in times))]
    for (start, end), found in cases:
        ids = cli_ids(start, end)
        assert len(ids) == found and ids == api_ids(start, end), (start, end, ids)


_NEAR = st.from_regex(r"\A[0-9+\-: .TtZz]{0,36}\Z")  # strings near the accepted forms, digits and separators


@settings(derandomize=True, deadline=None, database=None, max_examples=800)
@given(start=st.one_of(st.none(), st.text(max_size=40), _NEAR), end=st.one_of(st.none(), st.text(max_size=40), _NEAR))
def test_any_text_is_a_range_or_one_refusal_naming_its_parameter(start: str | None, end: str | None) -> None:
    try:
        first, last = parse_range(start, end)
    except BadBound as exc:  # nothing else escapes: not OverflowError, not a bare ValueError
        assert str(exc).startswith(("from: ", "to: ")) and "\n" not in str(exc), str(exc)
        return
    for bound, text in ((first, start), (last, end)):
        assert bound is None or bound.utcoffset() == dt.timedelta(0), (text, bound)
        assert bound is not None or text is None or text == "9999-12-31"
    assert first is None or last is None or first < last
