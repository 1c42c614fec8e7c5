"""The replica's context (Ray Serve's ``ray.serve.context``): what
``serve.get_replica_context()`` returns inside a replica."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serval._private.caller import runtime
from serval._private.replica import request_context
from serval.config import DeploymentID, ReplicaID
from serval.exceptions import ServalError

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
    """``serve.get_replica_context()``, by Ray Serve's internal name (its guides use it)."""
    me = runtime.replica()
    if me is None:
        raise ServalError("get_replica_context() may only be called from within a replica")
    replica_id = ReplicaID(me.replica_id, DeploymentID(me.deployment, me.app))
    return ReplicaContext(me.app, me.deployment, replica_id, request_context.servable())
