"""The HTTP proxies: one wherever the backend says a proxy runs — this machine on the local
backend; every node of the Ray cluster (``EveryNode``, the default) or the head node only
(``HeadOnly``) on Ray — each started, watched, and restarted with back-off when it exits.

A proxy that exits is restarted after 0.5 s, doubled for each exit in a row up to 10 s (one
that served 10 s first starts the count over); one that exits three times in a row before it
was ready is a failure, which ``serve.start()`` and ``serve.run()`` report. On a backend whose
nodes come and go, the set of places is followed: a new node gets a proxy, a removed node's
proxy is forgotten (its host ended with the node).

Each proxy acknowledges the table versions it routes with; ``wait`` returns once every proxy
routes with a version (an app deployed is then reachable over HTTP through every node).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from serval._private.backends.base import Backend, HostRef, ReplicaHost
from serval._private.controller.clock import Clock
from serval._private.controller.state import ControlPeer
from serval._private.wire.control import ProxyCalls
from serval._private.wire.tasks import TaskOwner
from serval.config import HTTPOptions
from serval.exceptions import ServalError

__all__ = ["Proxies"]

logger = logging.getLogger(__name__)

_RESTART_DELAY_S = 0.5
_MAX_RESTART_DELAY_S = 10.0
_STABLE_S = 10.0
_MAX_START_FAILURES = 3
_NODES_EVERY_S = 2.0  # how often the places of proxies are looked at again, where they change
_STOP_WAIT_S = 5.0


class _Proxy:
    """One place's proxy: its current host, and what it said."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.host: ReplicaHost | None = None
        self.version = -1  # the newest table version it has applied
        self.error: str | None = None
        self.ready_at: float | None = None  # when the running host said it listens
        self.start_failures = 0  # exits in a row before it was ready
        self.restarts = 0  # restarts in a row without a host that stayed up
        self.peer: ControlPeer | None = None  # its control connection
        self.removed = False  # its place is gone: nothing is restarted here


class Proxies:
    def __init__(
        self,
        backend: Backend,
        http: HTTPOptions,
        clock: Clock,
        tasks: TaskOwner,
        on_change: Callable[[], None],
    ) -> None:
        self.backend = backend
        self.http = http
        self.clock = clock
        self.tasks = tasks
        self._on_change = on_change  # (the checkpoint names the proxies' hosts)
        self.by_node: dict[str, _Proxy] = {}
        self.changed = asyncio.Event()
        self.stopping = False

    # -- start and follow ------------------------------------------------------------------------

    def start(self, restored: dict[str, ReplicaHost]) -> None:
        """Start a proxy at every place (adopting the hosts of a previous controller there)."""
        places = self.backend.proxy_nodes(self.http.location)
        for node, stale in restored.items():
            if node not in places:
                stale.kill()
        for node in places:
            proxy = self.by_node[node] = _Proxy(node)
            adopted = restored.get(node)
            if adopted is not None:
                proxy.host = adopted
                proxy.ready_at = self.clock.monotonic()  # it served the previous controller
                self.tasks.spawn(self._watch(proxy, adopted))
            else:
                self._start(proxy)
        if self.backend.proxy_nodes_change:
            self.tasks.spawn(self._follow_nodes())

    def _start(self, proxy: _Proxy) -> None:
        host = proxy.host = self.backend.start_proxy(self.http.to_json(), proxy.node)
        proxy.ready_at = None
        self.tasks.spawn(self._watch(proxy, host))
        self._on_change()

    async def _follow_nodes(self) -> None:
        while not self.stopping:
            await self.clock.sleep(_NODES_EVERY_S)
            try:
                places = set(await self.backend.current_proxy_nodes(self.http.location))
            except Exception as exc:  # Ray's GCS busy, say: look again next time
                logger.warning("could not list the nodes for the HTTP proxies: %s", exc)
                continue
            if self.stopping:
                return
            for node in places - set(self.by_node):
                logger.info("a new node (%s): starting an HTTP proxy there", node)
                self._start(self.by_node.setdefault(node, _Proxy(node)))
            for node in set(self.by_node) - places:
                self._forget(node)

    def _forget(self, node: str) -> None:
        """Place ``node`` is gone: its proxy is stopped and no longer waited for."""
        proxy = self.by_node.pop(node, None)
        if proxy is None:
            return
        proxy.removed = True
        if proxy.host is not None:
            proxy.host.kill()
        self._notify()
        self._on_change()

    async def _watch(self, proxy: _Proxy, host: ReplicaHost) -> None:
        ended = await host.wait()
        if self.stopping or proxy.removed or proxy.error is not None or host is not proxy.host:
            return
        if ended.place_gone:  # its node left: not a failure; a node that comes back gets one
            logger.info("the HTTP proxy's node %s is gone (%s)", proxy.node, ended.reason)
            self._forget(proxy.node)
            return
        proxy.version = -1  # it routes no more: who waits for one waits for the next
        if proxy.ready_at is None:
            proxy.start_failures += 1
            if proxy.start_failures >= _MAX_START_FAILURES:
                proxy.error = (
                    f"it exited {proxy.start_failures} times in a row before it was "
                    f"ready ({ended.reason}); its log is in {self.backend.log_location()}"
                )
                logger.error("the HTTP proxy could not start: %s", proxy.error)
                self._notify()
                return
        elif self.clock.monotonic() - proxy.ready_at >= _STABLE_S:
            proxy.restarts = 0
        delay = min(_RESTART_DELAY_S * 2**proxy.restarts, _MAX_RESTART_DELAY_S)
        proxy.restarts += 1
        logger.warning("the HTTP proxy exited (%s); restarting it in %.1fs", ended.reason, delay)
        await self.clock.sleep(delay)
        if not self.stopping and not proxy.removed:
            self._start(proxy)

    # -- what proxies say ------------------------------------------------------------------------

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def ready(self, node: str, peer: ControlPeer, error: str | None) -> None:
        proxy = self.by_node.get(node)
        if proxy is None:
            return  # a node removed meanwhile
        proxy.peer = peer
        proxy.error = error
        if error is None:
            proxy.ready_at = self.clock.monotonic()
            proxy.start_failures = 0
        self._notify()

    def ack(self, node: str, version: int) -> None:
        proxy = self.by_node.get(node)
        if proxy is not None:
            proxy.version = max(proxy.version, version)
            self._notify()

    async def wait(self, version: int) -> None:
        """Return once every proxy routes with table ``version`` (or a newer one)."""
        while True:
            proxies = list(self.by_node.values())
            failed = [p for p in proxies if p.error is not None]
            if failed:
                raise ServalError(f"the HTTP proxy could not start: {failed[0].error}")
            if all(p.version >= version for p in proxies):
                return
            await self.changed.wait()

    # -- the end ---------------------------------------------------------------------------------

    def peers(self, but: str | None = None) -> list[ControlPeer]:
        """The control connections of the proxies (but the one at place ``but``)."""
        return [
            p.peer
            for node, p in self.by_node.items()
            if node != but and p.peer is not None and not p.peer.closed
        ]

    def hosts(self) -> list[ReplicaHost]:
        return [p.host for p in self.by_node.values() if p.host is not None]

    def refs(self) -> dict[str, HostRef]:
        return {node: p.host.ref for node, p in self.by_node.items() if p.host is not None}

    async def stop(self) -> None:
        """Ask every proxy to finish its requests and exit; kill those that have not in time."""
        self.stopping = True
        await asyncio.gather(*(self._stop(p) for p in list(self.by_node.values())))

    async def _stop(self, proxy: _Proxy) -> None:
        host, peer = proxy.host, proxy.peer
        if host is None:
            return
        if peer is not None and not peer.closed:
            with contextlib.suppress(Exception):  # gone already, or not answering: killed below
                await self.clock.wait_for(ProxyCalls(peer.call).drain(), _STOP_WAIT_S)
        with contextlib.suppress(asyncio.TimeoutError):
            await self.clock.wait_for(host.wait(), _STOP_WAIT_S)
        host.kill()
