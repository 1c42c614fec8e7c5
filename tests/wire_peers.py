"""Helpers of the wire's unit tests (``test_wire_*``, ``test_caller_router``): run a coroutine
on either event loop serval uses, and collect what a real ``transport.Connection`` receives.
Nothing here stands in for a part of serval: connections are real ones over real sockets."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from serval._private.wire import transport
from serval._private.wire.messages import Message

T = TypeVar("T")

# serval runs its loops on uvloop (caller.runtime.new_event_loop); asyncio's own loop is the
# fallback. Their transports differ where it matters here (buffering, partial writes).
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(kind: str, main: Callable[[], Coroutine[Any, Any, T]], timeout: float = 20) -> T:
    """Run ``main()`` on a fresh loop of ``kind``; fail (not hang) after ``timeout`` s."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout)

    with asyncio.Runner(loop_factory=LOOPS[kind]) as runner:
        return runner.run(bounded())


async def until(predicate: Callable[[], Any], what: str, within: float = 5.0) -> Any:
    """Wait on the loop until ``predicate()`` is truthy and return it; fail naming ``what``
    after ``within`` seconds. (For conditions nothing signals: another thread's, a peer's.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not (value := predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.001)
    return value


class Inbox:
    """A connection's handler that keeps what arrives (and ``frame_size`` with it), and lets a
    coroutine wait until a number of messages are there."""

    def __init__(self) -> None:
        self.messages: list[Message | transport.Undecodable] = []
        self.sizes: list[int] = []
        self.lost: list[BaseException | None] = []
        self._changed = asyncio.Event()

    def on_message(self, conn: transport.Connection, msg: Message | transport.Undecodable) -> None:
        self.messages.append(msg)
        self.sizes.append(conn.frame_size)
        self._changed.set()

    def on_lost(self, conn: transport.Connection, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self._changed.set()

    async def wait_for(self, count: int) -> list[Message | transport.Undecodable]:
        while len(self.messages) < count:
            self._changed.clear()
            await self._changed.wait()
        return self.messages

    async def wait_lost(self) -> None:
        while not self.lost:
            self._changed.clear()
            await self._changed.wait()


async def connected_pair(
    path: str,
    server_inbox: Inbox,
    client_inbox: Inbox,
    server_thread_writes: bool = False,
    client_thread_writes: bool = False,
) -> tuple[transport.Connection, transport.Connection, asyncio.base_events.Server]:
    """(the dialling connection, the accepted one, the server) over a real Unix socket."""
    accepted: asyncio.Future[transport.Connection] = asyncio.get_running_loop().create_future()

    def accept() -> transport.Connection:
        conn = transport.Connection(
            server_inbox.on_message, server_inbox.on_lost, thread_writes=server_thread_writes
        )
        accepted.set_result(conn)
        return conn

    server = await transport.listen(path, accept)
    client = await transport.dial(
        path,
        lambda: transport.Connection(
            client_inbox.on_message, client_inbox.on_lost, thread_writes=client_thread_writes
        ),
    )
    conn = await accepted
    # (its connection_made may come a loop turn after the factory)
    await until(lambda: conn.connected, "the accepted connection made")
    return client, conn, server


class LoopThread:
    """An event loop of ``kind`` running in a thread of its own (the peer in another process,
    as it were): ``call`` runs a coroutine function there and returns its result."""

    def __init__(self, kind: str) -> None:
        self.loop = LOOPS[kind]()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        assert not self._thread.is_alive(), "the peer's loop did not stop"
        self.loop.close()

    def call(self, main: Callable[[], Coroutine[Any, Any, T]], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(main(), self.loop).result(timeout)

    async def acall(self, main: Callable[[], Coroutine[Any, Any, T]], within: float = 20) -> T:
        """``call`` from a coroutine of another loop, without blocking that loop."""
        future = asyncio.run_coroutine_threadsafe(main(), self.loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), within)
