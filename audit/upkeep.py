"""The audit log's daily upkeep in the service: day partitions created ahead, retention applied.

``audit.retention_days`` (days kept, today included; 0 keeps everything) is applied by the service
itself, once at start and then every ``interval_s``, as ``infermesh audit retention --days N`` would.
Replicas and workers share one database: a session-level advisory lock lets one of them do it at a
time, and the others skip that round (the work is the same whoever does it).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable

import psycopg

from audit import partitions
from audit.database import first_line

log = logging.getLogger("infermesh.audit.upkeep")

UPKEEP_LOCK = 0x1F0A_0D17  # pg_try_advisory_lock key (migrations use their own)


def run_upkeep(url: str, *, retention_days: int, days_ahead: int,
               today: Callable[[], dt.date] = lambda: dt.datetime.now(dt.UTC).date(),
               ahead_ensured: dt.date | None = None) -> list[dt.date] | None:
    """One round: partitions ahead, then retention; the days dropped, or None if another replica held the lock.

    ``ahead_ensured`` is a day whose partitions ahead (``days_ahead``) were just created by the
    caller (:func:`audit.database.prepare` at start-up): if it is still that day, they are not
    created again.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (UPKEEP_LOCK,)).fetchone()
        if not got or not got[0]:
            return None
        try:
            day = today()
            if day != ahead_ensured:
                partitions.ensure_ahead(conn, today=day, days_ahead=days_ahead)
            if retention_days <= 0:
                return []
            return partitions.apply_retention(conn, retention_days=retention_days, today=day)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (UPKEEP_LOCK,))


class Upkeep:
    """Runs :func:`run_upkeep` in a thread: at start, then every ``interval_s``; a failed round is
    logged and tried again next time (the database may be down: the writer spools meanwhile).

    ``ahead_ensured``: the day :func:`audit.database.prepare` created the partitions ahead from at
    start-up, so that the first round does not create them a second time (see :func:`run_upkeep`).
    """

    def __init__(self, url: str, *, retention_days: int, days_ahead: int, interval_s: float = 3600.0,
                 ahead_ensured: dt.date | None = None) -> None:
        self.url = url
        self.retention_days = retention_days
        self.days_ahead = days_ahead
        self.interval_s = interval_s
        self._ahead_ensured = ahead_ensured  # for the first round only
        self.rounds = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-upkeep", daemon=True)

    def start(self) -> Upkeep:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                ensured, self._ahead_ensured = self._ahead_ensured, None
                dropped = run_upkeep(self.url, retention_days=self.retention_days, days_ahead=self.days_ahead,
                                     ahead_ensured=ensured)
                self.rounds += 1
                if dropped:
                    log.info("audit retention (%d days kept): dropped the day partitions %s", self.retention_days,
                             ", ".join(d.isoformat() for d in dropped))
            except Exception as exc:  # psycopg errors, a lost connection: next round
                self.failures += 1
                log.warning("audit upkeep failed (tried again in %.0f s): %s", self.interval_s, first_line(exc))
            if self._stop.wait(self.interval_s):
                return

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
