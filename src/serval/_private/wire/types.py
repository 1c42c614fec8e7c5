"""The vocabulary both sides of the wire share: what an application is as the controller
receives it, and the replica table the controller pushes to every caller.

Plain frozen dataclasses of builtin values (user code stays opaque bytes in ``payload``), so
that every process can read them, the controller included, which has none of the user's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serval.config import (
    AutoscalingPolicy,
    BackpressureConfig,
    DeploymentConfig,
    RequestRouterConfig,
)

__all__ = [
    "AppSpec",
    "DeploymentInfo",
    "DeploymentSpec",
    "ReplicaInfo",
    "ReplicaInit",
    "Routes",
    "Table",
]


@dataclass(frozen=True)
class DeploymentSpec:
    """One deployment of an app as the controller receives it (code stays opaque bytes)."""

    name: str
    payload: bytes  # cloudpickle of (func_or_class, init_args, init_kwargs)
    config: DeploymentConfig
    version: str  # changes when new replicas are needed
    is_function: bool


@dataclass(frozen=True)
class AppSpec:
    name: str
    route_prefix: str | None
    ingress: str
    deployments: tuple[DeploymentSpec, ...]
    sys_path: tuple[str, ...]
    cwd: str
    # The config-file entry this app was deployed from (``serval config`` shows it).
    source_config: dict[str, Any] | None = None
    # The entry's application-level autoscaling policy (a path; run by a replica)
    autoscaling_policy: AutoscalingPolicy | None = None


@dataclass(frozen=True)
class ReplicaInfo:
    """What a caller needs to reach a replica (pushed by the controller)."""

    replica_id: str
    address: str  # where it listens (``transport.dial``)
    model_ids: frozenset[str] = frozenset()
    # Its user's async methods: a call by reference to one goes to the replica actor's
    # entry that may wait on the loop (the Ray backend: ``process/ray_actors.py``)
    async_methods: frozenset[str] = frozenset()
    # What its user's record_routing_stats() last returned (a custom request router reads it)
    routing_stats: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class DeploymentInfo:
    app: str
    name: str
    max_ongoing_requests: int
    max_queued_requests: int
    replicas: tuple[ReplicaInfo, ...]
    # The HTTP answer when max_queued_requests sheds a request (None: Ray Serve's default,
    # a 503 without Retry-After).
    backpressure: BackpressureConfig | None = None
    # A custom request router (None: the built-in routing)
    request_router: RequestRouterConfig | None = None


# route_prefix -> (app, ingress deployment)
Routes = dict[str, tuple[str, str]]
# (version, {(app, deployment): info}, routes): what the controller pushes to its subscribers
Table = tuple[int, dict[tuple[str, str], DeploymentInfo], Routes]


@dataclass(frozen=True)
class ReplicaInit:
    """What a starting replica gets from the controller when it registers."""

    app: str
    deployment: str
    payload: bytes  # the DeploymentSpec's: cloudpickle of (func_or_class, args, kwargs)
    is_function: bool
    config: DeploymentConfig
    sys_path: tuple[str, ...]  # the driver's code path
    cwd: str  # the driver's working directory
