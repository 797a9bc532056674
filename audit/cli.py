"""``infermesh audit why|query|export|verify|checkpoint|keys|retention``."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import psycopg

from audit import checkpoint, database, keys, partitions
from audit.repository import AuditRepository, BadCursor, DecisionFilter
from audit.time_range import FROM_HELP, TO_HELP, BadBound, parse_range, parse_when
from audit.verify import verify
from audit.why import render_text
from decision.cli_args import bounded_int

SubParsers = "argparse._SubParsersAction[argparse.ArgumentParser]"


class DayBound(NamedTuple):
    """A bound of ``audit verify``: the UTC day, and the time given for it (``None``: a date was given)."""

    day: dt.date
    time: str | None


def _day_bound(text: str | None, *, name: str, end: bool) -> DayBound | None:
    """A date, or a time (UTC if no zone) standing for the UTC day it falls in: hash chains are per day
    partition, each verified from its start, so ``verify`` takes whole days. ``--to`` is exclusive as a
    time, as in ``query``: ``--to 2026-11-30T00:00:00Z`` ends with 2026-11-29.

    Raises
    ------
    BadBound
        What ``query`` refuses (the same parser), or an exclusive end at the first instant there is.
    """
    if text is None:
        return None
    when = parse_when(text, name=name)
    if not isinstance(when, dt.datetime):
        return DayBound(when, None)
    try:
        return DayBound((when - dt.timedelta(microseconds=1) if end else when).date(), text)
    except OverflowError:  # 0001-01-01T00:00:00Z as an exclusive end: no day before it
        raise BadBound(f"{name}: {text!r}, an exclusive end, leaves no UTC day before it") from None


def _days_text(start: DayBound | None, end: DayBound | None) -> str:
    """The UTC days ``start``..``end`` name, in words."""
    if start is not None and end is not None:
        return f"the day {start.day}" if start.day == end.day else f"the days {start.day} to {end.day}"
    if start is not None:
        return f"every day from {start.day} on"
    return "every day" if end is None else f"every day through {end.day}"


def _day_range(first: DayBound | None, last: DayBound | None, command: str,
               why: str) -> tuple[dt.date | None, dt.date | None] | None:
    """The UTC days ``first`` to ``last`` stand for; None, said on stderr, when ``first`` is after
    ``last`` (the command would cover nothing and say ok). Where a bound is a time, says on stderr
    which whole days it covers, and ``why`` it takes whole days."""
    if first is not None and last is not None and first.day > last.day:
        since = str(first.day) if first.time is None else f"{first.day} (the UTC day of {first.time})"
        until = str(last.day) if last.time is None else f"{last.day} (the last UTC day before {last.time})"
        print(f"infermesh audit {command}: --from {since} is after --to {until}", file=sys.stderr)
        return None
    if any(b is not None and b.time is not None for b in (first, last)):
        print(f"{command} takes whole UTC days ({why}): {_days_text(first, last)}", file=sys.stderr)
    return (None if first is None else first.day), (None if last is None else last.day)


def _add_filters(p: argparse.ArgumentParser) -> None:
    # Parsed by the command, not argparse: a bad value is one line naming the option, as the API's 422
    # names the parameter, and is read by the same parse_range.
    p.add_argument("--from", dest="start", metavar="WHEN", help=f"decisions {FROM_HELP}")
    p.add_argument("--to", dest="end", metavar="WHEN", help=f"decisions {TO_HELP}")
    for name in ("tenant", "region", "site", "model", "endpoint", "rule"):
        p.add_argument(f"--{name}")
    p.add_argument("--tier", choices=["datacenter", "edge", "device"])
    p.add_argument("--status", choices=["routed", "denied", "quota_denied"])
    p.add_argument("--outcome", choices=["ok", "error", "timeout", "cancelled", "none"])


def _filters(a: argparse.Namespace) -> DecisionFilter:
    """The command's filters; ``BadBound`` for a ``--from``/``--to`` the API would refuse as well."""
    start, end = parse_range(a.start, a.end, from_name="--from", to_name="--to")
    return DecisionFilter(start=start, end=end, tenant=a.tenant, region=a.region, site=a.site,
                          tier=a.tier, model=a.model, endpoint=a.endpoint, rule=a.rule, status=a.status,
                          outcome_status=a.outcome)


def register(sub: Any) -> None:
    """Add ``infermesh audit ...`` to the top-level subparsers."""
    audit = sub.add_parser("audit", help="query, export and verify the decision audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT")
    p = asub.add_parser("why", help="why a decision went where it went")
    p.add_argument("decision_id")
    p.add_argument("--json", action="store_true", help="the stored event, trace and outcome as JSON")
    _add_database_url(p)
    p.set_defaults(func=_reporting(cmd_why))
    p = asub.add_parser("query", help="list decisions, newest first")
    _add_filters(p)
    # The HTTP API caps a page at 500 (a shared server); this reads the database itself for one person.
    p.add_argument("--limit", type=bounded_int(1, 10_000), default=20,
                   help="rows per page, 1-10000 (default 20; the HTTP API's /v1/decisions pages hold at most 500: "
                        "this command reads the database directly). A last line `more: --cursor C` means there "
                        "are more; `export` writes every match at once")
    p.add_argument("--cursor", help="the value a previous page's `more: --cursor` line gave, with the same filters")
    _add_database_url(p)
    p.set_defaults(func=_reporting(cmd_query))
    p = asub.add_parser("export", help="export decisions as JSON lines or CSV")
    _add_filters(p)
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--trace", action="store_true",
                   help="include each decision's full trace (JSON lines only: refused with --format csv)")
    p.add_argument("--output", "-o", default="-")
    _add_database_url(p)
    p.set_defaults(func=_reporting(cmd_export))
    p = asub.add_parser("verify", help="recompute the hash chains; report the first broken link")
    p.add_argument("--from", dest="start", metavar="WHEN",
                   help="first UTC day: YYYY-MM-DD, or an ISO 8601 date-time as `query` takes it (UTC if no zone) "
                        "for the whole day it falls in (hash chains are verified a day partition at a time)")
    p.add_argument("--to", dest="end", metavar="WHEN",
                   help="last UTC day, inclusive: YYYY-MM-DD, or an ISO 8601 date-time, exclusive as in `query` "
                        "(up to 2026-11-30T00:00:00Z ends with 2026-11-29), for the whole day before it")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="also require the chain heads recorded by `audit checkpoint` (catches deleted tails "
                        "and rewritten chains)")
    _add_database_url(p)
    p.set_defaults(func=_reporting(cmd_verify))
    p = asub.add_parser("checkpoint", help="write every hash chain's head, to keep outside the database")
    p.add_argument("--from", dest="start", metavar="WHEN",
                   help="first UTC day whose chain heads to write (default: the oldest), as `verify --from` takes it")
    p.add_argument("--to", dest="end", metavar="WHEN",
                   help="last UTC day, inclusive (default: the newest), as `verify --to` takes it")
    p.add_argument("--output", "-o", default="-", help="file to write (default: stdout)")
    _add_database_url(p)
    p.set_defaults(func=_reporting(cmd_checkpoint))
    p = asub.add_parser("keys", help="create, list or revoke auditors' API keys",
                        description="API keys for the auditors' HTTP API. A key reads imk_<KEY_ID>_<secret>: "
                                    "the key id names it in `keys list`, `keys revoke` and the access log; "
                                    "the whole key is printed once, by `keys create`, and only its hash is kept.")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="KEYS")
    k = ksub.add_parser("create", help="create a key: prints the key (once) and, on stderr, its key id",
                        description="Create a key. stdout gets the key alone (KEY=$(... keys create ...) "
                                    "works); stderr names its key id, which `keys list` shows and `keys "
                                    "revoke` takes. The key is shown this once: only its hash is stored.")
    k.add_argument("--name", required=True, help="who or what the key is for (shown by `keys list`)")
    k.add_argument("--role", choices=list(keys.ROLES), default="auditor",
                   help="auditor reads; admin may also apply retention and reload the policy bundle")
    k.add_argument("--tenant", help="restrict the key to one tenant")
    _add_database_url(k)
    k.set_defaults(func=_reporting(cmd_keys_create))
    k = ksub.add_parser("list", help="every key: id, name, role, tenant scope, created, revoked",
                        description="Every key, revoked ones too, oldest first: key id, name, role, tenant "
                                    "scope (* for every tenant), when it was created and revoked. Never the "
                                    "key or its hash.")
    k.add_argument("--json", action="store_true", help="one JSON array of objects instead of the table")
    _add_database_url(k)
    k.set_defaults(func=_reporting(cmd_keys_list))
    k = ksub.add_parser("revoke", help="revoke a key, named by its key id, its imk_<KEY_ID> prefix or the whole key",
                        description="Revoke a key. KEY is its key id (as `keys create` and `keys list` print "
                                    "it), the imk_<KEY_ID> prefix, or the whole key (then only if it is that "
                                    "key's). Exit 1 when there is no such active key.")
    k.add_argument("key", metavar="KEY", help="key id, imk_<KEY_ID>, or the whole key")
    _add_database_url(k)
    k.set_defaults(func=_reporting(cmd_keys_revoke))
    p = asub.add_parser("retention", help="drop day partitions older than N days")
    p.add_argument("--days", type=_days, required=True, help="days kept, today included (>= 1)")
    _add_database_url(p)
    p.set_defaults(func=_reporting(cmd_retention))


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if days < 1:  # 0 would drop today's partition, a negative number those created ahead as well
        raise argparse.ArgumentTypeError(f"must be >= 1 (today is always kept), got {days}")
    if days > 36_500:  # a cutoff before year 1 overflows a date
        raise argparse.ArgumentTypeError(f"must be <= 36500 (a hundred years), got {days}")
    return days


def _add_database_url(p: argparse.ArgumentParser) -> None:
    p.add_argument("--database-url", default="", metavar="URL",
                   help="the audit log's PostgreSQL URL (default: INFERMESH_DATABASE_URL, else the embedded log "
                        "under INFERMESH_DATA_DIR), as `learn evaluate --database-url` takes it")


def _url(a: argparse.Namespace) -> str:
    """The existing audit log: ``--database-url``, else ``INFERMESH_DATABASE_URL``, else the embedded one
    (never a new or migrated one: see ``database.open_existing``), as ``learn evaluate`` picks it."""
    if a.database_url:
        database.check_schema(a.database_url)  # what open_existing checks: reachable, at this release's schema
        return str(a.database_url)
    url, _server = database.open_existing()
    return url


def _reporting(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``cmd`` with a missing or unreachable audit log reported in one line (exit 2), not a traceback."""

    @functools.wraps(cmd)
    def run(a: argparse.Namespace) -> int:
        try:
            return cmd(a)
        except BadBound as exc:  # raised before the log is opened: the commands parse their bounds first
            print(f"infermesh audit {a.audit_command}: {exc}", file=sys.stderr)
        except database.NoAuditLog as exc:
            print(f"infermesh audit: {exc}", file=sys.stderr)
        except psycopg.Error as exc:  # lost mid-command, or refused (permissions)
            print(f"infermesh audit: the audit database failed: {database.first_line(exc)}", file=sys.stderr)
        return 2

    return run


def cmd_why(a: argparse.Namespace) -> int:
    repo = AuditRepository(_url(a))
    try:
        d = repo.get_decision(a.decision_id)
    finally:
        repo.close()
    if d is None:
        print(f"no decision {a.decision_id!r} in the audit log", file=sys.stderr)
        return 1
    print(msgspec.json.encode(d).decode() if a.json else render_text(d))
    return 0


def cmd_query(a: argparse.Namespace) -> int:
    filters = _filters(a)
    repo = AuditRepository(_url(a))
    try:
        rows, nxt = repo.list_decisions(filters=filters, cursor=a.cursor, limit=a.limit)
    except BadCursor:
        print(f"--cursor {a.cursor!r}: not a cursor this command printed (pass its 'more: --cursor' value)",
              file=sys.stderr)
        return 2
    finally:
        repo.close()
    for r in rows:
        print(f"{r['decided_at']}  {r['decision_id']}  {r['tenant']:<12} {r['model']:<16} {r['status']:<12} "
              f"{r['endpoint_id'] or ','.join(r['deny_rules'])}  {r['outcome_status'] or '-'}")
    if nxt:
        print(f"more: --cursor {nxt}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from audit.api import _csv, _jsonl

    if a.trace and a.format == "csv":  # a CSV has no column for traces: dropping them silently misled
        print("infermesh audit export: --trace: traces are exported as JSON lines only; use --format jsonl "
              "(the default) with --trace, or --format csv without it", file=sys.stderr)
        return 2
    filters = _filters(a)
    url = _url(a)  # before the output is opened: a missing log must not truncate an existing file
    # Into a partial file renamed at the end: an export cut short (the database gone mid-stream) must
    # not leave a file that looks like a complete export of what was asked for.
    if a.output != "-" and (not Path(a.output).name or Path(a.output).is_dir()):  # ".", "/", "", a folder
        print(f"{a.output or repr(a.output)}: is a directory; name the file to write", file=sys.stderr)
        return 2
    partial = None if a.output == "-" else Path(a.output).with_name(Path(a.output).name + ".partial")
    try:
        out = sys.stdout.buffer if partial is None else partial.open("wb")
    except OSError as exc:
        print(f"{a.output}: {exc.strerror}", file=sys.stderr)
        return 2
    repo = AuditRepository(url)
    done = False
    try:
        if a.format == "csv":
            for s in _csv(repo, filters):
                out.write(s.encode())
        else:
            for b in _jsonl(repo, filters, a.trace):
                out.write(b)
        done = True
    finally:
        if partial is not None:
            out.close()
            if done:
                os.replace(partial, a.output)
            else:
                partial.unlink(missing_ok=True)
        repo.close()
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    first, last = _day_bound(a.start, name="--from", end=False), _day_bound(a.end, name="--to", end=True)
    heads = None
    if a.checkpoint:  # read first: a bad file is the auditor's to fix before anything is walked
        try:
            with open(a.checkpoint, "rb") as f:
                data = f.read()
            heads = checkpoint.parse_heads(data.decode("utf-8").splitlines(), a.checkpoint)
        except OSError as exc:
            print(f"{a.checkpoint}: {exc.strerror}", file=sys.stderr)
            return 2
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            print(f"{a.checkpoint}:{line}: not UTF-8 text", file=sys.stderr)
            return 2
        except checkpoint.CheckpointError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    days = _day_range(first, last, "verify", "each day's hash chains are checked from their start")
    if days is None:
        return 2
    start, end = days
    url = _url(a)
    report = verify(url, start=start, end=end)
    if report.broken is not None:
        print(f"FAILED after {report.rows} rows: {report.broken}")
        return 1
    print(f"ok: {report.rows} decisions in {report.chains} chains over {len(report.days)} days verified"
          + (f" (and {report.decision_duplicates} links of decisions submitted again)"
             if report.decision_duplicates else "") + "; "
          f"{report.outcome_rows} outcomes in {report.outcome_chains} chains verified"
          + (f", {report.outcome_conflicts} of them second outcomes of a decision" if report.outcome_conflicts else "")
          + (f" ({report.unchained_outcomes} older outcomes carry no chain)" if report.unchained_outcomes else ""))
    if heads is None:
        return 0
    cp = checkpoint.check_heads(url, heads, start=start, end=end)
    for problem in cp.problems:
        print(f"FAILED: {problem}")
    retired = f"; {cp.retired} on days retention has dropped" if cp.retired else ""
    print(f"{'ok' if cp.ok else 'FAILED'}: {cp.checked} of the checkpoint's chain heads found as recorded{retired}")
    return 0 if cp.ok else 1


def cmd_checkpoint(a: argparse.Namespace) -> int:
    days = _day_range(_day_bound(a.start, name="--from", end=False), _day_bound(a.end, name="--to", end=True),
                      "checkpoint", "a chain's head is its day's last link")
    if days is None:
        return 2
    heads = checkpoint.chain_heads(_url(a), start=days[0], end=days[1])
    text = checkpoint.render(heads, dt.datetime.now(dt.UTC))
    if a.output == "-":
        sys.stdout.write(text)
    else:
        try:
            with open(a.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            print(f"{a.output}: {exc.strerror}", file=sys.stderr)
            return 2
        print(f"{len(heads)} chain heads written to {a.output}; keep it where the database's administrators "
              "cannot write", file=sys.stderr)
    return 0


def cmd_keys_create(a: argparse.Namespace) -> int:
    with psycopg.connect(_url(a), autocommit=True) as conn:
        secret = keys.create_key(conn, name=a.name, role=a.role, tenant=a.tenant)
    key_id, _ = keys.key_ref(secret)
    # The key alone on stdout, so a script can capture it; what a person needs beside it on stderr.
    print(secret)
    scope = f"tenant {a.tenant}" if a.tenant is not None else "every tenant"
    print(f"key id {key_id} ({a.name}, {a.role}, {scope}). The key above is shown this once: only its hash is "
          f"stored. Revoke it with `infermesh audit keys revoke {key_id}`.", file=sys.stderr)
    return 0


def _time_text(t: dt.datetime | None) -> str:
    return "-" if t is None else t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def cmd_keys_list(a: argparse.Namespace) -> int:
    with psycopg.connect(_url(a), autocommit=True) as conn:
        found = keys.list_keys(conn)
    if a.json:
        print(msgspec.json.encode([k.as_dict() for k in found]).decode())
        return 0
    rows = [("KEY_ID", "NAME", "ROLE", "TENANT", "CREATED", "REVOKED")]
    rows += [(k.key_id, k.name, k.role, k.tenant if k.tenant is not None else "*", _time_text(k.created_at),
              _time_text(k.revoked_at)) for k in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_keys_revoke(a: argparse.Namespace) -> int:
    # Messages name the key id only: a whole key given here is a secret, and stderr ends up in logs.
    try:
        key_id, secret = keys.key_ref(a.key)
    except ValueError as exc:
        print(f"infermesh audit keys revoke: KEY: {exc}; give the key id `keys create` and `keys list` print",
              file=sys.stderr)
        return 2
    with psycopg.connect(_url(a), autocommit=True) as conn:
        ok = keys.revoke_key(conn, key_id=key_id, secret=secret)
        info = keys.get_key(conn, key_id=key_id)
    if ok:
        print(f"revoked key {key_id}" + (f" ({info.name}, {info.role})" if info is not None else ""))
        return 0
    if info is None:
        why = f"no key with id {key_id} (`infermesh audit keys list` shows every key)"
    elif info.revoked_at is not None:
        why = f"key {key_id} was already revoked at {_time_text(info.revoked_at)}"
    else:
        why = f"key {key_id} is active, but what was given is not that key (mistyped?); nothing revoked"
    print(f"not revoked: {why}", file=sys.stderr)
    return 1


def cmd_retention(a: argparse.Namespace) -> int:
    with psycopg.connect(_url(a), autocommit=True) as conn:
        dropped = partitions.apply_retention(conn, retention_days=a.days)
    print(f"dropped {len(dropped)} day partitions: {', '.join(d.isoformat() for d in dropped) or '-'}")
    return 0
