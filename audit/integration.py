"""The audit package's entry point for the service's composition root (``decision.service``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audit import database
from audit.api import build_router
from audit.repository import AuditRepository
from audit.settings import AuditSettings
from audit.upkeep import Upkeep
from audit.writer import make_writer

if TYPE_CHECKING:
    from decision.service import AuditParts


def build_audit_parts(config: Mapping[str, Any], *, settings: Any,
                      reload: Callable[[], str] | None = None) -> AuditParts:
    """Resolve and migrate the database, start the writer, and return ``decision.service.AuditParts``.

    ``config`` is the ``audit:`` section of the service config (keys of :class:`AuditSettings`,
    plus ``enabled``; an ``INFERMESH_AUDIT_<KEY>`` variable wins over a key); ``settings`` is
    ``decision.config.Settings`` (database URL, data dir, worker index).

    When a step fails after the writer started (the repository's pool, the partition upkeep, the
    router), what had started is stopped again, newest first, and the step's error re-raised: a
    caller that goes on (tests, ``serve --workers``) keeps no writer process or thread.
    """
    from decision.service import stop_started

    started: list[Callable[[], None]] = []
    try:
        return _start_audit_parts(config, settings, reload, started)
    except BaseException:
        stop_started(started)
        raise


def resolve_audit_settings(config: Mapping[str, Any], settings: Any) -> AuditSettings:
    """The audit settings of the ``audit:`` section under the environment, with the spool folder
    this process's: ``<data_dir>/audit-spool`` unless the section or ``INFERMESH_AUDIT_SPOOL_DIR``
    names one, in which a worker of ``serve --workers`` gets a ``worker-<i>`` folder of its own."""
    resolved = AuditSettings.from_section(config)
    if "spool_dir" not in resolved.model_fields_set:  # data_dir is per worker already
        return resolved.model_copy(update={"spool_dir": _data_dir(settings) / "audit-spool"})
    worker = getattr(settings, "worker", None)
    if worker is None:
        return resolved
    # A spool is one writer's: workers sharing a configured folder would replay and delete each
    # other's segments (the spool's lock refuses the second one).
    return resolved.model_copy(update={"spool_dir": resolved.spool_dir / f"worker-{worker}"})


def _data_dir(settings: Any) -> Path:
    """This process's data folder (``INFERMESH_DATA_DIR``; per worker under ``serve --workers``)."""
    return Path(getattr(settings, "data_dir", "var"))


def _start_audit_parts(config: Mapping[str, Any], settings: Any, reload: Callable[[], str] | None,
                       started: list[Callable[[], None]]) -> AuditParts:
    """:func:`build_audit_parts`'s steps; each part that runs until stopped is added to ``started``."""
    from decision.service import AuditParts

    audit_settings = resolve_audit_settings(config, settings)
    url = str(getattr(settings, "database_url", "") or os.environ.get("INFERMESH_DATABASE_URL", ""))
    server = None
    if not url:
        url, server = database.start_embedded(_data_dir(settings) / "pgdata")
    ensured = database.prepare(url, partitions_ahead_days=audit_settings.partitions_ahead_days)
    writer = make_writer(audit_settings.writer, url, audit_settings)
    started.append(writer.close)  # a process (threads with the thread writer) until closed
    repo = AuditRepository(url)
    started.append(repo.close)  # a connection pool and its worker threads
    # The upkeep's first round, at once, would create the partitions prepare just created: it skips them.
    upkeep = Upkeep(url, retention_days=audit_settings.retention_days,
                    days_ahead=audit_settings.partitions_ahead_days,
                    interval_s=audit_settings.upkeep_interval_s, ahead_ensured=ensured).start()
    started.append(upkeep.stop)

    def close() -> None:
        upkeep.stop()
        writer.close()
        repo.close()

    def flush() -> None:
        writer.flush()

    def health() -> dict[str, Any]:
        m = writer.metrics()
        status = "ok" if writer.db_up or (writer.batches_written == 0 and not writer.has_backlog) else "degraded"
        if m.get("spool_failing") or m.get("held_records"):  # neither the database nor the spool takes records:
            status = "degraded"  # they are held in memory only (bounded; lost if the process ends)
        return {"status": status, **m, "database": "embedded" if server is not None else "external"}

    gauges = {f"infermesh_audit_{name}": (lambda n=name: float(writer.metrics()[n])) for name in writer.metrics()}
    return AuditParts(sink=writer, reader=repo, flush=flush, close=close, routers=(build_router(repo, reload=reload),),
                      health=health, gauges=gauges, database_url=url)
