"""A serval cluster on Ray, from a driver's side: connect to Ray, find the cluster's controller
(a detached, named actor) or start it, and stop it at ``serve.shutdown``.

A driver that called ``ray.init(...)`` itself keeps its arguments (``address="auto"``,
``ray://...``, ``runtime_env``, ``namespace``); otherwise serval calls ``ray.init()``, which
joins the cluster ``RAY_ADDRESS`` names or starts a Ray instance on this machine (on
127.0.0.1, as every listener of serval's unless told otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serval._private.backends import ray_store
from serval._private.backends.ray_backend import head_node
from serval._private.process.dashboard import RAY_DEFAULT_PORT, DashboardOptions
from serval._private.process.ray_actors import ControllerActor, DashboardActor, connect_process
from serval.config import HTTPOptions
from serval.exceptions import ServalError

__all__ = [
    "DEFAULT_NAMESPACE",
    "connect",
    "dashboard_url",
    "deployable_runtime_env",
    "init_ray",
    "is_running",
    "join",
    "stop",
]

DEFAULT_NAMESPACE = ray_store.DEFAULT_NAMESPACE

logger = logging.getLogger(__name__)

# A controller's first start includes a Ray worker process's (seconds, more on a busy node).
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 30.0


def init_ray(address: str | None = None) -> None:
    """Connect this process to Ray: to ``address`` if given, else to ``RAY_ADDRESS``'s cluster,
    else to a new Ray instance on this machine (as ``ray.init()`` does)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)


def join(namespace: str = DEFAULT_NAMESPACE) -> None:
    """Connect this process to Ray and to the serval cluster of ``namespace`` (running or not)."""
    init_ray()
    connect_process(namespace)


def connect(
    http_options: HTTPOptions,
    namespace: str = DEFAULT_NAMESPACE,
    dashboard: DashboardOptions | None = None,
    logging_config: dict[str, Any] | None = None,
) -> bool:
    """Join the serval cluster of ``namespace``, starting its controller (and its dashboard)
    if there is none; whether this call started it. ``logging_config``: how a new cluster's
    controller, proxies and dashboard log."""
    join(namespace)
    created = False
    try:
        actor = ray.get_actor(ray_store.CONTROLLER_ACTOR, namespace=namespace)
    except ValueError:
        ray_store.set_system_logging(namespace, logging_config)
        actor, created = _start_controller(http_options, namespace), True
    try:
        ray.get(actor.endpoint.remote(), timeout=_START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise ServalError(
            f"the serval controller on Ray did not start within {_START_TIMEOUT_S:.0f}s "
            "(are there nodes with room for it? see `ray status`)"
        ) from None
    except ray.exceptions.RayError as exc:
        raise ServalError(f"the serval controller on Ray could not start: {exc}") from None
    if created:
        _start_dashboard(dashboard or DashboardOptions(port=RAY_DEFAULT_PORT), namespace)
    return created


def _start_dashboard(options: DashboardOptions, namespace: str) -> None:
    """The dashboard as a detached actor on the head node (Ray restarts it if it dies). Waited
    for only when its port was asked for: a taken one is then this call's error."""
    if options.port == 0:
        return
    actor_options: dict[str, Any] = {
        "name": ray_store.DASHBOARD_ACTOR,
        "namespace": namespace,
        "lifetime": "detached",
        "max_restarts": -1,
        "num_cpus": 0,
        "get_if_exists": True,
    }
    head = head_node()
    if head is not None:
        actor_options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    actor_class = ray.remote(DashboardActor)
    actor: Any = actor_class.options(**actor_options).remote(namespace, options.to_json())
    if not options.explicit:
        return
    try:
        ray.get(actor.url.remote(), timeout=_START_TIMEOUT_S)
    except ray.exceptions.RayError as exc:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        cause = getattr(exc, "cause", None) or exc
        raise ServalError(f"the dashboard could not start: {cause}") from None


def dashboard_url(namespace: str = DEFAULT_NAMESPACE, timeout: float = 30.0) -> str | None:
    """The dashboard's URL with its token, once it listens (None: the cluster has none)."""
    try:
        actor = ray.get_actor(ray_store.DASHBOARD_ACTOR, namespace=namespace)
    except ValueError:
        return None
    try:
        url: Any = ray.get(actor.url.remote(), timeout=timeout)
    except ray.exceptions.RayError:
        return None
    return None if url is None else f"{url}?token={ray_store.dashboard_token(namespace)}"


def _start_controller(http_options: HTTPOptions, namespace: str) -> Any:
    options: dict[str, Any] = {
        "name": ray_store.CONTROLLER_ACTOR,
        "namespace": namespace,
        "lifetime": "detached",
        "max_restarts": -1,  # Ray restarts a controller that dies; it recovers from the store
        "max_concurrency": 64,
        "num_cpus": 0,
        "get_if_exists": True,  # another driver may be starting it too
    }
    head = head_node()
    if head is not None:  # as in Ray Serve: on the head node, which lives as long as Ray does
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=True)
    actor_class = ray.remote(ControllerActor)
    json = http_options.to_json() if http_options.enabled else None
    return actor_class.options(**options).remote(namespace, json)


def deployable_runtime_env(env: dict[str, Any] | None) -> dict[str, Any] | None:
    """A deployment's ``runtime_env`` as its replica actors can take it. As in Ray Serve, the
    driver's job ``runtime_env`` (``ray.init(runtime_env=...)``) lies under it: the
    deployment's fields win, ``env_vars`` merge by name. A local ``working_dir`` or
    ``py_modules`` entry is uploaded from here to the cluster (only a driver can: the replica
    actors are started by the controller) and replaced by its URI."""
    job = dict(ray.get_runtime_context().runtime_env or {})
    own = dict(env or {})
    merged = {**job, **own}
    env_vars = {**(job.get("env_vars") or {}), **(own.get("env_vars") or {})}
    if env_vars:
        merged["env_vars"] = env_vars
    if not merged:
        return None
    if merged.get("working_dir") or merged.get("py_modules"):
        from ray._private.runtime_env.py_modules import upload_py_modules_if_needed
        from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

        include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
        merged = upload_py_modules_if_needed(merged, include_gitignore, logger=logger)
        merged = upload_working_dir_if_needed(merged, include_gitignore, logger=logger)
        merged.pop("excludes", None)  # (used by the upload only)
    return merged


def is_running(namespace: str = DEFAULT_NAMESPACE) -> bool:
    """Whether the serval cluster of ``namespace`` has a controller (maybe restarting)."""
    if not ray.is_initialized():
        return False
    try:
        ray.get_actor(ray_store.CONTROLLER_ACTOR, namespace=namespace)
    except ValueError:
        return False
    return True


def stop(namespace: str = DEFAULT_NAMESPACE) -> None:
    """After the controller was asked to shut down: end the dashboard's actor, wait for the
    controller to finish, then end its actor (Ray would restart them otherwise)."""
    with contextlib.suppress(ValueError):
        board = ray.get_actor(ray_store.DASHBOARD_ACTOR, namespace=namespace)
        with contextlib.suppress(Exception):
            ray.kill(board, no_restart=True)
    try:
        actor = ray.get_actor(ray_store.CONTROLLER_ACTOR, namespace=namespace)
    except ValueError:
        return
    with contextlib.suppress(ray.exceptions.RayError):
        ray.get(actor.run.remote(), timeout=_STOP_TIMEOUT_S)
    with contextlib.suppress(Exception):
        ray.kill(actor, no_restart=True)
