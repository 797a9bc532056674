"""A session-mode connection pooler (as pgbouncer's ``pool_mode = session``) in front of the test PostgreSQL.

A client gets a server connection (a backend) for as long as it stays connected; when it goes, the
backend is reset (``DISCARD ALL``: its session settings and advisory locks go) and handed to the next
client that connects. So one backend, one pid and one ``backend_start``, serves several clients in
turn, which is what a test of "is this session mine?" needs. :meth:`SessionPooler.drop_client` is a
client connection the pooler gave up on (its keepalives found it gone) while the client never learnt.

Only what psycopg does against a trust-authenticated server is spoken: the startup (an SSL or GSS
encryption request is declined), then messages relayed as they are, a client's Terminate kept from
the backend.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from dataclasses import dataclass, field

from tests.pg_proxy import LocalFront

_ENCRYPTION_REQUESTS = (80877103, 80877104)  # SSLRequest, GSSENCRequest: both answered 'N'
_CANCEL_REQUEST = 80877102


@dataclass
class _Backend:
    """A server connection and what its startup said, replayed to each client it is handed to."""

    sock: socket.socket
    welcome: bytes  # ParameterStatus and BackendKeyData messages, as the server sent them


@dataclass
class _Client:
    sock: socket.socket
    backend: _Backend
    gone: threading.Event = field(default_factory=threading.Event)  # the pooler gives up on it
    done: threading.Event = field(default_factory=threading.Event)  # its backend is back in the pool


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    """One typed message: (its type byte, the whole message as sent)."""
    head = _read_exactly(sock, 5)
    (length,) = struct.unpack("!i", head[1:])
    return head[:1], head + _read_exactly(sock, length - 4)


def _read_startup(sock: socket.socket) -> bytes | None:
    """The client's StartupMessage as sent (encryption declined first); None for a CancelRequest."""
    while True:
        (length,) = struct.unpack("!i", _read_exactly(sock, 4))
        body = _read_exactly(sock, length - 4)
        (code,) = struct.unpack("!i", body[:4])
        if code in _ENCRYPTION_REQUESTS:
            sock.sendall(b"N")
            continue
        if code == _CANCEL_REQUEST:
            return None
        return struct.pack("!i", length) + body


class SessionPooler(LocalFront):
    """Pools server connections of ``url``'s server for clients of :meth:`url`, one client per backend at a time.

    Parameters
    ----------
    url
        A libpq URL of the real server (host and port are taken from it; trust authentication).
    """

    def __init__(self, url: str) -> None:
        self._lock = threading.Lock()
        self._idle: list[_Backend] = []
        self._backends: list[_Backend] = []
        self.clients: list[_Client] = []  # in the order they connected
        super().__init__(url, "pg-pooler")

    def drop_client(self, index: int = -1) -> None:
        """Give up on client ``index`` (reset, RST, on its side), and pool its backend once reset."""
        client = self.clients[index]
        client.gone.set()
        if not client.done.wait(10):
            raise TimeoutError("the pooler did not get the backend back")

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        with self._lock:
            socks = [b.sock for b in self._backends] + [c.sock for c in self.clients]
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()

    def _accepted(self, client: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            startup = _read_startup(sock)
            if startup is None:
                sock.close()
                return
            with self._lock:
                backend = self._idle.pop() if self._idle else None
            if backend is None:
                backend = self._open(startup)
            sock.sendall(struct.pack("!cii", b"R", 8, 0) + backend.welcome + struct.pack("!cic", b"Z", 5, b"I"))
            client = _Client(sock, backend)
            with self._lock:
                self.clients.append(client)
        except (OSError, ConnectionError):
            sock.close()
            return
        self._relay(client)

    def _open(self, startup: bytes) -> _Backend:
        """A new server connection, started with the first client's startup message."""
        server = socket.create_connection(self._target)
        server.sendall(startup)
        welcome = b""
        while True:
            kind, message = _read_message(server)
            if kind == b"R" and message[5:9] != struct.pack("!i", 0):
                raise ConnectionError("the pooler speaks trust authentication only")
            if kind in (b"S", b"K"):
                welcome += message
            elif kind == b"E":
                raise ConnectionError(f"the server refused the connection: {message!r}")
            elif kind == b"Z":
                break
        backend = _Backend(server, welcome)
        with self._lock:
            self._backends.append(backend)
        return backend

    def _relay(self, client: _Client) -> None:
        """Relay both ways until the client leaves or is dropped, then reset the backend and pool it."""
        server, pending = client.backend.sock, b""
        try:
            while not client.gone.is_set() and not self._closing.is_set():
                ready, _, _ = select.select([client.sock, server], [], [], 0.05)
                if server in ready:
                    data = server.recv(65536)
                    if not data:
                        return  # the server ended the session: nothing to pool
                    client.sock.sendall(data)
                if client.sock in ready:
                    data = client.sock.recv(65536)
                    if not data:
                        break
                    pending += data
                    forward, pending, terminated = _without_terminate(pending)
                    server.sendall(forward)
                    if terminated:
                        break
            if client.gone.is_set():  # a reset the client sees on its next use of the connection
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.sock.close()
            self._reset(client.backend)
            with self._lock:
                self._idle.append(client.backend)
        except (OSError, ConnectionError):
            pass
        finally:
            client.done.set()

    @staticmethod
    def _reset(backend: _Backend) -> None:
        """What pgbouncer's ``server_reset_query`` does before a backend serves another client."""
        query = b"DISCARD ALL\x00"
        backend.sock.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query)
        while True:
            kind, _ = _read_message(backend.sock)
            if kind == b"Z":
                return


def _without_terminate(data: bytes) -> tuple[bytes, bytes, bool]:
    """The whole messages of ``data`` up to a Terminate (kept from the backend), the incomplete rest,
    and whether a Terminate came."""
    at = 0
    while len(data) - at >= 5:
        (length,) = struct.unpack("!i", data[at + 1:at + 5])
        if len(data) - at < 1 + length:
            break
        if data[at:at + 1] == b"X":
            return data[:at], b"", True
        at += 1 + length
    return data[:at], data[at:], False
