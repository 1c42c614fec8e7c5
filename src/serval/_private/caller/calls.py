"""One request's life on the caller side: assignment to a replica, then its outcome.

A ``Call`` belongs to the event loop that routes it (its *owner*): only that loop's thread
completes it, and assigns it, but for a blocking caller's thread that sends its own call
(``Router.submit_from_thread``). Any thread may wait on it: waits are thread-safe one-shot
signals, so a sync caller blocks on a lock, an async caller on a future of its own loop, and
neither needs to know which loop owns the call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from serval._private.wire.messages import CREDIT_EVERY
from serval.exceptions import GetTimeoutError

logger = logging.getLogger(__name__)


class Signal:
    """A thread-safe event that fires once and runs its callbacks in the firing thread.

    Lock-free: it relies on the GIL making ``list.append`` and ``list.pop`` atomic. ``fired`` is
    set before callbacks are drained, and a callback added late drains the list itself, so every
    callback runs exactly once, in whichever thread pops it. A callback that raises is logged and
    does not keep the others from running: each of them is somebody waiting for an answer.
    """

    __slots__ = ("_callbacks", "fired")

    def __init__(self) -> None:
        self.fired = False
        self._callbacks: list[Callable[[], None]] = []

    def fire(self) -> None:
        self.fired = True
        self._drain()

    def add_callback(self, cb: Callable[[], None]) -> None:
        self._callbacks.append(cb)
        if self.fired:
            self._drain()

    def _drain(self) -> None:
        callbacks = self._callbacks
        while callbacks:
            try:
                cb = callbacks.pop()
            except IndexError:  # another thread took the last one
                return
            try:
                cb()
            except Exception:
                logger.exception("a completion callback failed")

    def wait_sync(self, timeout: float | None) -> bool:
        if self.fired:
            return True
        waiter = threading.Lock()
        waiter.acquire()
        self.add_callback(waiter.release)
        return waiter.acquire(timeout=-1 if timeout is None else max(timeout, 0))

    async def wait(self) -> None:
        if self.fired:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        me = threading.get_ident()

        def wake() -> None:
            if threading.get_ident() == me:
                _resolve(fut)
            else:
                loop.call_soon_threadsafe(_resolve, fut)

        self.add_callback(wake)
        await fut

    def future(self, loop: asyncio.AbstractEventLoop, fires_here: bool) -> asyncio.Future[None]:
        """A future of ``loop`` resolved when the signal fires. ``fires_here``: the signal is
        known to fire on ``loop``'s own thread, so no thread-safe hand-off is needed."""
        fut: asyncio.Future[None] = loop.create_future()
        if fires_here:
            self.add_callback(partial(_resolve, fut))
        else:
            self.add_callback(partial(_resolve_threadsafe, loop, fut))
        return fut

    async def wait_local(self, loop: asyncio.AbstractEventLoop) -> None:
        """``wait`` for a signal known to fire on ``loop``'s own thread (the HTTP proxy's
        calls): no thread checks, no loop lookup."""
        if not self.fired:
            await self.future(loop, fires_here=True)


def _resolve_threadsafe(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
    loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


_PENDING = object()
_CREATE_LOCK = threading.Lock()


class NestedResponse(Exception):
    """Raised while pickling a call's arguments that hold a response not yet resolved (a
    ``DeploymentResponse`` in a list, a dict, a dataclass): the router then has the arguments
    resolved (``resolve_nested``) and sends the call again. Costs nothing otherwise."""


# Set by serval.handle: replaces the responses nested in ``call``'s arguments by their values
# (wrapped so that the callee can still ``await`` them); raises what one of them raised.
_nested_resolver: list[Callable[[Call], Any]] = []


def set_nested_resolver(resolve: Callable[[Call], Any]) -> None:
    _nested_resolver[:] = [resolve]


def nested_resolver() -> Callable[[Call], Any] | None:
    return _nested_resolver[0] if _nested_resolver else None


class Call:
    """A request: where it goes, what it carries, and (later) how it ended."""

    __slots__ = (
        "_assigned",
        "_error",
        "_value",
        "app",
        "args",
        "deployment",
        "done",
        "is_assigned",
        "kwargs",
        "meta",
        "method",
        "plain",
        "replica",
        "resolved",
        "rid",
        "stream",
        "waiter",
    )

    def __init__(
        self,
        app: str,
        deployment: str,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        meta: dict[str, Any] | None,
        stream: bool = False,
    ) -> None:
        self.app = app
        self.deployment = deployment
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.meta = meta
        self.rid = 0
        self.replica: str | None = None
        # Most callers never wait for assignment: its signal is made only for those who do.
        self.is_assigned = False
        self._assigned: Signal | None = None
        self.done = Signal()
        self._value: Any = _PENDING
        self._error: BaseException | None = None
        self.stream: StreamBuffer | None = StreamBuffer() if stream else None
        self.plain = False  # arguments are builtins only: pickle without cloudpickle
        self.resolved = False  # its nested responses were resolved (see NestedResponse)
        # One future of the owner loop, resolved directly on completion: the common single
        # ``await`` on the owner loop needs no callback on ``done`` (see waiter_future).
        self.waiter: asyncio.Future[None] | None = None

    # -- assignment --------------------------------------------------------------------------

    def mark_assigned(self) -> None:
        """Sent to a replica (or finished without one). The owner loop's thread, or the
        caller's that sent it."""
        self.is_assigned = True
        signal = self._assigned
        if signal is not None:
            signal.fire()

    @property
    def assigned(self) -> Signal:
        """Fires once the request is assigned; any thread may wait on it."""
        signal = self._assigned
        if signal is None:
            with _CREATE_LOCK:  # two waiters must not make two signals
                if self._assigned is None:
                    self._assigned = Signal()
            signal = self._assigned
            if self.is_assigned:  # marked before the signal existed: fire it here
                signal.fire()
        return signal

    # -- completion (owner loop thread only) ------------------------------------------------

    def set_result(self, value: Any) -> None:
        if self.done.fired:
            return
        self._value = value
        self.args = self.kwargs = None  # type: ignore[assignment]  # drop references early
        if self.stream is not None:
            self.stream.close()
        self._fire_done()

    def set_exception(self, error: BaseException) -> None:
        if self.done.fired:
            return
        self._error = error
        self.args = self.kwargs = None  # type: ignore[assignment]
        if self.stream is not None:
            self.stream.close(error)
        self._fire_done()

    def _fire_done(self) -> None:
        self.mark_assigned()
        self.done.fire()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def waiter_future(self, loop: asyncio.AbstractEventLoop, owner: bool) -> asyncio.Future[None]:
        """A future of ``loop`` resolved when the call is done. ``owner``: ``loop`` is the
        call's owner (and this its thread); the first such waiter gets the cheap path."""
        if owner and self.waiter is None:
            fut = self.waiter = loop.create_future()
            return fut
        return self.done.future(loop, fires_here=owner)

    # -- outcome (any thread) ----------------------------------------------------------------

    def outcome(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def result_sync(self, timeout: float | None) -> Any:
        if not self.done.wait_sync(timeout):
            raise GetTimeoutError(
                f"request to {self.app}.{self.deployment}.{self.method} did not finish within "
                f"{timeout}s"
            )
        return self.outcome()

    async def result_async(self) -> Any:
        await self.done.wait()
        return self.outcome()

    @property
    def label(self) -> str:
        return f"{self.deployment}.{self.method}"

    def credit(self, nbytes: int, send_input: Callable[[Call, Any], None]) -> None:
        """The replica's app took ``nbytes`` more of this call's streamed input (0: it has
        started the call); ``send_input`` sends it more. Only the HTTP proxy's uploads stream
        input this way (``http_protocol.UploadCall``); other calls get no credit."""


class StreamBuffer:
    """Items of a streaming call, produced on the owner loop, consumed from any thread.

    Lock-free like ``Signal``: the producer stores first and fires the current signal after
    swapping in a new one; the consumer takes the signal first and looks second, so a wake-up
    is never missed.

    Flow control (see ``outflow``): each item comes with its size on the wire, stored before
    the item so that a consumer that sees an item sees its size. The consumer ``take``s items;
    every ``CREDIT_EVERY`` bytes taken it tells ``on_taken`` (which credits the replica), so the
    replica never has more than a window of this stream unread here.
    """

    __slots__ = ("_signal", "_sizes", "_untold", "ended", "error", "items", "on_taken")

    def __init__(self) -> None:
        self.items: deque[Any] = deque()
        self._sizes: deque[int] = deque()
        self._untold = 0  # bytes taken and not yet credited
        self.on_taken: Callable[[int], None] | None = None
        self.ended = False
        self.error: BaseException | None = None
        self._signal = Signal()

    def put(self, item: Any, size: int = 0) -> None:
        self._sizes.append(size)
        self.items.append(item)
        self._wake()

    def take(self) -> Any:
        """The next item (there must be one); for one consumer at a time."""
        item = self.items.popleft()
        self._untold += self._sizes.popleft()
        if self._untold >= CREDIT_EVERY:
            untold, self._untold = self._untold, 0
            on_taken = self.on_taken
            if on_taken is not None:
                on_taken(untold)
        return item

    def close(self, error: BaseException | None = None) -> None:
        if self.ended:
            return
        self.error = error
        self.ended = True
        self.on_taken = None  # nothing more to credit (and it refers back to the call)
        self._wake()

    def _wake(self) -> None:
        signal, self._signal = self._signal, Signal()
        signal.fire()

    def _next_or_signal(self) -> tuple[bool, Any]:
        """(True, item) when an item is there; (False, signal) to wait on; raises at the end."""
        signal = self._signal
        if self.items:
            return True, self.take()
        if self.ended:
            if self.items:  # stored just before the end was
                return True, self.take()
            if self.error is not None:
                raise self.error
            raise StopIteration
        return False, signal

    def when_changed(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once an item or the end is there (at once if one is already).
        For consumers on the producer's own loop, which then look at ``items`` and ``ended``."""
        signal = self._signal
        if self.items or self.ended:
            callback()
        else:
            signal.add_callback(callback)

    async def wait_changed(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait, on the producer's own loop, until an item or the end is there."""
        signal = self._signal
        if not (self.items or self.ended):
            await signal.wait_local(loop)

    def next_sync(self, timeout: float | None) -> Any:
        while True:
            ok, got = self._next_or_signal()
            if ok:
                return got
            if not got.wait_sync(timeout):
                raise GetTimeoutError(f"no stream item within {timeout}s")

    async def next_async(self, loop: asyncio.AbstractEventLoop | None = None) -> Any:
        """The next item; ``loop`` only when the producer runs on this same loop."""
        while True:
            try:
                ok, got = self._next_or_signal()
            except StopIteration:
                raise StopAsyncIteration from None
            if ok:
                return got
            if loop is not None:
                await got.wait_local(loop)
            else:
                await got.wait()
