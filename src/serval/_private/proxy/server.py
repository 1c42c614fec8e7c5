"""Running the proxy: bind the port, tell the controller, serve with uvicorn."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from typing import Any

from serval._private.caller.client import ClusterClient
from serval._private.proxy.app import ProxyApp
from serval._private.proxy.http_protocol import protocol_for
from serval._private.proxy.tls import https_protocol, server_context
from serval._private.telemetry import metrics
from serval._private.telemetry.ingress import RequestMetrics, grpc_error
from serval._private.wire.rpc import RpcPeer
from serval.config import HTTPOptions

logger = logging.getLogger("serval.proxy")


# Descriptors the proxy keeps for itself beyond its clients' connections: the listening
# socket, the controller's link, one per ingress replica, the event loop's own, the lifeline.
_OWN_FDS_MIN = 128


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to the hard one; the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel's own ceiling then
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open files limit to %d: %s", target, exc)
            return soft
        return target
    return target if soft == resource.RLIM_INFINITY else soft


def default_max_connections(fd_limit: int) -> int:
    """Client connections the proxy takes with ``fd_limit`` descriptors, leaving room for its
    own (a tenth, at least ``_OWN_FDS_MIN``)."""
    return max(1, fd_limit - max(_OWN_FDS_MIN, fd_limit // 10))


def _bind(options: HTTPOptions, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # (Linux lets only processes of the same user share the port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((options.host, options.port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


async def _ack(client: ClusterClient, version: int, node: str) -> None:
    """Tell the controller the proxy routes with table ``version`` (it may be away)."""
    try:
        await client.controller.proxy_ack(version, node)
    except (OSError, ConnectionError) as exc:
        logger.debug("the proxy's ack of table %d failed: %s", version, exc)


class ProxyControl:
    """The proxy's side of the control plane (``wire.control.ProxyCalls``)."""

    def __init__(self) -> None:
        self.server: Any = None  # the uvicorn server, once it runs
        self.app: ProxyApp | None = None  # once it serves
        self.grpc: Any = None  # the gRPC server (proxy.grpc), when grpc_options enable one
        self.draining = False

    def rpc_http_metrics(self, peer: RpcPeer) -> metrics.Snapshot:
        return self.app.metrics_snapshot() if self.app is not None else []

    def rpc_drain(self, peer: RpcPeer) -> None:
        """Stop listening, finish the requests in flight, then exit (uvicorn's shutdown)."""
        self.draining = True
        if self.server is not None:
            self.server.should_exit = True
        # (the gRPC server stops once uvicorn has: see serve_proxy; meanwhile its Healthz
        # answers UNAVAILABLE, as Ray Serve's does while a proxy drains)


async def serve_proxy(
    client: ClusterClient,
    options: HTTPOptions,
    node: str = "",
    reuse_port: bool = False,
    node_ip: str = "127.0.0.1",
) -> None:
    """Serve HTTP for the cluster ``client`` is connected to, as the proxy at place ``node``
    (see ``controller.proxies``) on the machine at ``node_ip``. ``reuse_port``: other proxies
    of the cluster on this machine bind the same port (several Ray nodes on one machine); the
    kernel spreads connections."""
    import uvicorn

    loop = asyncio.get_running_loop()
    control = client.handler = ProxyControl()
    try:
        sock = _bind(options, reuse_port)
    except OSError as exc:
        await client.controller.proxy_ready(
            f"cannot listen on {options.host}:{options.port}: {exc}", node
        )
        raise SystemExit(1) from exc

    def ack(version: int) -> None:
        client.tasks.spawn(_ack(client, version, node), loop)

    ssl_context = None
    if options.tls:  # (checked where serve.start ran: this proxy's node may differ)
        try:
            ssl_context = server_context(options)
        except ValueError as exc:
            sock.close()
            await client.controller.proxy_ready(f"cannot serve HTTPS: {exc}", node)
            raise SystemExit(1) from None

    client.on_table = ack
    await client.wait_ready()
    ack(client.table_version)
    grpc_metrics = None
    if options.grpc_options is not None and options.grpc_options.enabled:
        grpc_metrics = RequestMetrics(metrics.GRPC_FAMILIES, grpc_error)
        control.grpc = await _start_grpc(
            client, options, node, reuse_port, control, sock, grpc_metrics
        )
    app = control.app = ProxyApp(client, options, node)
    app.grpc_metrics = grpc_metrics
    app.node_ip = node_ip
    fd_limit = raise_fd_limit()
    max_connections = default_max_connections(fd_limit)
    if options.max_connections is not None:
        if options.max_connections > max_connections:
            logger.warning(
                "http_options.max_connections=%d is more than %d open files allow; "
                "connections past that fail as the proxy runs out of descriptors",
                options.max_connections,
                fd_limit,
            )
        max_connections = options.max_connections
    # (no ssl_* for uvicorn: the protocol does TLS itself, so that the handshake has the
    # header timeout and counts against max_connections; see TlsHttpProtocol)
    protocol = protocol_for(app, max_connections)
    if ssl_context is not None:
        protocol = https = https_protocol(protocol, ssl_context)
    config = uvicorn.Config(
        app,
        http=protocol,
        ws="websockets-sansio",
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
        date_header=False,
    )
    server = uvicorn.Server(config)
    control.server = server
    app.connections = server.server_state.connections
    server.should_exit = control.draining  # (asked to stop before it started)
    await client.controller.proxy_ready(None, node)
    logger.info(
        "HTTP proxy listening on %s://%s:%s (at most %d connections)",
        "https" if ssl_context is not None else "http",
        options.host,
        options.port,
        max_connections,
    )
    try:
        await server.serve(sockets=[sock])
    finally:
        if ssl_context is not None:
            https.close_handshakes()
        if control.grpc is not None:  # what is in flight finishes, within the grace
            await control.grpc.stop(_GRPC_GRACE_S)
        await app.close()


# How long a stopping proxy lets gRPC calls in flight finish (the controller waits 5 s for a
# drained proxy to exit, HTTP's shutdown included).
_GRPC_GRACE_S = 3.0


async def _start_grpc(
    client: ClusterClient,
    options: HTTPOptions,
    node: str,
    reuse_port: bool,
    control: ProxyControl,
    sock: socket.socket,
    recorded: RequestMetrics,
) -> Any:
    """The gRPC server beside uvicorn (``proxy.grpc``); a failure to start it is the proxy's."""
    grpc_options = options.grpc_options
    assert grpc_options is not None
    try:
        from serval._private.proxy.grpc import start_grpc

        return await start_grpc(client, options, lambda: control.draining, recorded, reuse_port)
    except Exception as exc:  # not importable, a servicer function that fails, the port
        sock.close()
        await client.controller.proxy_ready(
            f"cannot start the gRPC proxy on {options.host}:{grpc_options.port}: "
            f"{type(exc).__name__}: {exc}",
            node,
        )
        raise SystemExit(1) from exc
