"""The HTTP proxy's routing: which application a request goes to, and what it carries there.

Longest ``route_prefix`` match picks the app; the request (scope and body) goes straight to a
replica of the app's ingress deployment through this process's router, and the response comes
back in one piece or message by message. System routes live under ``/-/``: ``healthz``,
``routes`` and ``metrics`` (every replica's and the proxy's, in Prometheus's text format; the
replicas' part gathered at most once a second); the last two answer only a ``Host`` that names
the proxy itself (an IP literal, ``localhost``, ``http_options.system_route_hosts``). An
HTTP/1.1 request without exactly one ``Host`` is a 400. Every response carries
``x-request-id``; errors never show a traceback to the client.

HTTP requests are answered by ``http_protocol.Exchange`` (see there why not through ASGI);
websockets, which uvicorn hands over after the upgrade, by this ASGI app.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from serval._private.caller.calls import Call
from serval._private.caller.client import ClusterClient
from serval._private.proxy.http_protocol import (
    Exchange,
    ProxyHttpProtocol,
    requests_in_flight,
    unquote_path,
)
from serval._private.proxy.replies import Reply, text_reply
from serval._private.telemetry import metrics
from serval._private.telemetry.access_log import AccessLog
from serval._private.telemetry.ingress import RequestMetrics, http_error
from serval._private.wire import asgi
from serval._private.wire.protocol import safe_str
from serval._private.wire.tasks import TaskOwner
from serval.config import HTTPOptions

logger = logging.getLogger("serval.proxy")

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ProxyApp:
    def __init__(self, client: ClusterClient, options: HTTPOptions, node: str = "") -> None:
        self.client = client
        self.options = options
        self.node = node  # its place (see controller.proxies): the others' metrics merge in
        self._routes: list[tuple[str, str, str]] = []  # (prefix, app, ingress), longest first
        self._routes_of: dict[str, tuple[str, str]] | None = None
        # The requests answered, for /-/metrics and the access log (see ended)
        self.http_metrics = RequestMetrics(metrics.HTTP_FAMILIES, http_error)
        self.grpc_metrics: RequestMetrics | None = None  # the gRPC proxy's, when there is one
        self.access_log = AccessLog(client.loop)
        # uvicorn's open connections (its server state's), once it serves: the requests in
        # flight are counted there at a scrape
        self.connections: Iterable[object] = ()
        self.node_ip = ""  # this proxy's node's address, for the metrics (see serve_proxy)
        self._metrics_cache: tuple[float, metrics.Snapshot] | None = None  # (when, snapshot)
        self._metrics_task: asyncio.Task[metrics.Snapshot] | None = None
        # The proxy's tasks: metrics gatherings, websockets' input pumps, requests' answers
        # that need one (a system route's, a streamed reply's).
        self.tasks = TaskOwner("the HTTP proxy")

    # -- routing -------------------------------------------------------------------------------

    def _match(self, path: str) -> tuple[str, str, str] | None:
        routes = self.client.routes
        if routes is not self._routes_of:
            self._routes_of = routes
            self._routes = sorted(
                ((p, a, d) for p, (a, d) in routes.items()), key=lambda r: len(r[0]), reverse=True
            )
        for prefix, app, ingress in self._routes:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return prefix, app, ingress
        return None

    # -- HTTP requests (see http_protocol) ------------------------------------------------------

    def exchange(
        self,
        conn: ProxyHttpProtocol,
        method: str,
        http_version: str,
        url: Any,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
    ) -> Exchange:
        """A parsed request head, turned into what to do with it."""
        given_id, length, model, host, hosts = _scan_headers(headers)
        ex = Exchange(conn, given_id or _new_request_id(), keep_alive, method)
        ex.head_only = method == "HEAD"
        # An absolute-form target may have no path (RFC 9112 3.2.2: then it is "/").
        raw_path: bytes = url.path or b"/"
        path = ex.path = unquote_path(raw_path)
        if hosts != 1 and (hosts or http_version != "1.0"):
            # RFC 9112 3.2: HTTP/1.1 needs exactly one Host; HTTP/1.0 may omit it, not repeat it.
            ex.refuse(400, "Bad Request: a request needs exactly one Host header")
            return ex
        if path.startswith("/-/"):
            if path != "/-/healthz" and host and not self._own_host(host):
                ex.reply = text_reply(
                    403,
                    f"Host {host.decode('latin-1')!r} is not allowed for {path}; "
                    "see http_options.system_route_hosts",
                )
            elif path == "/-/metrics":
                ex.fetch = self._metrics
            else:
                ex.reply = self._system(path)
            return ex
        match = self._match(path)
        if match is None:
            ex.reply = text_reply(
                404, f"Path '{path}' not found. Ping http://.../-/routes for available routes."
            )
            return ex
        prefix, app, ingress = match
        ex.route, ex.app, ex.deployment = match
        if length is not None:
            limit = self.options.max_request_body_bytes
            if not length.isdigit():
                ex.refuse(400, "Bad Content-Length")
                return ex
            if int(length) > limit:
                ex.refuse(413, f"Request body larger than {limit} bytes")
                return ex
        ex.wire = asgi.pack_http(
            "" if prefix == "/" else prefix,  # root_path
            http_version,
            method,
            conn.scheme,
            path,
            raw_path,
            url.query or b"",
            headers,
            conn.client,
            conn.server,
        )
        meta = {"asgi": True, "request_id": ex.request_id, "route": prefix}
        if model:
            meta["multiplexed_model_id"] = model
        ex.target = (app, ingress, meta)
        return ex

    def ended(self, ex: Exchange) -> None:
        """``ex`` is answered (or broke off): the one place that takes a request's end, for
        its metrics and its access line, which only note it here (telemetry.ingress and
        .access_log make the rest of it later, in batches)."""
        end = time.time()
        latency = end - ex.began
        route, method, app, status = ex.route, ex.method, ex.app, ex.status
        self.http_metrics.record(route, method, app, ex.deployment, status, latency)
        self.access_log.record(method, ex.path, status, latency, ex.request_id, route, app, end)

    def metrics_snapshot(self) -> metrics.Snapshot:
        """The proxy's own metrics (HTTP's; gRPC's too when it serves gRPC), as they are now."""
        ongoing = (self.node, self.node_ip, requests_in_flight(self.connections))
        own = self.http_metrics.snapshot(ongoing)
        grpc = self.grpc_metrics
        if grpc is not None:
            own += grpc.snapshot((self.node, self.node_ip, grpc.ongoing))
        return own

    def _own_host(self, host: bytes) -> bool:
        """Whether ``Host: host`` names this proxy for its system routes: an IP literal,
        ``localhost``, or a name in ``system_route_hosts``. A page in a browser can only
        reach 127.0.0.1 under a name of its own (DNS rebinding), never under these."""
        allowed = self.options.system_route_hosts
        if "*" in allowed:
            return True
        name = host.decode("latin-1").strip().lower()
        if name.startswith("["):  # [v6] or [v6]:port
            literal, bracket, port = name[1:].partition("]")
            port_ok = not port or (port[0] == ":" and port[1:].isdigit())
            return bool(bracket) and port_ok and _is_ip(literal)
        if name.count(":") == 1:
            name, _, port = name.partition(":")
            if not port.isdigit():
                return False
        name = name.removesuffix(".")
        return name == "localhost" or name.endswith(".localhost") or _is_ip(name) or name in allowed

    def _system(self, path: str) -> Reply:
        if path == "/-/healthz":
            return text_reply(200, "success")
        if path == "/-/routes":
            body = json.dumps({p: a for p, (a, _) in sorted(self.client.routes.items())})
            return 200, [(b"content-type", b"application/json")], body.encode()
        return text_reply(404, f"Path '{path}' not found.")

    async def _metrics(self) -> Reply:
        """Every replica's metrics (gathered by the controller), in Prometheus's text format;
        the proxy's own counts as they are now."""
        replicas = await self._replica_metrics()
        body = metrics.render(metrics.merge([self.metrics_snapshot(), replicas])).encode()
        return 200, [(b"content-type", _PROMETHEUS_TEXT)], body

    async def _replica_metrics(self) -> metrics.Snapshot:
        """The replicas' snapshot, gathered at most once per ``_METRICS_MAX_AGE_S``: scrapes
        that come together share one gathering (each asks every replica), later ones its
        result while it is fresh."""
        loop = self.client.loop
        cached = self._metrics_cache
        if cached is not None and loop.time() - cached[0] < _METRICS_MAX_AGE_S:
            return cached[1]
        task = self._metrics_task
        if task is None:
            task = self._metrics_task = self.tasks.spawn(self._gather_metrics(), loop)
            task.add_done_callback(_seen)  # its error reaches the scrapers, if any are left
        # (shielded: a scraper that leaves does not cancel the others' gathering)
        return await asyncio.shield(task)

    async def _gather_metrics(self) -> metrics.Snapshot:
        try:
            started = self.client.loop.time()
            snapshot = await asyncio.wait_for(
                self.client.controller.collect_metrics(self.node), _METRICS_GATHER_TIMEOUT_S
            )
            self._metrics_cache = (started, snapshot)
            return snapshot
        finally:
            self._metrics_task = None

    async def close(self) -> None:
        """Stop the work this app started on its own (a metrics gathering under way); log the
        access lines still waiting."""
        self.access_log.close()
        task = self._metrics_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    # -- websockets (ASGI, after uvicorn's upgrade) ----------------------------------------------

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "websocket":
            raise RuntimeError(f"HTTP requests are served by ProxyHttpProtocol, not {kind!r}")
        model = _scan_headers(scope["headers"])[2]
        path: str = scope["path"]
        match = self._match(path)
        if match is None:
            await send({"type": "websocket.close", "code": 1008})
            return
        prefix, app, ingress = match
        root_path = scope.get("root_path", "")
        if prefix != "/":
            root_path += prefix
        wire = asgi.pack_scope(scope, root_path)
        meta = {"asgi": True, "request_id": _new_request_id(), "route": prefix}
        if model:
            meta["multiplexed_model_id"] = model
        await self._websocket(wire, receive, send, app, ingress, meta)

    async def _websocket(
        self,
        wire: tuple[Any, ...],
        receive: Receive,
        send: Send,
        app: str,
        ingress: str,
        meta: Message,
    ) -> None:
        connect = await receive()  # websocket.connect
        call = Call(app, ingress, "__call__", (wire, connect), {}, meta, stream=True)
        call.plain = True
        self.client.submit(call)
        stream = call.stream
        assert stream is not None
        pump = self.tasks.spawn(self._pump_input(receive, call), self.client.loop)
        try:
            while True:
                try:
                    message = await stream.next_async()
                except StopAsyncIteration:
                    break
                await send(message)
            call.outcome()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {safe_str(exc)}"
            logger.error("websocket to %s failed: %s", app, reason, exc_info=exc)
            try:
                await send({"type": "websocket.close", "code": 1011})
            except Exception:
                pass
        finally:
            pump.cancel()
            if not call.done.fired:
                self.client.cancel(call)

    async def _pump_input(self, receive: Receive, call: Call) -> None:
        await call.assigned.wait()
        while True:
            message = await receive()
            self.client.send_input(call, message)
            if message["type"] == "websocket.disconnect":
                return


# A scrape within this long of the last gathering gets its replicas' part (the proxy's own
# counts are always fresh): scrapers poll every 10-60 s, but many of them, or a dashboard
# refreshing fast, would otherwise each make the controller ask every replica.
_METRICS_MAX_AGE_S = 1.0
_METRICS_GATHER_TIMEOUT_S = 10.0
_ID_PREFIX = uuid.uuid4().hex[:16]
_PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"
_ids = itertools.count(1)
_SAFE_ID = re.compile(rb"[\x21-\x7e]{1,256}")


def _new_request_id() -> str:
    # A per-process random prefix and a counter: unique, and far cheaper than uuid4 per request.
    return f"{_ID_PREFIX}{next(_ids):016x}"


def _scan_headers(
    headers: Any,
) -> tuple[str | None, str | None, str | None, bytes | None, int]:
    """x-request-id, content-length, the multiplexed model id, the Host and how many Host
    headers came, in one pass (ASGI servers give header names in lower case)."""
    request_id = length = model = None
    host = None
    hosts = 0
    for key, value in headers:
        if key == b"host":
            host = value
            hosts += 1
        elif key == b"content-length":
            length = value.decode("latin-1")
        elif key == b"x-request-id":
            if _SAFE_ID.fullmatch(value):  # it is echoed back: never a byte that breaks a header
                request_id = value.decode("ascii")
        elif key == b"serve_multiplexed_model_id":
            model = value.decode("latin-1")
    return request_id, length, model, host, hosts


def _seen(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
