"""The replica's context (Ray Serve's ``ray.serve.context``): what
``serve.get_replica_context()`` returns inside a replica."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serval.config import ReplicaID

__all__ = ["ReplicaContext"]


@dataclass(frozen=True)
class ReplicaContext:
    """The replica a call runs in: its application, deployment, id (a ``ReplicaID``, as in
    Ray Serve 2.10+: ``replica_id.unique_id`` is the id's text) and user object."""

    app_name: str
    deployment: str
    replica_id: ReplicaID
    servable_object: Any

    @property
    def replica_tag(self) -> str:
        """Ray Serve's older name for the replica's id (its text)."""
        return self.replica_id.unique_id


def _get_internal_replica_context() -> ReplicaContext:
    """Ray Serve's internal spelling of ``serve.get_replica_context()`` (its guides use it)."""
    from serval.api import get_replica_context

    return get_replica_context()
