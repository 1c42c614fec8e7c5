"""Ray Serve's ``ServeInstanceDetails`` (the REST API's ``GET /api/serve/applications/``),
made from the controller's details (``controller/details.py``).

Ray's keys throughout; where Ray names an actor or a node, serval's own values: on the local
backend the node is this machine (its host name, ``127.0.0.1``), a replica's ``pid`` is its
process's and ``actor_name`` its process's role and label; on Ray, the actor's name and node.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

__all__ = ["instance_details"]

# Ray Serve's ``DeploymentSchema`` fields that serval's ``DeploymentConfig`` has too
_CONFIG_FIELDS = (
    "num_replicas",
    "max_ongoing_requests",
    "max_queued_requests",
    "user_config",
    "autoscaling_config",
    "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s",
    "health_check_period_s",
    "health_check_timeout_s",
    "ray_actor_options",
    "placement_group_bundles",
    "placement_group_strategy",
    "max_replicas_per_node",
    "request_router_config",
)
_HTTP_FIELDS = ("host", "port", "root_path", "request_timeout_s", "keep_alive_timeout_s")
_GRPC_FIELDS = ("port", "grpc_servicer_functions", "request_timeout_s")

LogPath = Callable[[str, str, str], "str | None"]  # (app, deployment, replica) -> its log


def instance_details(details: dict[str, Any], log_path: LogPath) -> dict[str, Any]:
    http = details.get("http_options")
    node = _Node(details.get("backend", "local"))
    return {
        "controller_info": node.actor(None, "serval::controller"),
        "proxy_location": _proxy_location(http),
        "http_options": _pick(http, _HTTP_FIELDS) if http else None,
        "grpc_options": _grpc_options(http),
        "proxies": {
            node.node_id(place): {
                **node.actor(place, str(proxy.get("ref", {}).get("actor") or "serval::proxy")),
                "status": proxy["status"],
            }
            for place, proxy in details.get("proxies", {}).items()
        },
        "deploy_mode": "MULTI_APP",
        "applications": {
            name: _application(name, app, node, log_path)
            for name, app in details.get("applications", {}).items()
        },
        "target_capacity": None,
        "target_groups": [],
    }


class _Node:
    """Node and actor details as serval knows them on its backend."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.host_name = socket.gethostname()

    def node_id(self, place: str | None) -> str:
        return place if place else self.host_name

    def actor(self, place: str | None, name: str) -> dict[str, Any]:
        """Ray's ``ServeActorDetails``: where it runs, and its name."""
        return {
            "node_id": self.node_id(place),
            "node_ip": None if place else "127.0.0.1",
            "node_instance_id": None,
            "actor_id": None,
            "actor_name": name,
            "worker_id": None,
            "log_file_path": None,
        }


def _proxy_location(http: dict[str, Any] | None) -> str:
    if http is None or not http.get("enabled", True):
        return "Disabled"
    return str(http.get("location") or "EveryNode")


def _grpc_options(http: dict[str, Any] | None) -> dict[str, Any] | None:
    grpc = (http or {}).get("grpc_options")
    if not isinstance(grpc, dict):
        return {"port": 9000, "grpc_servicer_functions": [], "request_timeout_s": None}
    return _pick(grpc, _GRPC_FIELDS)


def _pick(data: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {n: data.get(n) for n in names if n in data}


def _application(name: str, app: dict[str, Any], node: _Node, log_path: LogPath) -> dict[str, Any]:
    deployments = {
        d: _deployment(name, d, dep, node, log_path) for d, dep in app["deployments"].items()
    }
    status = app["status"]
    if status in ("RUNNING", "DEPLOYING") and any(
        d["status"] == "UNHEALTHY" for d in deployments.values()
    ):
        status = "UNHEALTHY"
    source = app.get("source_config")
    return {
        "name": name,
        "route_prefix": app.get("route_prefix"),
        "docs_path": None,
        "status": status,
        "message": app.get("message", ""),
        "last_deployed_time_s": app.get("deployed_at", 0.0),
        "deployed_app_config": source,
        "source": "declarative" if source is not None else "imperative",
        "deployments": deployments,
        "external_scaler_enabled": False,
        "deployment_topology": None,
    }


def _deployment(
    app: str, name: str, dep: dict[str, Any], node: _Node, log_path: LogPath
) -> dict[str, Any]:
    status, trigger, message = _status(dep)
    config = dep.get("config") or {}
    actor_options = config.get("ray_actor_options") or {}
    return {
        "name": name,
        "status": status,
        "status_trigger": trigger,
        "message": message,
        "deployment_config": {"name": name, **_pick(config, _CONFIG_FIELDS)},
        "target_num_replicas": dep.get("target_num_replicas", 0),
        "required_resources": {"CPU": actor_options.get("num_cpus", 1)},
        "replicas": [_replica(app, name, r, node, log_path) for r in dep["replicas"]],
        "autoscaling_detail": None,
    }


def _status(dep: dict[str, Any]) -> tuple[str, str, str]:
    """Ray Serve's (status, status_trigger, message) of a deployment."""
    if dep.get("message"):
        return "DEPLOY_FAILED", "REPLICA_STARTUP_FAILED", dep["message"]
    if dep.get("health_message"):
        return "UNHEALTHY", "HEALTH_CHECK_FAILED", dep["health_message"]
    if dep["status"] == "HEALTHY":
        return "HEALTHY", "CONFIG_UPDATE_COMPLETED", ""
    return dep["status"], "CONFIG_UPDATE_STARTED", ""


def _replica(
    app: str, deployment: str, rec: dict[str, Any], node: _Node, log_path: LogPath
) -> dict[str, Any]:
    host = rec.get("host") or {}
    place = rec.get("node") or None
    label = f"serval::replica {app}.{deployment}"
    out = node.actor(place, str(host.get("actor") or label))
    out["log_file_path"] = log_path(app, deployment, rec["replica_id"])
    out.update(
        replica_id=rec["replica_id"],
        state=rec["state"],
        pid=host.get("pid"),
        start_time_s=rec.get("started_at", 0.0),
    )
    return out
