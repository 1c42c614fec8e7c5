"""The top-level verbs: start, run, status, delete, shutdown, and handle lookup."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import logging
import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from serval import _progress
from serval._private.caller import control, runtime
from serval._private.process.cluster import LocalCluster, is_running
from serval._private.process.dashboard import RAY_DEFAULT_PORT
from serval._private.process.dashboard import dashboard_options as dashboard_options_of
from serval._private.process.settings import settings
from serval._private.wire.control import ControllerCalls
from serval._private.wire.types import AppSpec
from serval.config import HTTPOptions, gRPCOptions
from serval.context import ReplicaContext, _get_internal_replica_context
from serval.deployment import _UNSET, Application, build, spec_version
from serval.exceptions import (
    DeploymentFailedError,
    DeploymentNotFoundError,
    ServalError,
)
from serval.handle import DeploymentHandle
from serval.ingress import ingress
from serval.status import ServeStatus

if TYPE_CHECKING:
    from serval.logging_config import LoggingConfig

__all__ = [
    "ReplicaContext",
    "delete",
    "get_app_handle",
    "get_deployment_handle",
    "get_replica_context",
    "ingress",
    "run",
    "shutdown",
    "start",
    "status",
]

logger = logging.getLogger(__name__)

_SHUTDOWN_TIMEOUT_S = 60.0


class _Owner:
    """The cluster this process started, if any."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cluster: LocalCluster | None = None
        self.ray_namespace: str | None = None  # connected to a serval cluster on Ray
        self.http_options = HTTPOptions()
        self.atexit_registered = False


_owner = _Owner()


def start(
    http_options: dict[str, Any] | HTTPOptions | None = None,
    *,
    address: str | None = None,
    detached: bool = False,
    proxy_location: str | None = None,
    backend: str | None = None,
    grpc_options: dict[str, Any] | gRPCOptions | None = None,
    _own_address: str | None = None,
    dashboard_options: dict[str, Any] | None = None,
    logging_config: LoggingConfig | dict[str, Any] | None = None,
) -> None:
    """Start a cluster (``serve.run`` does it when needed); returns once its HTTP proxy
    listens.

    ``backend="local"`` (the default): a cluster on this machine owned by this process; every
    process of it exits when this one does. With ``address`` (or the ``SERVAL_ADDRESS``
    environment variable) connect to the local cluster running there instead, e.g. one
    started by ``serval start``; its applications outlive this process.

    ``backend="ray"`` (or ``SERVAL_BACKEND=ray``, or a driver that has called ``ray.init()``):
    the cluster runs on Ray (see ``process.ray_cluster``); its applications outlive this
    process, as in Ray Serve, until ``serve.shutdown()``.

    ``proxy_location`` (Ray Serve's): ``"EveryNode"`` (the default: an HTTP proxy on every
    node of a Ray cluster), ``"HeadOnly"`` or ``"Disabled"`` (no HTTP proxy); on the local
    backend the first two mean one proxy on this machine. ``detached`` is accepted for Ray
    Serve compatibility (apps on Ray and on a ``serval start`` cluster outlive their deployer).

    ``grpc_options`` (Ray Serve's, a dict or :class:`serval.config.gRPCOptions`): with
    ``grpc_servicer_functions``, the proxies serve gRPC too, on ``port`` (9000) of
    ``http_options.host``; the functions must be importable here (they are imported now, to
    fail early) and in the proxy, which searches this process's ``sys.path``.

    ``dashboard_options`` (``{"port": N, "host": H}``): where the dashboard of a new cluster
    listens (default 127.0.0.1:8265; on Ray 8266 on the head node, as Ray's own dashboard
    usually holds 8265; port 0: no dashboard). A port given here that is taken fails this
    call; the default one taken is warned about, and the cluster runs without a dashboard. Its
    URL, token included: ``dashboard_url()``.

    ``logging_config`` (a :class:`serval.schema.LoggingConfig` or a dict of its fields): how
    the controller and the proxy of a new cluster log (each to a file of its own in the
    cluster's log directory; the proxy writes an access line per request unless
    ``enable_access_log=False``).
    """
    http_options = _with_proxy_location(http_options, proxy_location)
    http_options = _with_grpc(http_options, grpc_options)
    if dashboard_options is not None:
        dashboard_options_of(dashboard_options)  # (checked now, whatever the backend)
    system_logging = None
    if logging_config is not None:  # (pydantic, only then: replicas import this module)
        from serval.logging_config import logging_config_dict

        system_logging = logging_config_dict(logging_config)
    started = _start(
        http_options, address, backend, _own_address, dashboard_options, system_logging
    )
    try:
        control.call(lambda c: c.wait_proxy())
    except BaseException:
        if started:  # (a proxy that cannot start): a cluster that could not start is no cluster
            _disconnect(stop_cluster=True)
        raise


_PROXY_LOCATIONS = {"EveryNode", "HeadOnly", "Disabled", "NoServer"}


def _with_proxy_location(
    http_options: dict[str, Any] | HTTPOptions | None, proxy_location: Any
) -> dict[str, Any] | HTTPOptions | None:
    if proxy_location is None:
        return http_options
    location = str(getattr(proxy_location, "value", proxy_location))  # (Ray's enum too)
    if location not in _PROXY_LOCATIONS:
        raise ValueError(
            f"proxy_location must be 'EveryNode', 'HeadOnly' or 'Disabled', got {proxy_location!r}"
        )
    options = HTTPOptions(**http_options) if isinstance(http_options, dict) else http_options
    if location in ("Disabled", "NoServer"):
        return dataclasses.replace(options or HTTPOptions(), enabled=False)
    return dataclasses.replace(options or HTTPOptions(), location=location)


def _with_grpc(
    http_options: dict[str, Any] | HTTPOptions | None,
    grpc_options: dict[str, Any] | gRPCOptions | None,
) -> dict[str, Any] | HTTPOptions | None:
    """``http_options`` carrying ``grpc_options`` (the same proxies serve both)."""
    if grpc_options is None:
        return http_options
    if isinstance(grpc_options, dict):
        grpc_options = gRPCOptions(**grpc_options)
    elif not isinstance(grpc_options, gRPCOptions):  # Ray's own class, say: its fields
        grpc_options = gRPCOptions(**_fields_of(grpc_options))
    options = HTTPOptions(**http_options) if isinstance(http_options, dict) else http_options
    return dataclasses.replace(options or HTTPOptions(), grpc_options=grpc_options)


def _fields_of(options: Any) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(gRPCOptions) if f.name != "sys_path"]
    return {n: getattr(options, n) for n in names if hasattr(options, n)}


def dashboard_url() -> str | None:
    """The dashboard's URL with its token (opening it logs the browser in), if the cluster
    this process talks to has a dashboard."""
    from serval._private.process.dashboard import read_url

    address = runtime.address()
    if address is None:
        return None
    if _owner.ray_namespace is not None:
        from serval._private.process import ray_cluster

        return ray_cluster.dashboard_url(_owner.ray_namespace)
    return read_url(address)


def _with_code_path(options: HTTPOptions) -> HTTPOptions:
    """``options`` with the gRPC proxy told where this process finds code (its working
    directory and ``sys.path``, as replicas are), its servicer functions checked here."""
    grpc_options = options.grpc_options
    if grpc_options is None or not grpc_options.enabled:
        return options
    from serval._private.proxy.grpc import import_servicer_function

    for path in grpc_options.grpc_servicer_functions:
        import_servicer_function(path)  # ImportError: which, and why
    code_path = tuple(dict.fromkeys((os.getcwd(), *sys.path)))
    return dataclasses.replace(
        options, grpc_options=dataclasses.replace(grpc_options, sys_path=code_path)
    )


def _start(
    http_options: dict[str, Any] | HTTPOptions | None,
    address: str | None,
    backend: str | None = None,
    own_address: str | None = None,
    dashboard: dict[str, Any] | None = None,
    system_logging: dict[str, Any] | None = None,
) -> bool:
    """Make sure this process has a cluster; whether this call started it (a local one at
    ``own_address`` if given, e.g. ``serval run``'s at the default address)."""
    # serve.run starts the cluster this way: it waits for the proxy with the app, in parallel.
    with _owner.lock:
        if isinstance(http_options, dict):
            http_options = HTTPOptions(**http_options)
        if http_options is not None:
            http_options = _with_code_path(http_options)
        if runtime.address() is not None:
            if http_options is not None and http_options != _owner.http_options:
                logger.warning(
                    "serval is already running in this process; new http_options are ignored "
                    "(call serve.shutdown() first to change them)"
                )
            return False
        if http_options is not None and http_options.tls:  # (the files, here: a clear error)
            from serval._private.proxy.tls import checked

            http_options = checked(http_options)
        _owner.http_options = http_options or HTTPOptions()
        address = address or settings().address
        if not _owner.atexit_registered:
            atexit.register(_shutdown_at_exit)
            _owner.atexit_registered = True
        if _chosen_backend(backend, address) == "ray":
            from serval._private.process import ray_cluster

            board = dashboard_options_of(dashboard, RAY_DEFAULT_PORT)
            created = ray_cluster.connect(
                _owner.http_options, dashboard=board, logging_config=system_logging
            )
            _owner.ray_namespace = ray_cluster.DEFAULT_NAMESPACE
            return created
        if address is not None:
            if not is_running(address):
                raise ServalError(
                    f"no serval cluster is running at {address} (start one with `serval start`)"
                )
            runtime.set_address(address)
            return False
        board = dashboard_options_of(dashboard)
        _owner.cluster = LocalCluster(
            _owner.http_options, address=own_address, dashboard=board, logging=system_logging
        )
        runtime.set_address(_owner.cluster.address)
        return True


def _chosen_backend(backend: str | None, address: str | None) -> str:
    backend = backend or settings().backend
    if backend is None:
        # As in Ray Serve: a driver that has called ray.init() deploys onto that Ray cluster.
        ray = sys.modules.get("ray")
        in_ray = ray is not None and getattr(ray, "is_initialized", lambda: False)()
        backend = "ray" if in_ray and address is None else "local"
    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}: serval runs on 'local' or 'ray'")
    return backend


def run(
    target: Application,
    *,
    name: str = "default",
    route_prefix: str | None = _UNSET,
    blocking: bool = False,
    _local_testing_mode: bool = False,
    _source_config: dict[str, Any] | None = None,
    logging_config: LoggingConfig | dict[str, Any] | None = None,
) -> DeploymentHandle:
    """Deploy ``target`` as application ``name``; wait until every replica is running.

    Returns a handle to the ingress deployment. A constructor that raises makes this raise
    ``DeploymentFailedError`` with the replica's traceback. ``logging_config`` is that of
    the application's deployments that set none of their own.
    """
    spec = build(target, name, route_prefix, _source_config, logging_config)
    _deploy_specs([spec])
    handle = DeploymentHandle(spec.ingress, name)
    if blocking:
        _block_forever()
    return handle


def _for_ray(spec: AppSpec) -> AppSpec:
    """``spec`` as replica actors can start it: runtime_envs prepared in this driver (see
    ``ray_cluster.deployable_runtime_env``)."""
    from serval._private.process import ray_cluster

    deployments = []
    for dep in spec.deployments:
        actor = dict(dep.config.ray_actor_options)
        env = ray_cluster.deployable_runtime_env(actor.get("runtime_env"))
        if env == actor.get("runtime_env"):
            deployments.append(dep)
            continue
        if env is None:
            actor.pop("runtime_env", None)
        else:
            actor["runtime_env"] = env
        config = dataclasses.replace(dep.config, ray_actor_options=actor)
        deployments.append(
            dataclasses.replace(dep, config=config, version=spec_version(dep.payload, config))
        )
    return dataclasses.replace(spec, deployments=tuple(deployments))


def _run_many(
    apps: list[tuple[Application, str, Any, dict[str, Any] | None]], wait: bool = True
) -> None:
    """``serve.run`` of several apps at once — (app, name, route_prefix, source config) each —
    deployed together and waited for together (``serval deploy`` of a whole file); not waited
    for unless ``wait``."""
    specs = [build(app, name, prefix, source) for app, name, prefix, source in apps]
    _deploy_specs(specs, wait)


def _deploy_specs(specs: list[AppSpec], wait: bool = True) -> None:
    """Deploy ``specs`` and (``wait``) wait until each runs; progress is logged meanwhile
    (``serval._progress``). ``DeploymentFailedError`` names every app that failed."""
    if runtime.replica() is not None:
        raise ServalError("serve.run cannot be called from inside a deployment")
    started = _start(None, None)
    try:
        if _owner.ray_namespace is not None:
            specs = [_for_ray(spec) for spec in specs]
        results = runtime.run_sync(_deploy(specs, wait))
    except BaseException:
        if started:  # e.g. its HTTP proxy could not start: leave no half-started cluster
            _disconnect(stop_cluster=True)
        raise
    failed = [
        f"application {name!r} failed to deploy:\n{message}"
        for name, (status_, message) in results.items()
        if status_ != "RUNNING"
    ]
    if failed:
        raise DeploymentFailedError("\n".join(failed))


async def _deploy(specs: list[AppSpec], wait: bool = True) -> dict[str, tuple[str, str]]:
    controller = runtime.home_client().controller
    for spec in specs:
        await controller.deploy_app(spec)
    names = [spec.name for spec in specs]
    if not wait:
        return {}
    progress = _progress.tracker(names)
    watcher = asyncio.ensure_future(_progress.watch(controller, progress))
    try:
        results = await asyncio.gather(*(controller.wait_app(name) for name in names))
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    await _progress.finish(controller, progress)
    return dict(zip(names, results, strict=True))


def _block_forever() -> None:
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    shutdown()


def status() -> ServeStatus:
    """Applications with their status, and deployments with ``replica_states`` counts."""
    if runtime.address() is None and _connect_existing() is None:
        return ServeStatus()
    return control.call(lambda c: c.status())


def delete(name: str, _blocking: bool = True) -> None:
    """Delete application ``name``: its replicas drain and exit. No error if it is not there."""
    control.call(lambda c: c.delete_app(name))


def _delete_many(names: list[str]) -> None:
    """``delete`` of each of ``names``, together: their replicas drain at the same time."""

    async def delete_all(controller: ControllerCalls) -> None:
        await asyncio.gather(*(controller.delete_app(name) for name in names))

    control.call(delete_all)


def shutdown() -> None:
    """Delete every application and stop the cluster (as Ray Serve does, also when this
    process only connected to it)."""
    _disconnect(stop_cluster=True)


def _connect_existing() -> str | None:
    """Join a cluster that runs, without starting one, for a process that has none yet (as a
    new Ray Serve driver finds the apps others deployed): on Ray when that is the backend,
    else the local cluster ``SERVAL_ADDRESS`` names. Its address, or None."""
    with _owner.lock:
        if runtime.address() is not None:
            return runtime.address()
        address = settings().address
        if _chosen_backend(None, address) == "ray":
            from serval._private.process import ray_cluster

            ray_cluster.init_ray()
            if not ray_cluster.is_running():
                return None
            ray_cluster.join()
            _owner.ray_namespace = ray_cluster.DEFAULT_NAMESPACE
        elif address is not None and is_running(address):
            runtime.set_address(address)
        return runtime.address()


def _disconnect(stop_cluster: bool) -> None:
    if stop_cluster and runtime.address() is None:
        _connect_existing()  # serve.shutdown() from a process that never deployed
    with _owner.lock:
        cluster, _owner.cluster = _owner.cluster, None
        ray_namespace, _owner.ray_namespace = _owner.ray_namespace, None
        if runtime.address() is None:
            return
        try:
            if stop_cluster and not _ray_cluster_gone(ray_namespace):
                if cluster is not None:
                    cluster.begin_shutdown()
                # (ServalError: the controller keeps dying; the lifeline ends the rest)
                with contextlib.suppress(ConnectionError, OSError, TimeoutError, ServalError):
                    control.call(lambda c: c.shutdown(), timeout=_SHUTDOWN_TIMEOUT_S)
        finally:
            runtime.reset_clients()
            runtime.set_address(None)
            if ray_namespace is not None and stop_cluster:
                from serval._private.process import ray_cluster

                ray_cluster.stop(ray_namespace)
            if cluster is not None:
                cluster.wait_stopped(timeout=5.0)
                cluster.close()


def _ray_cluster_gone(namespace: str | None) -> bool:
    if namespace is None:
        return False
    from serval._private.process import ray_cluster

    return not ray_cluster.is_running(namespace)


def _shutdown_at_exit() -> None:
    # A cluster this process owns ends with it; one it only connected to lives on.
    try:
        _disconnect(stop_cluster=_owner.cluster is not None)
    except Exception:  # interpreter is exiting: never raise from atexit
        logger.exception("serval shutdown at exit failed")


def app_configs() -> dict[str, dict[str, Any] | None]:
    """Each running app's config-file entry (None for apps deployed from Python)."""
    if runtime.address() is None:
        return {}
    return control.call(lambda c: c.app_configs())


def get_app_handle(name: str) -> DeploymentHandle:
    """A handle to the ingress deployment of application ``name``."""
    if _in_replica_loop():
        raise RuntimeError(
            "get_app_handle() blocks; inside an async method use the handles passed to the "
            "constructor, or call it from the constructor or a sync method"
        )
    ingress = control.call(lambda c: c.get_app(name))
    return DeploymentHandle(ingress, name)


def get_deployment_handle(deployment_name: str, app_name: str | None = None) -> DeploymentHandle:
    """A handle to ``deployment_name`` in ``app_name`` (default: the caller's app inside a
    replica, else ``"default"``)."""
    me = runtime.replica()
    if app_name is None:
        app_name = me.app if me is not None else "default"
    if not _in_replica_loop():
        apps = control.call(lambda c: c.apps_with_deployment(deployment_name))
        if app_name not in apps:
            raise DeploymentNotFoundError(
                f"no deployment {deployment_name!r} in application {app_name!r}"
            )
    return DeploymentHandle(deployment_name, app_name)


def get_replica_context() -> ReplicaContext:
    """Inside a replica: its app, deployment, id and the user object."""
    return _get_internal_replica_context()


def _in_replica_loop() -> bool:
    return runtime.replica() is not None and runtime.running_loop() is runtime.home_loop()


def _refuse_if_controller_gone(address: str) -> None:
    # A controller that keeps dying, or a cluster on Ray that another driver shut down: fail
    # the call now rather than wait for a controller that will not come.
    if _owner.ray_namespace is not None:
        from serval._private.process import ray_cluster

        if not ray_cluster.is_running(_owner.ray_namespace):
            raise ServalError(
                "the serval cluster on Ray is gone (shut down, or Ray itself stopped); "
                "serve.shutdown() here, then serve.start() or serve.run() makes a new one"
            )
        return
    cluster = _owner.cluster
    if cluster is not None and cluster.controller_error and not is_running(address):
        raise ServalError(cluster.controller_error)


control.before_call = _refuse_if_controller_gone
control.connect_existing = _connect_existing
