"""serval's processes as Ray actors: the controller, each replica, the HTTP proxy, the
dashboard.

Each actor runs the same code as the local backend's processes (``worker``) on an event loop
of its own, in a thread of the actor's process: Ray's own loop serves only Ray's calls to the
actor (``run``, ``endpoint``), so a request never waits on Ray's machinery, and serval's wire
(a node-local Unix socket, authenticated TCP across nodes) carries the traffic.

``run`` returns when the actor's work is over (the replica drained, the controller shut
down), and raises if it failed; the controller and the driver wait on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import ray

from serval._private.backends import ray_store
from serval._private.backends.ray_backend import ASYNC_GROUP, CONTROL_GROUP, RayBackend
from serval._private.caller import runtime
from serval._private.caller.client import ClusterClient
from serval._private.controller.controller import Controller
from serval._private.process.worker import ControlPeers, run_to_the_end, tune_gc
from serval._private.replica.server import ListenAt, Replica
from serval._private.telemetry import log_setup
from serval._private.telemetry.logs import Identity
from serval._private.wire import endpoints, transport
from serval.config import HTTPOptions
from serval.exceptions import RequestCancelledError

__all__ = ["ControllerActor", "DashboardActor", "ProxyActor", "ReplicaActor", "connect_process"]

logger = logging.getLogger("serval")


class _LoopThread:
    """``body`` on a serval event loop of its own, in a thread; ``done`` when it returns."""

    def __init__(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._body = body
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loop = runtime.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            run_to_the_end(loop, loop.create_task(self._body()))
        except BaseException as exc:
            logger.exception("%s failed", self._thread.name)
            self.done.set_exception(exc)
        else:
            self.done.set_result(None)


def connect_process(namespace: str) -> None:
    """This process (a driver, or an actor) joins the serval cluster of ``namespace`` in the Ray
    cluster it is connected to: it learns the secret of the cluster's TCP endpoints, and which
    node it is on (to take a replica's Unix socket where it can)."""
    endpoints.set_secret(ray_store.secret(namespace))
    try:
        node: str | None = ray.get_runtime_context().get_node_id()
    except Exception:  # a Ray client (ray://) is on no node of the cluster
        node = None
    endpoints.set_local_node(node)
    runtime.set_address(ray_store.address_of(namespace))


def _setup(
    role: str, namespace: str, component: str | None = None, log_file: str | None = None
) -> tuple[str, str]:
    """This actor's process joins the cluster: (its node's id, its node's IP address). A
    system actor (``component``: controller, proxy, dashboard) logs to its file
    (``log_file``, else ``<component>.log``) in the node's serve log directory too (a
    replica: once it knows its deployment)."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s serval::{role}: %(message)s"
    )
    log_setup.quiet_access()
    tune_gc()
    connect_process(namespace)
    node, ip = ray.get_runtime_context().get_node_id(), str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    if component is not None:
        log_file = log_file or f"{component}.log"
        component_id = _node_ip() if component == "proxy" else str(os.getpid())
        log_setup.configure(
            Identity(component, component_id),
            ray_store.system_logging(namespace),
            serve_logs_dir(),
            log_file,
        )
    return node, ip


def _node_ip() -> str:
    """This node's IP address, as Ray Serve names a proxy's log file by it."""
    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def serve_logs_dir() -> str:
    """This node's serve log directory: ``<Ray's session directory>/logs/serve``, as Ray
    Serve's."""
    node = ray._private.worker._global_node
    if node is None:  # (not in a Ray worker)
        return os.path.join(os.getcwd(), "logs", "serve")
    return os.path.join(node.get_logs_dir_path(), "serve")


class ReplicaActor:
    """A threaded actor (no async method): a call by reference runs on the Ray thread that
    executes it (``replica.direct``), as a bare Ray actor's method does, instead of crossing to
    an event loop of Ray's and to the replica's.

    Its concurrency groups: the default one, a few threads (Ray hands calls to its threads in
    turn, and many threads make every call slower), runs sync methods; ``ASYNC_GROUP``, as many
    threads as the replica may run calls, waits for async methods running on the replica's
    loop; ``CONTROL_GROUP`` holds ``run``, which waits for the replica's end."""

    def __init__(self, namespace: str, replica_id: str, label: str, keep_cwd: bool) -> None:
        node, ip = _setup(f"replica {label}", namespace)
        path = os.path.join(ray_store.node_socket_dir(node), f"{replica_id}.sock")
        address = ray_store.address_of(namespace)
        self._replica: concurrent.futures.Future[Replica] = concurrent.futures.Future()

        async def body() -> None:
            at = ListenAt(path, node, ip)
            replica = Replica(address, replica_id, at, keep_cwd=keep_cwd, logs_dir=serve_logs_dir())
            self._replica.set_result(replica)
            await replica.start()
            await replica.stopped.wait()

        self._thread = _LoopThread(f"serval-replica-{label}", body)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def run(self) -> None:
        self._thread.done.result()

    def handle_request(self, _serval_call: Any, /, *args: Any, **kwargs: Any) -> Any:
        """A call by reference (``caller.by_reference``), on one of Ray's threads; the value is
        what the caller's ``ray.ObjectRef`` holds. ``_serval_call`` is the method's name, or
        (name, the call's metadata). The call's arguments come at the top level, so Ray has
        resolved the refs among them."""
        return self._serve(_serval_call, args, kwargs)

    @ray.method(concurrency_group=ASYNC_GROUP)
    def handle_async_request(self, _serval_call: Any, /, *args: Any, **kwargs: Any) -> Any:
        """``handle_request`` for an async method (the caller knows which are: the replica
        table says)."""
        return self._serve(_serval_call, args, kwargs)

    def _serve(self, what: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        method, meta = (what, None) if type(what) is str else what
        try:
            return self._replica.result().direct.serve(method, args, kwargs, meta, _cancelled)
        except RequestCancelledError:
            if not _cancelled():
                raise
            # Ray's own answer to a cancelled call (TaskCancelledError) is what its caller
            # gets when the call returns: not this error wrapped as the call's failure.
            return None


def _cancelled() -> bool:
    """``ray.cancel`` was called on the call this thread runs (a threaded actor's running call
    is not interrupted: it is asked)."""
    return bool(ray.get_runtime_context().is_canceled())


class ProxyActor:
    """The HTTP proxy of node ``node``. Every node's binds the same host and port: on a real
    cluster each on its own machine; several nodes on one machine share the port (the
    kernel spreads connections among them)."""

    def __init__(self, namespace: str, http_options_json: str, node: str) -> None:
        node_ip = _setup("proxy", namespace, "proxy", f"proxy_{_node_ip()}.log")[1]
        options = HTTPOptions.from_json(http_options_json)
        self._client: concurrent.futures.Future[ClusterClient] = concurrent.futures.Future()

        async def body() -> None:
            from serval._private.proxy.server import serve_proxy

            client = runtime.client(asyncio.get_running_loop())
            self._client.set_result(client)
            await serve_proxy(client, options, node, reuse_port=True, node_ip=node_ip)

        self._thread = _LoopThread("serval-proxy", body)

    async def run(self) -> None:
        await asyncio.wrap_future(self._thread.done)

    async def requests_served(self) -> int:
        """How many HTTP requests this proxy has answered (what /-/metrics counts)."""
        client = await asyncio.wrap_future(self._client)
        control = client.handler
        app = getattr(control, "app", None)
        if app is None:
            return 0
        # read on the proxy's loop, which alone records it
        total: concurrent.futures.Future[int] = concurrent.futures.Future()
        client.loop.call_soon_threadsafe(lambda: total.set_result(app.http_metrics.total()))
        return await asyncio.wrap_future(total)


class DashboardActor:
    """The dashboard (``dashboard.server``), detached and named (``ray_store.DASHBOARD_ACTOR``)
    on the head node; Ray restarts it if it dies. Its token is in Ray's key-value store, where
    only processes connected to the Ray cluster read it; a PUT deploys through ``serval deploy``
    connected to this Ray cluster."""

    def __init__(self, namespace: str, options_json: str) -> None:
        from serval._private.dashboard.server import DashboardConfig, serve_dashboard
        from serval._private.process.dashboard import DashboardOptions, bind

        _setup("dashboard", namespace, "dashboard")
        options = DashboardOptions.from_json(options_json)
        sock = bind(options)  # (an asked port that is taken: this actor's error)
        self._url: str | None = None
        self._thread: _LoopThread | None = None
        if sock is None:
            ray_store.set_dashboard_url(namespace, None)
            return
        port = sock.getsockname()[1]
        self._url = f"{endpoints.url_base('http', options.host, port)}/"
        config = DashboardConfig(
            address=ray_store.address_of(namespace),
            fd=sock.detach(),
            host=options.host,
            port=port,
            token=ray_store.dashboard_token(namespace),
            cwd=os.getcwd(),
            deploy_env=dict(os.environ),
            deploy_address=str(ray.get_runtime_context().gcs_address),
        )
        ray_store.set_dashboard_url(namespace, self._url)

        async def body() -> None:
            await serve_dashboard(runtime.client(asyncio.get_running_loop()), config)

        self._thread = _LoopThread("serval-dashboard", body)

    async def url(self) -> str | None:
        """Where it listens (None: no dashboard, its default port was taken)."""
        return self._url

    async def run(self) -> None:
        if self._thread is not None:
            await asyncio.wrap_future(self._thread.done)


class ControllerActor:
    """Detached and named (``ray_store.CONTROLLER_ACTOR``); Ray restarts it if it dies, and
    the new one adopts what the checkpoint names and is still alive."""

    def __init__(self, namespace: str, http_options_json: str | None) -> None:
        node, ip = _setup("controller", namespace, "controller")
        http = HTTPOptions.from_json(http_options_json) if http_options_json else None
        self._listening: concurrent.futures.Future[str] = concurrent.futures.Future()

        async def body() -> None:
            await _serve_controller(namespace, node, ip, http, self._listening)

        self._thread = _LoopThread("serval-controller", body)

    async def endpoint(self) -> str:
        """Where the controller listens, once it does."""
        return await asyncio.wrap_future(self._listening)

    async def run(self) -> None:
        await asyncio.wrap_future(self._thread.done)


async def _serve_controller(
    namespace: str,
    node: str,
    ip: str,
    http: HTTPOptions | None,
    listening: concurrent.futures.Future[str],
) -> None:
    controller = Controller(RayBackend(namespace, node), http, ray_store.address_of(namespace))
    peers = ControlPeers(controller)
    try:
        listener = await transport.TcpListener.start(
            ip, 0, peers.new_connection, endpoints.secret()
        )
        ray_store.set_controller_endpoint(namespace, listener.address)
        controller.start(recover=True)  # (a first controller finds no checkpoint)
    except BaseException as exc:
        listening.set_exception(exc)
        raise
    listening.set_result(listener.address)
    await controller.stopped.wait()
    listener.close()
    await peers.close()
    await controller.close()
    await listener.aclose()
    ray_store.forget_cluster(namespace)
