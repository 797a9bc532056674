"""A TCP proxy in front of the test PostgreSQL, standing in for a network that fails in ways a test needs.

* :meth:`PgProxy.reset_client_side` resets the client's leg of the newest connection and keeps the
  server's leg open: a connection only the client saw break (its server session lives on, half-open).
* :meth:`PgProxy.paused` stops relaying while the sockets stay open and their packets acknowledged
  (by the proxy's kernel): a database that does not answer, which no TCP timeout notices.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit


class LocalFront:
    """A listener on ``127.0.0.1:<port>`` in front of the server of ``url``, whose connections
    :meth:`_accepted` takes; :meth:`url` is ``url`` through it (what the proxy and the pooler share).

    Parameters
    ----------
    url
        A libpq URL of the real server (host and port are taken from it).
    name
        The accepting thread's name.
    """

    def __init__(self, url: str, name: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._parts = parts
        self._closing = threading.Event()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    def url(self) -> str:
        """The server's URL with this front's address in it."""
        auth = self._parts.netloc.rsplit("@", 1)[0] + "@" if "@" in self._parts.netloc else ""
        return urlunsplit(self._parts._replace(netloc=f"{auth}127.0.0.1:{self.port}"))

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._accepted(client)

    def _accepted(self, client: socket.socket) -> None:
        raise NotImplementedError


class PgProxy(LocalFront):
    """Relays ``127.0.0.1:<port>`` to the server of ``url``; :meth:`url` is ``url`` through the proxy.

    Parameters
    ----------
    url
        A libpq URL of the real server (host and port are taken from it).
    """

    def __init__(self, url: str) -> None:
        self._paused = threading.Event()
        self.legs: list[tuple[socket.socket, socket.socket]] = []  # (client side, server side) per connection
        super().__init__(url, "pg-proxy")

    def _accepted(self, client: socket.socket) -> None:
        server = socket.create_connection(self._target)
        self.legs.append((client, server))
        threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
        threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self._paused.is_set() and not self._closing.is_set():
                    time.sleep(0.02)
                dst.sendall(data)
        except OSError:
            pass

    def reset_client_side(self) -> None:
        """Reset (RST) the client's leg of the newest connection; its server leg stays open."""
        client, _ = self.legs[-1]
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Relay nothing inside the block (every socket stays open)."""
        self._paused.set()
        try:
            yield
        finally:
            self._paused.clear()

    def close(self) -> None:
        self._closing.set()
        self._paused.clear()
        self._listener.close()
        for client, server in self.legs:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.close()
