"""The replica's context (Ray Serve's ``ray.serve.context``): what
``serve.get_replica_context()`` returns inside a replica."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["ReplicaContext"]


@dataclass(frozen=True)
class ReplicaContext:
    """The replica a call runs in: its application, deployment, id and user object."""

    app_name: str
    deployment: str
    replica_id: str
    servable_object: Any

    @property
    def replica_tag(self) -> str:
        return self.replica_id
