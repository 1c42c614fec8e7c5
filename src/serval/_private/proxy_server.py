"""Running the proxy: bind the port, tell the controller, serve with uvicorn."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, cast

from serval._private.client import ClusterClient
from serval._private.proxy import ProxyApp
from serval.config import HTTPOptions

logger = logging.getLogger("serval.proxy")


class _CoalescingTransport:
    """A transport whose writes within one loop tick leave in one ``write``.

    uvicorn writes a response's head and body separately; joined, a response costs one
    syscall instead of two. Everything but ``write`` and ``close`` goes to the real transport.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._pending is None:
            self._pending = [data]
            self._loop.call_soon(self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _http_protocol() -> type[asyncio.Protocol]:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            loop = asyncio.get_running_loop()
            wrapped = _CoalescingTransport(cast(asyncio.Transport, transport), loop)
            super().connection_made(cast(asyncio.Transport, wrapped))

    return CoalescingHttpToolsProtocol


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
    app.start()
    config = uvicorn.Config(
        app,
        http=_http_protocol(),
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
    try:
        await server.serve(sockets=[sock])
    finally:
        await app.close()
