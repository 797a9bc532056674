"""Waiting in the main thread for a stop that a signal handler sets."""

from __future__ import annotations

import threading


def wait_until_set(stop: threading.Event, poll_s: float = 0.5) -> None:
    """Block until ``stop`` is set, back in the interpreter at least every ``poll_s`` seconds.

    Python runs a signal's handler in the main thread, between bytecodes. The kernel may deliver
    SIGTERM to any thread of the process (gRPC's, the database pool's); a main thread blocked in an
    untimed ``Event.wait()`` is then never interrupted, so the handler that would set ``stop`` never
    runs and the process ignores the signal. A timed wait comes back to run it.

    >>> stop = threading.Event()
    >>> threading.Timer(0.05, stop.set).start()
    >>> wait_until_set(stop, poll_s=0.01)
    >>> stop.is_set()
    True
    """
    while not stop.wait(poll_s):
        pass
