"""Custom request routers (Ray Serve's ``serve.request_router``): a deployment's
``request_router_config`` names a ``RequestRouter`` subclass, and every caller of the
deployment (a driver, the HTTP proxy, another replica) asks an instance of it where each call
goes instead of using the built-in routing.

``choose_replicas`` returns ranks of replicas, best first; the call goes to the replica with
the fewest of this caller's calls in flight, among those of the first rank that has one with
room (``max_ongoing_requests``). When none has room, the router is asked again after a backoff
(or sooner, when a call here finishes). Without ``FIFOMixin`` each waiting call is routed on
its own (a later one may leave first, as in Ray Serve); with it, they leave in arrival order.

This runs on the caller's event loop; ``Router`` hands its calls here (``CustomRouting``).
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from serval._private.caller.calls import Call
from serval._private.wire import endpoints
from serval.config import DeploymentID, ReplicaID, RequestRouterConfig
from serval.exceptions import DeploymentUnavailableError

__all__ = [
    "CustomRouting",
    "FIFOMixin",
    "LocalityMixin",
    "MultiplexMixin",
    "PendingRequest",
    "ReplicaResult",
    "RequestMetadata",
    "RequestRouter",
    "RunningReplica",
]

_BACKOFF_S = 0.025  # the first wait before a router is asked again; doubled up to _MAX
_MAX_BACKOFF_S = 0.5


@dataclass(frozen=True)
class RequestMetadata:
    """What a router knows of a request besides its arguments."""

    app_name: str
    deployment: str
    call_method: str
    multiplexed_model_id: str = ""
    request_id: str = ""


@dataclass
class PendingRequest:
    """A request waiting to be routed: its arguments, metadata and when it was made."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    metadata: RequestMetadata
    created_at: float = field(default_factory=time.time)


class RunningReplica:
    """A replica a router may choose: its id, node, models, limit, this caller's calls in
    flight to it, and the stats its ``record_routing_stats()`` last returned."""

    def __init__(self, slot: Any, deployment_id: DeploymentID) -> None:  # (router.ReplicaSlot)
        self._slot = slot
        info = slot.info
        self.replica_id = ReplicaID(info.replica_id, deployment_id)
        self.node_id = endpoints.node_of(info.address)
        self.availability_zone: str | None = None
        self.multiplexed_model_ids = set(info.model_ids)
        self.max_ongoing_requests = slot.router.info.max_ongoing_requests
        self.routing_stats: dict[str, Any] = dict(info.routing_stats)
        self.is_cross_language = False

    @property
    def actor_id(self) -> str:
        return self.replica_id.unique_id

    def get_queue_len(self, *, deadline_s: float = 0.0) -> int:
        """This caller's calls in flight to the replica."""
        return int(self._slot.load)

    def __repr__(self) -> str:
        return f"RunningReplica({self.replica_id})"


class ReplicaResult:
    """The call a router routed, as ``on_request_routed`` sees it."""

    def __init__(self, call: Call) -> None:
        self._call = call

    def done(self) -> bool:
        return self._call.done.fired

    async def get_async(self) -> Any:
        return await self._call.result_async()

    def add_done_callback(self, callback: Any) -> None:
        self._call.done.add_callback(lambda: callback(self))


class RequestRouter(abc.ABC):
    """A deployment's router: subclass it, write ``choose_replicas``, and name the class in
    the deployment's ``request_router_config``. Made once in each caller process of the
    deployment, with ``initialize_state(**request_router_kwargs)`` called after."""

    def __init__(self, deployment_id: DeploymentID, **_: Any) -> None:
        self._deployment_id = deployment_id
        self._replicas: dict[ReplicaID, RunningReplica] = {}

    def initialize_state(self, **kwargs: Any) -> None:
        """Set up from the config's ``request_router_kwargs``."""
        return None  # (a hook: doing nothing is its default)

    @abc.abstractmethod
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Ranks of replicas for ``pending_request``, most preferred first."""

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        """Told after a request was sent to ``replica_id``."""
        return None  # (a hook: doing nothing is its default)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Told when a replica is lost."""
        return None  # (a hook: doing nothing is its default)

    def on_replica_actor_unavailable(self, replica_id: ReplicaID) -> None:
        """Told when a replica cannot be reached for now."""
        return None  # (a hook: doing nothing is its default)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """The replicas that may be chosen now."""
        self._replicas = {r.replica_id: r for r in replicas}

    def select_available_replicas(
        self, candidates: list[RunningReplica] | None = None
    ) -> list[RunningReplica]:
        """Those of ``candidates`` (default: all) with room for one more call."""
        chosen = list(self._replicas.values()) if candidates is None else candidates
        return [r for r in chosen if r.get_queue_len() < r.max_ongoing_requests]

    @property
    def curr_replicas(self) -> dict[ReplicaID, RunningReplica]:
        return dict(self._replicas)

    @property
    def deployment_id(self) -> DeploymentID:
        return self._deployment_id

    @property
    def app_name(self) -> str:
        return self._deployment_id.app_name


class FIFOMixin:
    """Waiting requests leave in the order they came (each waits for those before it)."""


class LocalityMixin:
    """Ranks replicas by nearness: on this caller's node first, then the rest."""

    def rank_replicas_via_locality(
        self, replicas: list[RunningReplica]
    ) -> list[list[RunningReplica]]:
        here = endpoints.local_node()
        near = [r for r in replicas if r.node_id == here]
        far = [r for r in replicas if r.node_id != here]
        return [rank for rank in (near, far) if rank] or [[]]


class MultiplexMixin:
    """Ranks replicas by a multiplexed model: those holding it, then those holding fewest."""

    def rank_replicas_via_multiplex(
        self, replicas: list[RunningReplica], multiplexed_model_id: str
    ) -> list[list[RunningReplica]]:
        holding = [r for r in replicas if multiplexed_model_id in r.multiplexed_model_ids]
        rest = sorted(
            (r for r in replicas if multiplexed_model_id not in r.multiplexed_model_ids),
            key=lambda r: len(r.multiplexed_model_ids),
        )
        return [rank for rank in (holding, rest) if rank] or [[]]


def _make(config: RequestRouterConfig, deployment_id: DeploymentID) -> RequestRouter:
    cls = config.get_request_router_class()
    if not (isinstance(cls, type) and issubclass(cls, RequestRouter)):
        raise TypeError(
            f"request_router_class {config.request_router_class!r} is not a "
            "serve.request_router.RequestRouter subclass"
        )
    impl = cls(deployment_id)
    impl.initialize_state(**config.request_router_kwargs)
    return impl


class CustomRouting:
    """A ``Router``'s custom router and the calls it is routing (on the caller's loop)."""

    def __init__(self, router: Any, config: RequestRouterConfig) -> None:  # (router.Router)
        self._router = router
        self.config = config
        self._loop = asyncio.get_running_loop()  # (made on the caller's loop, as its router)
        info = router.info
        self._deployment_id = DeploymentID(info.name, info.app)
        self._impl: RequestRouter | None = None
        # Why the router could not be made here: each call fails with it (the table, and
        # the other deployments, are not held back by one router).
        self._broken: BaseException | None = None
        try:
            self._impl = _make(config, self._deployment_id)
        except Exception as exc:
            self._broken = DeploymentUnavailableError(
                f"the request router {config.request_router_class!r} of {router.label} could "
                f"not be made in this process: {type(exc).__name__}: {exc}"
            )
            self._broken.__cause__ = exc
        self._fifo = isinstance(self._impl, FIFOMixin)
        self._in_line: deque[Call] = deque()  # FIFOMixin: the calls waiting, in order
        self._freed = asyncio.Event()  # a call here finished: a replica may have room
        self.waiting = 0

    def submit(self, call: Call) -> None:
        """(On the loop) route ``call``; counted as waiting until it is sent."""
        if self._broken is not None:
            call.set_exception(self._broken)
            return
        self.waiting += 1
        if self._fifo:
            self._in_line.append(call)
            if len(self._in_line) == 1:
                self._router.tasks.spawn(self._route_in_order())
        else:
            self._router.tasks.spawn(self._route_one(call))

    def slot_freed(self) -> None:
        """A call here finished, or the replicas changed: waiting calls try again now."""
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            self._freed.set()
        else:
            self._loop.call_soon_threadsafe(self._freed.set)

    replicas_changed = slot_freed

    async def _route_in_order(self) -> None:
        while self._in_line:
            await self._route_one(self._in_line[0])
            self._in_line.popleft()

    async def _route_one(self, call: Call) -> None:
        try:
            await self._place(call)
        except BaseException as exc:  # the router's own error is this call's failure
            call.set_exception(exc)
        finally:
            self.waiting -= 1

    async def _place(self, call: Call) -> None:
        meta = call.meta or {}
        pending = PendingRequest(
            call.args,
            call.kwargs,
            RequestMetadata(
                call.app,
                call.deployment,
                call.method,
                meta.get("multiplexed_model_id", "") or "",
                meta.get("request_id", "") or "",
            ),
        )
        backoff = _BACKOFF_S
        impl = self._impl
        assert impl is not None
        while not call.done.fired:
            router = self._router
            if router.deleted:
                call.set_exception(router.deleted_error())
                return
            with router.lock:
                live = [s for s in router.slots.values() if not s.dead and not s.draining]
            candidates = [RunningReplica(s, self._deployment_id) for s in live]
            impl.update_replicas(candidates)
            if candidates:
                ranks = await impl.choose_replicas(list(candidates), pending)
                sent = self._send(call, ranks)
                if sent is not None:
                    impl.on_request_routed(pending, sent, ReplicaResult(call))
                    return
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    def _send(self, call: Call, ranks: list[list[RunningReplica]]) -> ReplicaID | None:
        """Send ``call`` to the least loaded replica with room of the first rank that has one."""
        router = self._router
        limit = router.info.max_ongoing_requests
        with router.lock:
            for rank in ranks:
                room = [
                    slot
                    for replica in rank
                    if (slot := router.slots.get(replica.replica_id.unique_id)) is not None
                    and not slot.dead
                    and not slot.draining
                    and slot.load < limit
                ]
                if room:
                    best = min(room, key=lambda s: s.load)
                    if call.done.fired:  # cancelled while the router chose
                        return None
                    best.send(call)
                    return ReplicaID(best.info.replica_id, self._deployment_id)
        return None
