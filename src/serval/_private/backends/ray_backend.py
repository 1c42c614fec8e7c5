"""The Ray backend, as the controller sees it: replicas and the HTTP proxy are Ray actors.

Ray places them (``ray_actor_options``' resources, placement groups), watches their nodes and
reports their death; serval does neither itself. Each replica is a detached, named actor
(``SERVAL_REPLICA:<id>``), so that it outlives a controller that dies and a restarted one
adopts it by name. An actor's ``run`` call returns when its replica has drained, and fails
when the actor (or its node) dies: that call is how the controller learns a host's end.

The actor classes are entry points, as the local backend's worker module is: they live with
the processes' mains (``process.ray_actors``) and are named here by import path.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from serval._private.backends import ray_store
from serval._private.backends.base import Backend, Exit, HostRef, ReplicaHost
from serval.config import DeploymentConfig

__all__ = [
    "ASYNC_GROUP",
    "CONTROL_GROUP",
    "RayBackend",
    "RayHost",
    "actor_options",
    "head_node",
    "replica_threads",
]

logger = logging.getLogger(__name__)

_ACTORS = "serval._private.process.ray_actors"
# A replica reserves one CPU unless told otherwise, as in Ray Serve; serval's own actors none.
_DEFAULT_NUM_CPUS = 1.0
# A replica actor's concurrency groups (``process/ray_actors.ReplicaActor``): its ``run``'s,
# and the one whose threads wait for async methods
CONTROL_GROUP = "serval_control"
ASYNC_GROUP = "serval_async"
# Ray makes an actor's threads when it starts it, and hands each call to the next in turn: the
# more threads, the slower every call (measured here: 16 cost nothing, 64 halve throughput),
# so sync methods get a few, as a replica rarely runs more than a few at once on its GIL:
# twice max_ongoing_requests (the calls beyond it wait in the replica, counted in its queue),
# at most 16 (beyond, calls wait in Ray).
_SYNC_THREADS = 16
# Threads that wait for async methods (calls beyond wait in Ray): what the replica may run,
# in a few sizes (each size is a class Ray exports)
_ASYNC_THREADS = (8, 32, 128, 512)


def replica_threads(config: DeploymentConfig) -> tuple[int, int]:
    """A replica actor's threads for calls by reference: (sync methods, async methods)."""
    wanted = config.max_ongoing_requests
    sync = min(2 * wanted, _SYNC_THREADS)
    for size in _ASYNC_THREADS:
        if size >= wanted:
            return sync, size
    return sync, _ASYNC_THREADS[-1]


@functools.cache
def _actor_class(name: str, async_threads: int = 0) -> Any:
    """The Ray actor class (made once: Ray exports a class's code each time it is made). A
    replica's has the threads of its concurrency groups (which Ray takes here, not in
    ``.options()``)."""
    cls = getattr(importlib.import_module(_ACTORS), name)
    if async_threads:
        groups = {CONTROL_GROUP: 1, ASYNC_GROUP: async_threads}
        return ray.remote(concurrency_groups=groups)(cls)  # type: ignore[call-overload]
    return ray.remote(cls)


def actor_options(config: DeploymentConfig) -> dict[str, Any]:
    """A replica's ``ray_actor_options``, as Ray's ``.options()`` takes them."""
    given = dict(config.ray_actor_options)
    options: dict[str, Any] = {"num_cpus": given.pop("num_cpus", _DEFAULT_NUM_CPUS)}
    for key in ("num_gpus", "memory", "object_store_memory", "resources", "accelerator_type"):
        if given.get(key) is not None:
            options[key] = given[key]
    runtime_env = given.get("runtime_env")
    if runtime_env:
        options["runtime_env"] = dict(runtime_env)
    return options


class RayHost(ReplicaHost):
    """A replica's (or the proxy's) actor."""

    def __init__(
        self,
        host_id: str,
        actor: Any,
        name: str,
        namespace: str,
        group: PlacementGroup | None = None,
        node: str | None = None,
        label: str | None = None,
    ) -> None:
        self.host_id = host_id
        self.label = label
        self._actor = actor
        self._name = name
        self._namespace = namespace
        self._group = group
        self.node = node  # where it was placed, when serval chose the node
        loop = asyncio.get_running_loop()
        self._ended: asyncio.Future[None] = asyncio.wrap_future(
            actor.run.remote().future(), loop=loop
        )

    @property
    def ended_future(self) -> asyncio.Future[None]:
        return self._ended

    @property
    def ref(self) -> HostRef:
        ref: HostRef = {"actor": self._name}
        if self._group is not None:
            ref["placement_group"] = self._group.id.hex()
        if self.node is not None:
            ref["node"] = self.node
            ref["label"] = self.label
        return ref

    def kill(self) -> None:
        try:
            ray.kill(self._actor, no_restart=True)
        except Exception as exc:  # already gone
            logger.debug("killing %s: %s", self._name, exc)
        self._release()

    async def wait(self) -> Exit:
        try:
            await asyncio.shield(self._ended)
        except ray.exceptions.ActorUnschedulableError as exc:  # its node is gone (affinity)
            self._release()
            return Exit(None, f"its actor cannot be placed: {_first_line(exc)}", place_gone=True)
        except ray.exceptions.RayError as exc:
            self._release()
            node = self.node
            gone = node is not None and node not in await asyncio.to_thread(_alive_node_resources)
            return Exit(None, f"its actor died: {_first_line(exc)}", place_gone=gone)
        except Exception as exc:  # the actor's run raised: it could not start
            self.kill()
            return Exit(1, f"it failed: {_first_line(exc)}")
        self.kill()  # drained: its process is no longer needed
        return Exit(0, "it drained and exited")

    def _release(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            try:
                remove_placement_group(group)
            except Exception as exc:
                logger.debug("removing the placement group of %s: %s", self._name, exc)


def _deployment_of(label: str) -> str:
    return label.rsplit("#", 1)[0]  # "app.deployment#index"


def _resources(options: dict[str, Any]) -> dict[str, float]:
    wanted = {
        "CPU": float(options.get("num_cpus") or 0),
        "GPU": float(options.get("num_gpus") or 0),
    }
    wanted.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    return {k: v for k, v in wanted.items() if v > 0}


def _alive_node_resources() -> dict[str, dict[str, float]]:
    """The Ray cluster's live nodes: id -> total resources."""
    return {
        str(n["NodeID"]): dict(n.get("Resources", {}))
        for n in ray.nodes()  # type: ignore[no-untyped-call]
        if n.get("Alive")
    }


def head_node() -> str | None:
    """The head node's id (Ray marks it with a resource of its own), if it is alive."""
    for node, total in _alive_node_resources().items():
        if "node:__internal_head__" in total:
            return node
    return None


def _alive_nodes() -> list[str]:
    """The ids of the live nodes a proxy can be placed on (those with CPUs)."""
    return sorted(node for node, total in _alive_node_resources().items() if "CPU" in total)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RayBackend(Backend):
    name = "ray"

    def __init__(self, namespace: str, node_id: str) -> None:
        self.namespace = namespace
        self.node_id = node_id  # the controller's node: where HeadOnly's proxy runs
        # deployment ("app.name") -> node -> its replicas placed there (max_replicas_per_node)
        self._per_node: dict[str, dict[str, int]] = {}

    @classmethod
    def for_controller(cls, address: str, lifeline_fd: int | None) -> RayBackend:
        return cls(ray_store.namespace_of(address), ray.get_runtime_context().get_node_id())

    def log_location(self) -> str:
        return "the Ray logs of its actor (ray logs, or the Ray dashboard)"

    def replica_address(self, replica_id: str) -> str:
        return ""  # known when it listens: it says so when it registers

    def save_checkpoint(self, address: str, data: bytes) -> None:
        ray_store.save_checkpoint(self.namespace, data)

    def load_checkpoint(self, address: str) -> bytes | None:
        return ray_store.checkpoint(self.namespace)

    def unsupported(self, config: DeploymentConfig) -> str | None:
        if config.max_replicas_per_node is not None and config.placement_group_bundles:
            return "max_replicas_per_node cannot be combined with placement_group_bundles"
        return None

    def start_replica(
        self,
        replica_id: str,
        label: str,
        env: dict[str, str] | None = None,
        config: DeploymentConfig | None = None,
    ) -> ReplicaHost:
        config = config if config is not None else DeploymentConfig()
        options = actor_options(config)
        group = None
        if config.placement_group_bundles is not None:
            # The replica takes the first bundle; what it starts itself may use the rest.
            group = placement_group(
                config.placement_group_bundles, strategy=config.placement_group_strategy
            )
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
            )
        node = None
        if config.max_replicas_per_node is not None:
            node = self._node_with_room(label, options, config.max_replicas_per_node)
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
        working_dir = bool((options.get("runtime_env") or {}).get("working_dir"))
        name = ray_store.replica_actor_name(replica_id)
        sync_threads, async_threads = replica_threads(config)
        actor = (
            _actor_class("ReplicaActor", async_threads)
            .options(
                name=name,
                namespace=self.namespace,
                lifetime="detached",
                max_restarts=0,
                max_concurrency=sync_threads,
                **options,
            )
            .remote(self.namespace, replica_id, label, working_dir)
        )
        host = RayHost(replica_id, actor, name, self.namespace, group, node, label)
        if node is not None:
            self._track(label, host)
        return host

    def _node_with_room(self, label: str, options: dict[str, Any], most: int) -> str:
        """A live node that has fewer than ``most`` replicas of ``label``'s deployment and
        the resources a replica asks for (in total: Ray decides if they are free); the one
        with the fewest of them, so that replicas spread."""
        wanted = _resources(options)
        counts = self._per_node.get(_deployment_of(label), {})
        fits = [
            (counts.get(node_id, 0), node_id)
            for node_id, total in _alive_node_resources().items()
            if counts.get(node_id, 0) < most
            and all(total.get(k, 0.0) >= v for k, v in wanted.items())
        ]
        if not fits:
            raise RuntimeError(
                f"no node has room for another replica of {_deployment_of(label)} "
                f"(max_replicas_per_node={most}); add nodes, or lower num_replicas"
            )
        return min(fits)[1]

    def _track(self, label: str, host: RayHost) -> None:
        assert host.node is not None
        counts = self._per_node.setdefault(_deployment_of(label), {})
        counts[host.node] = counts.get(host.node, 0) + 1

        def forget(_: object) -> None:
            assert host.node is not None
            left = counts.get(host.node, 1) - 1
            if left > 0:
                counts[host.node] = left
            else:
                counts.pop(host.node, None)

        host.ended_future.add_done_callback(forget)

    # Nodes join and leave a Ray cluster: the controller follows them (EveryNode).
    proxy_nodes_change = True

    def proxy_nodes(self, location: str) -> list[str]:
        if location == "HeadOnly":
            return [head_node() or self.node_id]
        return _alive_nodes()

    async def current_proxy_nodes(self, location: str) -> list[str]:
        return await asyncio.to_thread(self.proxy_nodes, location)

    def start_proxy(self, http_options_json: str, node: str = "") -> ReplicaHost:
        node = node or self.node_id
        name = ray_store.proxy_actor_name(node)
        actor = (
            _actor_class("ProxyActor")
            .options(
                name=name,
                namespace=self.namespace,
                lifetime="detached",
                max_restarts=0,
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
            )
            .remote(self.namespace, http_options_json, node)
        )
        return RayHost("serval::proxy", actor, name, self.namespace, node=node)

    def adopt(self, host_id: str, ref: HostRef) -> ReplicaHost | None:
        name = ref.get("actor")
        if not isinstance(name, str):
            return None
        try:
            actor = ray.get_actor(name, namespace=self.namespace)
        except ValueError:
            return None  # gone
        group = None
        if isinstance(ref.get("placement_group"), str):
            group = _placement_group_by_id(ref["placement_group"])
        node = ref.get("node") if isinstance(ref.get("node"), str) else None
        label = ref.get("label") if isinstance(ref.get("label"), str) else None
        host = RayHost(host_id, actor, name, self.namespace, group, node, label)
        if node is not None and label is not None:
            self._track(label, host)
        return host


def _placement_group_by_id(hex_id: str) -> PlacementGroup | None:
    try:
        return PlacementGroup(ray.PlacementGroupID(bytes.fromhex(hex_id)))
    except Exception:
        return None
