"""Socket reads stay under malloc's mmap threshold (decision/read_size.py)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from decision.read_size import READ_SIZE, read_small


async def _first_read(small: bool, waiting: int) -> int:
    a, b = socket.socketpair()
    try:
        a.sendall(b"x" * waiting)  # all of it in b's receive buffer before the first read
        reader, writer = await asyncio.open_unix_connection(sock=b)
        if small:
            read_small(writer.transport)
        data = await reader.read(1 << 20)  # the stream hands over what one transport read took
        writer.close()
        return len(data)
    finally:
        a.close()


@pytest.mark.parametrize("small", [True, False])
def test_an_asyncio_transport_reads_what_read_small_allows(small: bool) -> None:
    # The canary for CPython's ``max_size``: if a release renames it, read_small stops working
    # silently, and this fails.
    waiting = 3 * READ_SIZE // 2
    got = asyncio.run(_first_read(small, waiting))
    assert got == (READ_SIZE if small else waiting)
