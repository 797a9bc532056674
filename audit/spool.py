"""A durable local spool: append-only segment files of prepared batches, fsynced per batch.

Record layout: ``MAGIC (4) | length (4, big-endian) | crc32 (4) | msgpack payload``. A torn tail
(a crash in the middle of an append) fails its length or CRC check and is ignored. Segments are
numbered; the reader consumes closed segments oldest first and deletes a segment only after every
record in it has been committed to PostgreSQL, so a crash during replay replays that segment again
(harmless: the database side is idempotent on decision_id).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger(__name__)
MAGIC = b"IMA1"
_HEADER = struct.Struct(">4sII")
_pack = msgspec.msgpack.Encoder()
_unpack = msgspec.msgpack.Decoder()


def _read_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(end_offset, payload)`` for every intact record of a segment."""
    with path.open("rb") as f:
        data = f.read()
    pos = 0
    while pos + _HEADER.size <= len(data):
        magic, length, crc = _HEADER.unpack_from(data, pos)
        body = data[pos + _HEADER.size: pos + _HEADER.size + length]
        if magic != MAGIC or len(body) != length or zlib.crc32(body) != crc:
            log.warning("audit spool: ignoring torn or corrupt tail of %s at byte %d", path, pos)
            return
        pos += _HEADER.size + length
        yield pos, _unpack.decode(body)


class Spool:
    """Append-only segment files under ``directory``; one writer thread, any number of size readers.

    Attributes
    ----------
    size_bytes : int
        Bytes currently held (all segments); read lock-free by the request path.
    appended_records, replayed_records : int
        Counters for metrics.
    """

    def __init__(self, directory: Path, *, segment_bytes: int = 16 << 20) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
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
            self._active.write(record)
            self._active.flush()
            os.fsync(self._active.fileno())
            self.size_bytes += len(record)
            self.appended_records += 1
            if self._active.tell() >= self.segment_bytes:
                self._close_active()

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
        return [payload for _, payload in _read_records(path)]

    def remove_segment(self, path: Path, records: int) -> None:
        """Forget a segment whose records are all committed."""
        with self._lock:
            size = path.stat().st_size
            path.unlink()
            self.size_bytes = max(0, self.size_bytes - size)
            self.replayed_records += records

    def close(self) -> None:
        with self._lock:
            self._close_active()
