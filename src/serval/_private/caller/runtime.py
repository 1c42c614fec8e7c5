"""Process-wide state: which cluster this process talks to, and on which loops.

*Home loop*: where sync callers' requests are routed. In a driver it is a background thread's
loop, started on first use; in a replica it is the replica's own loop (sync user code runs in
worker threads, so it can block on it safely).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from serval._private.caller.client import ClusterClient
from serval.exceptions import ServalError

T = TypeVar("T")

_CLOSE_TIMEOUT_S = 2.0


@dataclass
class ReplicaIdentity:
    app: str
    deployment: str
    replica_id: str


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.address: str | None = None
        self.home_loop: asyncio.AbstractEventLoop | None = None
        self.home_thread: threading.Thread | None = None
        self.clients: dict[asyncio.AbstractEventLoop, ClusterClient] = {}
        self.replica: ReplicaIdentity | None = None


_state = _State()


def set_address(address: str | None) -> None:
    with _state.lock:
        _state.address = address


def address() -> str | None:
    return _state.address


def require_address() -> str:
    if _state.address is None:
        raise ServalError(
            "no serval cluster: call serve.run(...) or serve.start() first "
            "(or connect to one with serve.start(address=...))"
        )
    return _state.address


def set_replica(identity: ReplicaIdentity, loop: asyncio.AbstractEventLoop) -> None:
    """In a replica process: its identity, and its loop becomes the home loop."""
    _state.replica = identity
    _state.home_loop = loop


def replica() -> ReplicaIdentity | None:
    return _state.replica


def home_loop() -> asyncio.AbstractEventLoop:
    loop = _state.home_loop
    if loop is not None and not loop.is_closed():
        return loop
    with _state.lock:
        if _state.home_loop is None or _state.home_loop.is_closed():
            _start_background_loop()
        assert _state.home_loop is not None
        return _state.home_loop


def _start_background_loop() -> None:
    loop = new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    thread = threading.Thread(target=run, name="serval-loop", daemon=True)
    thread.start()
    ready.wait()
    _state.home_loop, _state.home_thread = loop, thread


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def running_loop() -> asyncio.AbstractEventLoop | None:
    # asyncio's own "no exception" variant: a sync caller asks twice per call.
    return asyncio._get_running_loop()


def client(loop: asyncio.AbstractEventLoop) -> ClusterClient:
    """The client for ``loop``; call from that loop's thread (or before it runs)."""
    c = _state.clients.get(loop)
    if c is not None:
        return c
    with _state.lock:
        for old in [lp for lp in _state.clients if lp.is_closed()]:
            del _state.clients[old]
        c = _state.clients.get(loop)
        if c is None:
            c = _state.clients[loop] = ClusterClient(require_address(), loop)
        return c


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the home loop from a thread that is not that loop's."""
    loop = home_loop()
    if running_loop() is loop:
        coro.close()
        raise RuntimeError(
            "a blocking serval call was made from inside the event loop it needs; "
            "use the async form (await) instead"
        )
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def home_client() -> ClusterClient:
    return client(home_loop())


def reset_clients() -> None:
    """Forget every client (after shutdown); closes those whose loops still run."""
    with _state.lock:
        clients, _state.clients = _state.clients, {}
    for loop, c in clients.items():
        if loop.is_closed():
            continue
        if running_loop() is loop or not loop.is_running():
            c.close()  # (cancels its tasks; they finish when that loop runs again, if ever)
            continue
        try:
            closing = asyncio.run_coroutine_threadsafe(c.aclose(), loop)
        except RuntimeError:  # closed meanwhile
            continue
        with contextlib.suppress(Exception):  # (a loop blocked by user code: do not hang)
            closing.result(_CLOSE_TIMEOUT_S)
