"""What ``serve.status()`` returns, with Ray Serve's names.

Application status: ``NOT_STARTED``, ``DEPLOYING``, ``RUNNING``, ``DEPLOY_FAILED``, ``DELETING``.
Deployment status: ``UPDATING``, ``HEALTHY``, ``UNHEALTHY``. ``replica_states`` counts replicas by
state (``STARTING``, ``RUNNING``, ``STOPPING``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ApplicationStatusOverview", "DeploymentStatusOverview", "ServeStatus"]


@dataclass(frozen=True)
class DeploymentStatusOverview:
    status: str
    replica_states: dict[str, int] = field(default_factory=dict)
    message: str = ""


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
