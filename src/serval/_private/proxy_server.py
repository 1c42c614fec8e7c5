"""Running the proxy: bind the port, tell the controller, serve with uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket

from serval._private.client import ClusterClient
from serval._private.http_protocol import protocol_for
from serval._private.proxy import ProxyApp
from serval.config import HTTPOptions

logger = logging.getLogger("serval.proxy")


def _bind(options: HTTPOptions) -> socket.socket:
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((options.host, options.port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


async def serve_proxy(client: ClusterClient, options: HTTPOptions) -> None:
    import uvicorn

    loop = asyncio.get_running_loop()
    try:
        sock = _bind(options)
    except OSError as exc:
        await client.call_controller(
            "proxy_ready", error=f"cannot listen on {options.host}:{options.port}: {exc}"
        )
        raise SystemExit(1) from exc

    acks: set[asyncio.Task[None]] = set()

    def ack(version: int) -> None:
        task = loop.create_task(client.call_controller("proxy_ack", version=version))
        acks.add(task)
        task.add_done_callback(acks.discard)

    client.on_table = ack
    await client.wait_ready()
    ack(client.table_version)
    app = ProxyApp(client, options)
    config = uvicorn.Config(
        app,
        http=protocol_for(app),
        ws="websockets-sansio",
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
        proxy_headers=False,
        date_header=False,
    )
    server = uvicorn.Server(config)
    await client.call_controller("proxy_ready", error=None)
    logger.info("HTTP proxy listening on http://%s:%s", options.host, options.port)
    await server.serve(sockets=[sock])
