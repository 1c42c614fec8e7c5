"""The controller's state in detail, as plain JSON-able values: every application, deployment
and replica (its state, where it runs, since when, why it failed a health check) and the
proxies. The dashboard shapes it into Ray Serve's ``ServeInstanceDetails``; nothing here
unpickles user code (configs are shown field by field, what is not JSON as its text).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any

from serval._private.controller.state import AppState, DeploymentState, ReplicaRecord
from serval._private.wire import endpoints

if TYPE_CHECKING:
    from serval._private.controller.clock import Clock
    from serval._private.controller.proxies import Proxies
    from serval.config import HTTPOptions

__all__ = ["of"]

_QUEUE_REPORT_MAX_AGE_S = 2.0  # as the autoscaler counts callers' queue reports


def of(
    backend: str,
    http: HTTPOptions | None,
    proxies: Proxies | None,
    apps: dict[str, AppState],
    clock: Clock,
) -> dict[str, Any]:
    """The controller's state (its backend's name, options, proxies, apps) in detail."""
    return {
        "controller": {"pid": os.getpid()},
        "backend": backend,
        "http_options": _http_options(http),
        "proxies": _proxies(proxies),
        "applications": {name: _app(clock, app) for name, app in apps.items()},
    }


def _http_options(http: HTTPOptions | None) -> dict[str, Any] | None:
    if http is None:
        return None
    data = jsonable(http)
    assert isinstance(data, dict)
    data.pop("ssl_keyfile_password", None)  # (a secret, never shown)
    return data


def _proxies(proxies: Proxies | None) -> dict[str, dict[str, Any]]:
    if proxies is None:
        return {}
    out = {}
    for node, proxy in proxies.by_node.items():
        if proxy.error is not None:
            status = "UNHEALTHY"
        elif proxy.ready_at is not None:
            status = "HEALTHY"
        else:
            status = "STARTING"
        ref = proxy.host.ref if proxy.host is not None else {}
        out[node] = {"status": status, "ref": jsonable(ref), "error": proxy.error}
    return out


def _app(clock: Clock, app: AppState) -> dict[str, Any]:
    status, message = app.status()
    now = clock.monotonic()
    wall = time.time() - now  # the wall-clock time at monotonic 0 (a replica's start time)
    return {
        "status": status,
        "message": message,
        "route_prefix": app.spec.route_prefix,
        "ingress": app.spec.ingress,
        "deployed_at": app.deployed_at,
        "source_config": jsonable(app.spec.source_config),
        "deployments": {name: _deployment(dep, now, wall) for name, dep in app.deployments.items()},
    }


def _deployment(dep: DeploymentState, now: float, wall: float) -> dict[str, Any]:
    return {
        "status": dep.status(),
        "message": dep.failed_message,
        # a failed health check's reason, until a replica of it passes one
        "health_message": dep.health_message,
        "target_num_replicas": dep.target,
        "version": dep.spec.version,
        "queued": dep.queued_now(now, _QUEUE_REPORT_MAX_AGE_S),
        "config": jsonable(dep.spec.config),
        "replicas": [_replica(r, wall) for r in dep.replicas.values()],
    }


def _replica(rec: ReplicaRecord, wall: float) -> dict[str, Any]:
    return {
        "replica_id": rec.replica_id,
        "state": rec.state.value,
        "version": rec.version,
        "started_at": wall + rec.started_at,  # (time.time(); adopted: when this controller did)
        "host": jsonable(rec.host.ref),
        # its node ("" on the local backend): where the backend placed it, or where it listens
        "node": rec.host.ref.get("node") or endpoints.node_of(rec.address),
    }


def jsonable(value: Any) -> Any:
    """``value`` as JSON's types: dataclasses field by field, what JSON has no type for as
    its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(value)
