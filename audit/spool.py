"""A durable local spool: append-only segment files of prepared batches, fsynced per batch.

Record layout: ``MAGIC (4) | length (4, big-endian) | crc32 (4) | msgpack payload``. A torn tail
(a crash in the middle of an append) fails its length or CRC check; an append that fails (a full
disk) is truncated away, and the next append starts a new segment. Segments are numbered; the
reader consumes closed segments oldest first and deletes a segment only after every record in it
has been committed to PostgreSQL, so a crash during replay replays that segment again (harmless:
the database side is idempotent on decision_id). A segment with bytes that are not records is
never deleted: after its readable records are replayed it moves to ``quarantine/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger(__name__)
MAGIC = b"IMA1"
_HEADER = struct.Struct(">4sII")
_pack = msgspec.msgpack.Encoder()
_unpack = msgspec.msgpack.Decoder()


def _read_records(path: Path) -> tuple[list[Any], int]:
    """Every intact record of a segment, and how many bytes could not be read as records.

    Past a damaged record the reader looks for the next record marker, so one bad record (a torn
    append that could not be truncated away, a flipped bit) does not take the records after it along.
    """
    data = path.read_bytes()
    records: list[Any] = []
    pos = unreadable = 0
    while pos < len(data):
        if pos + _HEADER.size <= len(data):
            magic, length, crc = _HEADER.unpack_from(data, pos)
            body = data[pos + _HEADER.size: pos + _HEADER.size + length]
            if magic == MAGIC and len(body) == length and zlib.crc32(body) == crc:
                try:
                    records.append(_unpack.decode(body))
                    pos += _HEADER.size + length
                    continue
                except msgspec.DecodeError:
                    pass
        nxt = data.find(MAGIC, pos + 1)
        end = nxt if nxt >= 0 else len(data)
        log.warning("audit spool: %d unreadable bytes in %s at byte %d", end - pos, path, pos)
        unreadable += end - pos
        pos = end
    return records, unreadable


class SpoolInUse(RuntimeError):
    """Another process writes to this spool folder."""


def _lock_spool(directory: Path) -> Any:
    f = (directory / ".lock").open("a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise SpoolInUse(f"the audit spool {directory} is in use by another writer (pid {holder}); each "
                         "service process needs a spool folder of its own (audit.spool_dir, or a data directory of "
                         "its own: INFERMESH_DATA_DIR)") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def check_spool_free(directory: Path) -> None:
    """Raise :class:`SpoolInUse` if a writer holds the spool now (for a parent about to start one).

    A folder that cannot be made or opened is the writer's to report, as it would be anyway.
    """
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        lock = _lock_spool(Path(directory))
    except OSError:
        return
    lock.close()


class Spool:
    """Append-only segment files under ``directory``; one writer thread, any number of size readers.

    Attributes
    ----------
    size_bytes : int
        Bytes currently held (all segments); read lock-free by the request path.
    appended_records, replayed_records : int
        Counters for metrics.
    """

    def __init__(self, directory: Path, *, segment_bytes: int = 16 << 20, exclusive: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        # One writer per spool: a second one would append to, replay and delete the first one's
        # segments. ``exclusive=False`` is for readers (tools, tests) that only look.
        self._lock_file = _lock_spool(self.directory) if exclusive else None
        self._lock = threading.Lock()
        self._active: Any = None
        self._active_path: Path | None = None
        self._next_no = 1 + max((self._number(p) for p in self.segments()), default=0)
        self.size_bytes = sum(p.stat().st_size for p in self.segments())
        self.appended_records = 0
        self.replayed_records = 0

    @staticmethod
    def _number(p: Path) -> int:
        return int(p.stem.split("-")[1])

    def segments(self) -> list[Path]:
        """The spool's segment files, oldest first (the quarantine, a subfolder, is not among them)."""
        return sorted(self.directory.glob("segment-*.spool"), key=self._number)

    @property
    def has_backlog(self) -> bool:
        return self.size_bytes > 0

    def append(self, payload: Any) -> None:
        """Append one record and fsync it (a batch boundary)."""
        body = _pack.encode(payload)
        record = _HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body
        with self._lock:
            if self._active is None:
                self._active_path = self.directory / f"segment-{self._next_no:010d}.spool"
                self._next_no += 1
                self._active = self._active_path.open("ab")
            start = self._active.tell()
            try:
                self._active.write(record)
                self._active.flush()
                os.fsync(self._active.fileno())
            except BaseException:
                self._abandon_active(start)
                raise
            self.size_bytes += len(record)
            self.appended_records += 1
            if self._active.tell() >= self.segment_bytes:
                self._close_active()

    def _abandon_active(self, good_bytes: int) -> None:
        """After a failed append: cut the partial record off and close the segment, so the records
        appended after it start a new one (were the partial record left in the middle of a
        segment, the reader would have to skip it to reach them)."""
        f, self._active = self._active, None
        try:
            f.truncate(good_bytes)
            os.fsync(f.fileno())
        except OSError as exc:
            log.error("audit spool: could not cut a failed append off %s (%s); its reader skips it",
                      self._active_path, exc)
        finally:
            with contextlib.suppress(OSError):
                f.close()
        if good_bytes == 0 and self._active_path is not None:
            # Nothing else was in it: while the disk refuses, each retry of a held batch would
            # otherwise leave an empty segment behind.
            with contextlib.suppress(OSError):
                self._active_path.unlink()

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def oldest_segment(self) -> Path | None:
        """The oldest segment, closing the active one first if it is the only one left."""
        with self._lock:
            segs = self.segments()
            if not segs:
                return None
            if self._active_path == segs[0] and self._active is not None:
                self._close_active()
            return segs[0]

    def read_segment(self, path: Path) -> list[Any]:
        """The intact records of a segment."""
        return _read_records(path)[0]

    def read_segment_checked(self, path: Path) -> tuple[list[Any], int]:
        """The intact records of a segment and the number of bytes that are not records."""
        return _read_records(path)

    def remove_segment(self, path: Path, records: int) -> None:
        """Forget a segment whose records are all committed."""
        with self._lock:
            size = path.stat().st_size
            path.unlink()
            self.size_bytes = max(0, self.size_bytes - size)
            self.replayed_records += records

    def quarantine_segment(self, path: Path) -> Path:
        """Move a segment aside to ``quarantine/`` (kept, not replayed again); returns its new path."""
        with self._lock:
            qdir = self.directory / "quarantine"
            qdir.mkdir(exist_ok=True)
            # Never over an earlier one: numbering starts again once the spool has emptied.
            target, n = qdir / path.name, 1
            while target.exists():
                target, n = qdir / f"{path.stem}.{n}{path.suffix}", n + 1
            path.rename(target)
            self.size_bytes = sum(p.stat().st_size for p in self.segments())
            return target

    def close(self) -> None:
        with self._lock:
            self._close_active()
            if self._lock_file is not None:
                self._lock_file.close()  # releases the flock
                self._lock_file = None
