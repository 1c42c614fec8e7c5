"""Custom request routers (Ray Serve's ``ray.serve.request_router``): the base class, its
mixins and the types a router works with. A deployment names its router in
``request_router_config=RequestRouterConfig(request_router_class=...)``."""

from serval._private.caller.request_routers import (
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaResult,
    RequestMetadata,
    RequestRouter,
    RunningReplica,
)
from serval.config import DeploymentID, ReplicaID, RequestRouterConfig

__all__ = [
    "DeploymentID",
    "FIFOMixin",
    "LocalityMixin",
    "MultiplexMixin",
    "PendingRequest",
    "ReplicaID",
    "ReplicaResult",
    "RequestMetadata",
    "RequestRouter",
    "RequestRouterConfig",
    "RunningReplica",
]
