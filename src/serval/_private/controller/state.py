"""The controller's records of applications, deployments and replicas."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from serval._private.backends.base import ReplicaHost
from serval._private.controller.autoscaling import AutoscalingPolicy
from serval._private.wire.types import AppSpec, DeploymentSpec


class PushSink(Protocol):
    def send_pieces(self, pieces: list[bytes | memoryview]) -> None: ...


class ControlPeer(Protocol):
    """The far end of a control connection, as the controller uses it: ``wire.rpc.RpcPeer``
    over a socket, or an in-process end (``backends.memory``). Calls to it go through the typed
    stubs (``ReplicaCalls(peer.call)``); a subscriber gets the tables as pushed frames."""

    @property
    def info(self) -> dict[str, Any]:
        """What the other side said about itself."""

    @property
    def closed(self) -> bool: ...

    @property
    def conn(self) -> PushSink | None:
        """Where pushes to it are sent (None: not connected)."""

    async def call(self, method: str, **kwargs: Any) -> Any: ...

    def close(self) -> None: ...


class ReplicaState(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"


@dataclass
class ReplicaRecord:
    replica_id: str
    index: int
    version: str
    host: ReplicaHost
    address: str  # where callers reach it (the backend's replica_address)
    state: ReplicaState = ReplicaState.STARTING
    peer: ControlPeer | None = None
    model_ids: frozenset[str] = frozenset()
    async_methods: frozenset[str] = frozenset()  # (what the replica reported when ready)
    routing_stats: tuple[tuple[str, Any], ...] = ()  # its record_routing_stats(), last asked
    # (the controller clock's monotonic time) when it was started, registered (its process is
    # up: the constructor runs) and asked to stop, for status: what a slow replica waits on
    started_at: float = 0.0
    registered_at: float | None = None
    stopping_at: float | None = None


@dataclass
class CustomPolicyState:
    """What the controller keeps of a custom autoscaling policy, for a deployment or (an
    application-level policy) an application (``controller/custom_autoscaling.py``)."""

    basis: object  # what it was set up for: a new basis starts it afresh
    state: bytes = b""  # the policy's policy_state, pickled by the replica that ran it
    runner: str | None = None  # the replica that ran it last (asked again while it runs)
    # replica id -> metric name -> (time.time(), value): record_autoscaling_stats() results
    stats: dict[str, dict[str, deque[tuple[float, float]]]] = field(default_factory=dict)
    last_scale_up: float | None = None
    last_scale_down: float | None = None
    error: str = ""  # the last failure logged (logged again only when it changes)


@dataclass
class DeploymentState:
    app: str
    spec: DeploymentSpec
    replicas: dict[str, ReplicaRecord] = field(default_factory=dict)
    next_index: int = 0
    failed_message: str = ""
    # The last failed health check's reason, until a replica started since passes one
    # (status only: the failed replica is replaced at once).
    health_message: str = ""
    health_failed_at: float = 0.0
    start_failures: int = 0
    starts: int = 0  # replicas started, ever (serve_deployment_replica_starts)
    reconfiguring: int = 0  # reconfigure() calls in flight
    policy: AutoscalingPolicy | None = None
    autoscale_target: int = 0
    custom: CustomPolicyState | None = None  # its custom autoscaling policy's, if it has one
    # Requests waiting at callers, as each caller last reported it: peer id -> (count, time).
    queued: dict[int, tuple[int, float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def target(self) -> int:
        if self.spec.config.autoscaling_config is not None:
            return self.autoscale_target
        return self.spec.config.num_replicas

    def queued_now(self, now: float, max_age: float) -> int:
        return sum(n for n, at in self.queued.values() if now - at <= max_age)

    def current(self) -> list[ReplicaRecord]:
        """Replicas of the wanted version that are not on their way out."""
        return [
            r
            for r in self.replicas.values()
            if r.version == self.spec.version and r.state != ReplicaState.STOPPING
        ]

    def outdated(self) -> list[ReplicaRecord]:
        return [
            r
            for r in self.replicas.values()
            if r.version != self.spec.version and r.state != ReplicaState.STOPPING
        ]

    def running(self) -> list[ReplicaRecord]:
        return [r for r in self.replicas.values() if r.state == ReplicaState.RUNNING]

    def status(self) -> str:
        if self.failed_message:
            return "UNHEALTHY"
        current = self.current()
        ready = [r for r in current if r.state == ReplicaState.RUNNING]
        if (
            len(ready) == self.target
            and len(current) == self.target
            and not self.outdated()
            and not self.reconfiguring
        ):
            return "HEALTHY"
        return "UPDATING"

    def replica_states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.replicas.values():
            counts[r.state.value] = counts.get(r.state.value, 0) + 1
        return counts


@dataclass
class AppState:
    spec: AppSpec
    deployments: dict[str, DeploymentState]
    deployed_at: float = field(default_factory=time.time)
    deleting: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    custom: CustomPolicyState | None = None  # its application-level autoscaling policy's

    def status(self) -> tuple[str, str]:
        if self.deleting:
            return "DELETING", ""
        failed = [d for d in self.deployments.values() if d.failed_message]
        if failed:
            return "DEPLOY_FAILED", "\n".join(
                f"deployment {d.name!r} failed: {d.failed_message}" for d in failed
            )
        if all(d.status() == "HEALTHY" for d in self.deployments.values()):
            return "RUNNING", ""
        return "DEPLOYING", ""

    def notify(self) -> None:
        """Wake everyone waiting on this app, then re-arm."""
        self.changed.set()
        self.changed = asyncio.Event()
