"""Socket reads of at most 64 KiB.

A ``recv(n)`` makes an ``n``-byte bytes object first and shrinks it to what arrived. glibc serves
an allocation of 128 KiB or more with ``mmap``, so every read that asked for more mapped memory,
faulted a page in and gave it back: on this machine a 600-byte message over a socket pair took
~27 µs to read with ``recv(1 << 20)`` against ~5 µs with ``recv(1 << 16)``, and ~50-80 µs against
~26 µs through an asyncio stream, whose transports read 256 KiB at a time. The service's split
server, its gRPC front and the ext_proc server read one small message at a time, so they paid that
on nearly every read. A read returns what has arrived: a smaller limit only means one more read
when more than 64 KiB is waiting.
"""

from __future__ import annotations

from typing import Any

READ_SIZE = 1 << 16


def read_small(transport: Any) -> None:
    """Make an asyncio socket transport read at most :data:`READ_SIZE` bytes per ``recv``.

    ``max_size`` is how much CPython's selector transports ask ``recv`` for (a class attribute,
    256 KiB); setting it on one transport changes only that one. A transport without it (TLS reads
    into a buffer it keeps, so it allocates nothing per read) is left as it is.

    >>> class Plain:
    ...     max_size = 256 * 1024
    >>> t = Plain()
    >>> read_small(t)
    >>> t.max_size, Plain.max_size
    (65536, 262144)
    """
    if isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = READ_SIZE
