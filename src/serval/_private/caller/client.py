"""A process's view of a cluster, on one event loop: the controller link and the routers.

Every loop that makes calls (the background loop of sync callers, a user's ``asyncio.run``
loop, a replica's loop) gets its own ``ClusterClient`` so the async path never hops threads.
The controller pushes its replica table to each client; routing never asks the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from serval._private.caller.calls import Call
from serval._private.caller.router import Router
from serval._private.wire import endpoints
from serval._private.wire.control import ControllerCalls
from serval._private.wire.rpc import RpcPeer
from serval._private.wire.tasks import TaskOwner
from serval._private.wire.types import Routes, Table
from serval.exceptions import DeploymentNotFoundError, RequestCancelledError, ServalError

logger = logging.getLogger(__name__)

_RECONNECT_DELAY_S = 0.1
_QUEUE_REPORT_INTERVAL_S = 0.5


class ClusterClient:
    def __init__(self, address: str, loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self.loop = loop
        self.routers: dict[tuple[str, str], Router] = {}
        self.table_version = -1
        self._controller: RpcPeer | None = None
        # The controller's calls, typed; each waits for the controller to be reachable.
        self.controller = ControllerCalls(self.call_controller)
        # Set once the first replica table is here, and stays set: routing needs a table,
        # not the controller, so calls keep flowing on the last table while the controller
        # restarts (or hangs). Only control calls wait for it (``_connected``).
        self._ready = asyncio.Event()
        self._connected = asyncio.Event()
        self._waiting: list[Call] = []
        # Every task of this client's: its connector and reporter, routers' connects, the
        # argument resolutions of calls (``close`` cancels them, ``aclose`` awaits them too).
        self.tasks = TaskOwner(f"the cluster client of {address}")
        self._connector: asyncio.Task[None] | None = None
        self._closed = False
        # route_prefix -> (app, ingress deployment); used by the HTTP proxy
        self.routes: Routes = {}
        self.on_table: Callable[[int], None] | None = None
        # Calls the controller makes to this process (the proxy's drain), if any.
        self.handler: object | None = None
        self._reporter: asyncio.Task[None] | None = None

    # -- data plane ------------------------------------------------------------------------------

    def submit(self, call: Call) -> None:
        """Route ``call``; must run on this client's loop."""
        if not self._ready.is_set():
            self._waiting.append(call)
            self._ensure_connecting()
            return
        router = self.routers.get((call.app, call.deployment))
        if router is None:
            call.set_exception(
                DeploymentNotFoundError(
                    f"no deployment {call.deployment!r} in application {call.app!r}"
                )
            )
            return
        router.submit(call)

    def submit_from_thread(self, call: Call) -> None:
        """``submit`` from a thread that is not this client's loop's. The router sends the
        call from this thread when it can (no wake-up of the loop on the way out); otherwise
        the call is handed to the loop."""
        router = None
        if self._ready.is_set() and not self._closed:
            router = self.routers.get((call.app, call.deployment))
        if router is None:
            self.loop.call_soon_threadsafe(self.submit, call)
        elif not router.submit_from_thread(call):
            self.loop.call_soon_threadsafe(router.handed_over_routed, call)

    def release(self, call: Call) -> None:
        """``call``'s caller stopped waiting for it (any thread): free its slot at its
        replica (see ``Router.release``)."""
        router = self.routers.get((call.app, call.deployment))
        if router is None or not router.release(call):
            return
        if asyncio._get_running_loop() is self.loop:
            router.dispatch()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to route
                self.loop.call_soon_threadsafe(router.dispatch)

    def send_input(self, call: Call, message: Any) -> None:
        router = self.routers.get((call.app, call.deployment))
        if router is not None:
            router.send_input(call, message)

    def cancel(self, call: Call) -> None:
        router = self.routers.get((call.app, call.deployment))
        if router is not None:
            router.cancel(call)
        elif call in self._waiting:
            self._waiting.remove(call)
            call.set_exception(RequestCancelledError(f"request to {call.label} was cancelled"))

    # -- control plane ---------------------------------------------------------------------------

    async def call_controller(self, method: str, **kwargs: Any) -> Any:
        peer = await self._controller_peer()
        try:
            return await peer.call(method, **kwargs)
        except ConnectionResetError:
            # The controller restarted: wait for the new one once, then try again.
            peer = await self._controller_peer()
            return await peer.call(method, **kwargs)

    async def _controller_peer(self) -> RpcPeer:
        while True:
            self._ensure_connecting()
            await self._connected.wait()
            peer = self._controller
            if peer is not None and not peer.closed:
                return peer
            self._connected.clear()  # lost since it was set: the connector runs again

    @property
    def has_table(self) -> bool:
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        """Return once this client has a replica table (the first connection's)."""
        self._ensure_connecting()
        await self._ready.wait()

    def _ensure_connecting(self) -> None:
        if self._closed:
            raise ServalError("serval has been shut down in this process")
        if self._connector is None or self._connector.done():
            if self._controller is None or self._controller.closed:
                self._connector = self.tasks.spawn(self._connect(), self.loop)

    async def _connect(self) -> None:
        delay = _RECONNECT_DELAY_S
        while not self._closed:
            try:
                peer = await RpcPeer.connect(
                    await endpoints.controller(self.address),
                    handler=self.handler,
                    on_push=self._on_push,
                    on_close=self._on_close,
                )
                self._controller = peer
                table = await ControllerCalls(peer.call).subscribe()
                # A new controller's first table wins whatever its version: it may restart
                # from a checkpoint written just before the version this client last saw.
                self._apply_table(table, fresh=True)
                self._connected.set()
                return
            except (OSError, ConnectionError) as exc:
                logger.debug("controller not reachable at %s: %s", self.address, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _on_close(self, peer: RpcPeer) -> None:
        if self._closed or peer is not self._controller:
            return
        # Keep routing with the last table; reconnect in the background.
        self._connected.clear()
        if self._connector is None or self._connector.done():
            self._connector = self.tasks.spawn(self._connect(), self.loop)

    def _on_push(self, topic: str, value: Any) -> None:
        if topic == "table":
            self._apply_table(value)

    def _apply_table(self, table: Table, fresh: bool = False) -> None:
        version, deployments, routes = table
        if version <= self.table_version and self._ready.is_set() and not fresh:
            return
        self.table_version = version
        for key, info in deployments.items():
            router = self.routers.get(key)
            if router is None:
                self.routers[key] = Router(info, self._queue_started, self.tasks)
            else:
                router.update(info)
        for key in [k for k in self.routers if k not in deployments]:
            self.routers.pop(key).delete()
        self.routes = routes
        self._ready.set()
        if self.on_table is not None:
            self.on_table(version)
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            self.submit(call)

    # -- queue reports (the autoscaler counts requests waiting at callers) ------------------------

    def _queue_started(self) -> None:
        if self._reporter is None or self._reporter.done():
            self._reporter = self.tasks.spawn(self._report_queues(), self.loop)

    async def _report_queues(self) -> None:
        reported: set[tuple[str, str]] = set()
        while not self._closed:
            counts = {k: r.waiting for k, r in self.routers.items() if r.waiting}
            # Also say "0" once for what was waiting before, so the controller forgets it.
            payload = {**{k: 0 for k in reported}, **counts}
            try:
                await self.controller.record_queued(payload)
            except (OSError, ConnectionError):
                pass
            if not counts:
                return
            reported = set(counts)
            await asyncio.sleep(_QUEUE_REPORT_INTERVAL_S)

    def close(self) -> None:
        """On this client's loop: cancel its tasks, close its connections."""
        self._closed = True
        self.tasks.cancel()
        if self._controller is not None:
            self._controller.close()
        for router in self.routers.values():
            for slot in [*router.slots.values(), *router.retiring.values()]:
                slot.close()

    async def aclose(self) -> None:
        """``close``, and wait until its tasks have finished."""
        self.close()
        await self.tasks.close()
