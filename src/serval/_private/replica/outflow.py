"""Flow control of a call's streamed output, on the replica's side.

A generator (or a streamed HTTP response) can produce faster than its caller takes: a client
that reads slowly, a handle stream iterated one item at a time. Without a limit every item
waits in the caller's memory, or the proxy's, and a few slow readers take the machine's. So the
caller credits the bytes it has taken (``protocol.CREDIT``, every ``CREDIT_EVERY`` bytes), and
a producer that has ``WINDOW`` bytes sent and not credited waits: an async one at an ``await``,
a sync one (a worker thread) on a condition. Cancelling the call wakes it, and a sync producer
then stops with ``RequestCancelledError`` (an async one is cancelled by its task).
"""

from __future__ import annotations

import asyncio
import threading

from serval._private.wire.messages import STREAM_WINDOW
from serval.exceptions import RequestCancelledError

WINDOW = STREAM_WINDOW


class Outflow:
    """One streaming call's bytes on their way to the caller. ``sent`` is changed on the loop
    (async producers, credits) and by a worker thread (sync producers): under ``_lock``."""

    __slots__ = ("_lock", "_room", "_waiter", "cancelled", "label", "loop", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop, label: str) -> None:
        self.loop = loop
        self.label = label
        self.sent = 0
        self.cancelled = False
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._waiter: asyncio.Future[None] | None = None

    # -- the producer ----------------------------------------------------------------------------

    def add(self, nbytes: int) -> bool:
        """On the loop: ``nbytes`` more were sent; True if the producer must now ``wait``."""
        with self._lock:
            self.sent += nbytes
            return self.sent >= WINDOW and not self.cancelled

    async def wait(self) -> None:
        """On the loop: until the caller has credited enough (or the call is cancelled)."""
        while True:
            with self._lock:
                if self.sent < WINDOW or self.cancelled:
                    return
                waiter = self._waiter = self.loop.create_future()
            await waiter

    def add_from_thread(self, nbytes: int) -> None:
        """On a worker thread: ``nbytes`` more were handed to the loop to send; returns when
        the window has room again. Raises ``RequestCancelledError`` once the call is
        cancelled, so that a sync generator stops (its ``finally`` blocks run)."""
        with self._lock:
            self.sent += nbytes
            while self.sent >= WINDOW and not self.cancelled:
                self._room.wait()
            if self.cancelled:
                raise RequestCancelledError(f"{self.label} was cancelled")

    # -- the caller's side, on the loop ----------------------------------------------------------

    def credit(self, nbytes: int) -> None:
        with self._lock:
            self.sent -= nbytes
            if self.sent >= WINDOW:
                return
            self._room.notify_all()
        self._wake()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._room.notify_all()
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def frame_bytes(pieces: list[bytes | memoryview]) -> int:
    """The size of a frame on the wire, as its receiver counts it."""
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in pieces)
