"""serval: Ray Serve's programming model, embedded on one machine.

``import serval as serve`` and write the same deployments, handles and applications.
"""

# As with Ray Serve (which loads it): code that does `import starlette` and then names
# `starlette.requests.Request` (in an annotation, say) finds it.
import starlette.requests  # noqa: F401

from serval import config, exceptions, grpc_util, metrics, request_router
from serval.api import (
    ReplicaContext,
    delete,
    get_app_handle,
    get_deployment_handle,
    get_replica_context,
    ingress,
    run,
    shutdown,
    start,
    status,
)
from serval.batching import batch
from serval.config import AutoscalingConfig, DeploymentConfig, HTTPOptions
from serval.deployment import Application, Deployment, deployment
from serval.handle import (
    DeploymentHandle,
    DeploymentResponse,
    DeploymentResponseGenerator,
    ObjectRef,
    RayServeHandle,
    RayServeSyncHandle,
    get,
    wait,
)
from serval.multiplex import get_multiplexed_model_id, multiplexed

__version__ = "0.1.0"

__all__ = [
    "Application",
    "AutoscalingConfig",
    "Deployment",
    "DeploymentConfig",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "HTTPOptions",
    "ObjectRef",
    "RayServeHandle",
    "RayServeSyncHandle",
    "ReplicaContext",
    "batch",
    "config",
    "delete",
    "deployment",
    "exceptions",
    "get",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "grpc_util",
    "ingress",
    "metrics",
    "multiplexed",
    "request_router",
    "run",
    "shutdown",
    "start",
    "status",
    "wait",
]
