"""The HTTP proxy: uvicorn serving a lean ASGI app that forwards to ingress deployments.

Longest ``route_prefix`` match picks the app; the request (scope and whole body) goes straight
to a replica of the app's ingress deployment through this process's router, and the response
comes back in one piece or message by message. System routes live under ``/-/``.
Every response carries ``x-request-id``; errors never show a traceback to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from serval._private.calls import Call
from serval._private.client import ClusterClient
from serval._private.http_replica import pack_scope
from serval.config import HTTPOptions
from serval.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

logger = logging.getLogger("serval.proxy")

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _TimedOut(Exception):
    pass


class ProxyApp:
    def __init__(self, client: ClusterClient, options: HTTPOptions) -> None:
        self.client = client
        self.options = options
        self._routes: list[tuple[str, str, str]] = []  # (prefix, app, ingress), longest first
        self._routes_of: dict[str, tuple[str, str]] | None = None
        # HTTP requests in flight, by age (see _sweep), and the disconnect watchers of old ones.
        self._young: dict[Call, Receive] = {}
        self._old: dict[Call, Receive] = {}
        self._watchers: dict[Call, asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None

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

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        given_id, length, model = _scan_headers(scope["headers"])
        request_id = given_id or _new_request_id()
        path: str = scope["path"]
        if path.startswith("/-/") and kind == "http":
            await self._system(path, send, request_id)
            return
        match = self._match(path)
        if match is None:
            if kind == "http":
                await _text(
                    send,
                    404,
                    f"Path '{path}' not found. Ping http://.../-/routes for available routes.",
                    request_id,
                )
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        prefix, app, ingress = match
        root_path = scope.get("root_path", "")
        if prefix != "/":
            root_path += prefix
        wire = pack_scope(scope, root_path)
        meta = {"asgi": True, "request_id": request_id, "route": prefix}
        if model:
            meta["multiplexed_model_id"] = model
        if kind == "http":
            await self._http(wire, receive, send, app, ingress, meta, request_id, length)
        elif kind == "websocket":
            await self._websocket(wire, receive, send, app, ingress, meta)

    async def _system(self, path: str, send: Send, request_id: str) -> None:
        if path == "/-/healthz":
            await _text(send, 200, "success", request_id)
        elif path == "/-/routes":
            body = json.dumps({p: a for p, (a, _) in sorted(self.client.routes.items())})
            await _send_whole(
                send, 200, [(b"content-type", b"application/json")], body.encode(), request_id
            )
        else:
            await _text(send, 404, f"Path '{path}' not found.", request_id)

    async def _http(
        self,
        wire: tuple[Any, ...],
        receive: Receive,
        send: Send,
        app: str,
        ingress: str,
        meta: Message,
        request_id: str,
        length: str | None,
    ) -> None:
        body = await self._read_body(length, receive, send, request_id)
        if body is None:
            return
        call = Call(app, ingress, "__call__", (wire, body), {}, meta, stream=True)
        call.plain = True
        self.client.submit(call)
        stream = call.stream
        assert stream is not None
        loop = self.client.loop
        self._young[call] = receive  # watched for disconnects if it runs long: see _sweep
        timer = None
        if self.options.request_timeout_s is not None:
            timer = loop.call_later(self.options.request_timeout_s, self._time_out, call)
        try:
            try:
                first = await stream.next_async(loop)
            except StopAsyncIteration:
                first = None
            if first is None:
                status, headers, payload = call.outcome()
                await _send_whole(send, status, headers, payload, request_id)
                return
            await self._stream(first, stream, send, request_id)
        except _TimedOut:
            await _text(send, 408, "Request timed out", request_id)
        except BackPressureError as exc:
            await _text(send, 503, str(exc), request_id)
        except DeploymentUnavailableError as exc:
            await _text(send, 503, str(exc), request_id)
        except RequestCancelledError:
            pass  # the client went away; nobody to answer
        except Exception as exc:
            logger.error("request %s to %s failed: %s", request_id, app, exc, exc_info=exc)
            await _text(send, 500, "Internal Server Error", request_id)
        finally:
            if self._young.pop(call, None) is None and self._old.pop(call, None) is None:
                watcher = self._watchers.pop(call, None)
                if watcher is not None:
                    watcher.cancel()
            if timer is not None:
                timer.cancel()

    async def _stream(self, first: Message, stream: Any, send: Send, request_id: str) -> None:
        loop = self.client.loop
        message: Message | None = first
        started = False
        while message is not None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
                started = True
            try:
                await send(message)
            except OSError:
                return
            try:
                message = await stream.next_async(loop)
            except StopAsyncIteration:
                message = None
            except Exception:
                if not started:
                    raise
                logger.exception("stream of request %s broke off", request_id)
                return

    async def _read_body(
        self, length: str | None, receive: Receive, send: Send, request_id: str
    ) -> bytes | None:
        limit = self.options.max_request_body_bytes
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _text(send, 400, "Bad Content-Length", request_id)
                return None
            if declared > limit:
                await _text(send, 413, f"Request body larger than {limit} bytes", request_id)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _text(send, 413, f"Request body larger than {limit} bytes", request_id)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # -- client disconnects --------------------------------------------------------------------
    # Most requests finish within milliseconds. Rather than a task per request listening for the
    # client going away, a sweep every _SWEEP_S gives one to each request that has been running
    # for a whole sweep period; a request that finishes first costs two dict operations.

    def start(self) -> None:
        self._sweeper = self.client.loop.create_task(self._sweep())

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for watcher in self._watchers.values():
            watcher.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_S)
            for call, receive in self._old.items():
                self._watchers[call] = self.client.loop.create_task(
                    self._watch_disconnect(receive, call)
                )
            self._old, self._young = self._young, {}

    async def _watch_disconnect(self, receive: Receive, call: Call) -> None:
        message = await receive()
        if message["type"] == "http.disconnect" and not call.done.fired:
            self.client.cancel(call)

    def _time_out(self, call: Call) -> None:
        if not call.done.fired:
            call.set_exception(_TimedOut())  # first, so the waiter sees a timeout
            self.client.cancel(call)  # then the replica stops working on it

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
        pump = self.client.loop.create_task(self._pump_input(receive, call))
        try:
            while True:
                try:
                    message = await stream.next_async()
                except StopAsyncIteration:
                    break
                await send(message)
            call.outcome()
        except Exception as exc:
            logger.error("websocket to %s failed: %s", app, exc, exc_info=exc)
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


_ID_PREFIX = uuid.uuid4().hex[:16]
_ids = itertools.count(1)
_SWEEP_S = 0.05


def _new_request_id() -> str:
    # A per-process random prefix and a counter: unique, and far cheaper than uuid4 per request.
    return f"{_ID_PREFIX}{next(_ids):016x}"


def _scan_headers(headers: Any) -> tuple[str | None, str | None, str | None]:
    """x-request-id, content-length and the multiplexed model id, in one pass (ASGI servers
    give header names in lower case)."""
    request_id = length = model = None
    for key, value in headers:
        if key == b"content-length":
            length = value.decode("latin-1")
        elif key == b"x-request-id":
            request_id = value.decode("latin-1")
        elif key == b"serve_multiplexed_model_id":
            model = value.decode("latin-1")
    return request_id, length, model


async def _send_whole(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes, request_id: str
) -> None:
    headers = [*headers, (b"x-request-id", request_id.encode())]
    if not any(k.lower() == b"content-length" for k, _ in headers):
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _text(send: Send, status: int, text: str, request_id: str) -> None:
    await _send_whole(
        send, status, [(b"content-type", b"text/plain; charset=utf-8")], text.encode(), request_id
    )


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
