"""What ``serve.status()`` returns, with Ray Serve's names.

Application status: ``NOT_STARTED``, ``DEPLOYING``, ``RUNNING``, ``DEPLOY_FAILED``, ``DELETING``.
Deployment status: ``UPDATING``, ``HEALTHY``, ``UNHEALTHY``. ``replica_states`` counts replicas by
state (``STARTING``, ``RUNNING``, ``STOPPING``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "ReplicaState",
    "ReplicaStatusOverview",
    "ServeStatus",
]


class ApplicationStatus(StrEnum):
    """Ray Serve's application states (a member equals its name as a string)."""

    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class DeploymentStatus(StrEnum):
    """Ray Serve's deployment states (serval reports UPDATING, HEALTHY and UNHEALTHY)."""

    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"


class ReplicaState(StrEnum):
    """The replica states ``replica_states`` counts."""

    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"


@dataclass(frozen=True)
class ReplicaStatusOverview:
    """One replica, as the controller sees it (serval's own, beside Ray's counts): what a
    replica that is not RUNNING waits on, and for how long."""

    replica_id: str
    state: str  # a ReplicaState
    # What it is doing in that state: "starting its process", "running its constructor",
    # "waiting for Ray to place and start its actor (it asks for ...)", "stopping"; "" when
    # RUNNING.
    phase: str = ""
    phase_s: float = 0.0  # seconds in that phase so far


@dataclass(frozen=True)
class DeploymentStatusOverview:
    status: str
    replica_states: dict[str, int] = field(default_factory=dict)
    message: str = ""
    target_replicas: int = 0  # how many replicas it is meant to have now
    replicas: tuple[ReplicaStatusOverview, ...] = ()


@dataclass(frozen=True)
class ApplicationStatusOverview:
    status: str
    message: str = ""
    route_prefix: str | None = None
    last_deployed_time_s: float = 0.0
    deployments: dict[str, DeploymentStatusOverview] = field(default_factory=dict)


@dataclass(frozen=True)
class ServeStatus:
    applications: dict[str, ApplicationStatusOverview] = field(default_factory=dict)
