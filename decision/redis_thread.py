"""Redis commands on the calling thread's own connection, for calls on the request path.

redis-py's pooled call (take a connection, check it for stray input, pack, run, parse, put it
back) cost ~180 µs of the calling thread's CPU per command on this repository's VM; on a
connection the thread keeps, ~65-85 (``bench/MEASUREMENTS.md``). The quota counters
(:mod:`policies.quota`) and the outcome claims (:mod:`decision.outcome_claims`) run one command
per decision or outcome, on the thread that decides, so they use :class:`ThreadConnections`.
"""

from __future__ import annotations

import select
import threading
from typing import Any


class ThreadConnections:
    """One Redis connection per calling thread, made from ``client``'s pool settings (timeouts,
    client name); ``what`` names them in the error raised after :meth:`close`.

    Before each command the thread's connection is polled (~0.5 µs): input waiting on it means
    Redis closed it (its idle timeout, a restart, a failover, ``CLIENT KILL``) or sent something
    unasked, so the command goes out on a new connection instead, as redis-py's pool checks each
    connection it hands out. Nothing is retried: a command whose reply was lost, timed out or was
    interrupted raises, and its connection is dropped (the thread's next command opens another).
    After :meth:`close` every command raises rather than reconnecting.

    Examples
    --------
    >>> import redis
    >>> conns = ThreadConnections(redis.Redis.from_url("redis://127.0.0.1:6379/0"), "the doctest's connections")
    >>> conns.call("PING")
    b'PONG'
    >>> conns.close()
    >>> conns.call("PING")
    Traceback (most recent call last):
    ...
    redis.exceptions.ConnectionError: the doctest's connections are closed
    """

    def __init__(self, client: Any, what: str) -> None:
        import redis

        self._errors = redis.exceptions  # looked up here, not on every command
        self._client = client
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[Any] = []
        self._closed = False
        self._what = what  # for the error after close

    def call(self, *args: Any) -> Any:
        """Run one command and return Redis's reply as parsed by redis-py (bytes, ints, lists, None)."""
        errors = self._errors
        if self._closed:  # a call still running after the service stopped must not reconnect
            raise self._closed_error()
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = self._client.connection_pool.make_connection()
            with self._lock:
                if self._closed:  # closed while this one was made
                    raise self._closed_error()
                self._conns.append(conn)
            local.conn, local.sock = conn, None
        sock = conn._sock  # redis-py's socket of the connection, None while it is closed
        if sock is not None and sock is local.sock and local.poller.poll(0):
            conn.disconnect()  # input waiting: closed by Redis (or unasked input), not usable
            sock = None
        try:
            if sock is None:
                conn.connect()
                sock = conn._sock
            if sock is not local.sock:  # a socket this thread has not polled yet
                local.sock, local.poller = sock, _poller(sock)
            conn.send_command(*args)
            return conn.read_response()
        except errors.ResponseError:  # Redis answered (an error reply): the connection is fine
            raise
        except BaseException:  # lost, timed out or interrupted mid-reply: the connection is not reused
            conn.disconnect()
            local.conn = None
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)
            raise

    def _closed_error(self) -> Exception:
        exc: Exception = self._errors.ConnectionError(f"{self._what} are closed")
        return exc

    def close(self) -> None:
        """Close every thread's connection; later commands raise. A second call does nothing."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.disconnect()


def _poller(sock: Any) -> select.poll:
    """A poll object watching ``sock`` for input (or its end)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return poller
