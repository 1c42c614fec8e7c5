"""The proxy's HTTP/1.1 connections: uvicorn's protocol with serval's own request cycle.

uvicorn's ``HttpToolsProtocol`` still does the connection's work: httptools parsing, keep-alive
and its timeout, flow control, graceful shutdown, the 400 for malformed requests, and upgrading
websockets (which then run through the ASGI app, ``ProxyApp``). What changes is the cycle of
an ordinary request. Through ASGI, a request costs a scope dict, a ``RequestResponseCycle``, a
Task, an Event and four message dicts before the proxy does its own work of routing and
forwarding. Here ``on_headers_complete`` routes the request, the body collects as it arrives,
the request leaves for a replica as one message once it is whole, and the reply is written with
one ``transport.write`` by the callback that delivers it. Only a streamed reply gets a task.

Pipelined requests are answered in order: while one is answered the next waits, and reading
pauses, as uvicorn does.
"""

from __future__ import annotations

import asyncio
import http
import logging
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serval._private.calls import Call, StreamBuffer
from serval.exceptions import (
    BackPressureError,
    DeploymentNotFoundError,
    DeploymentUnavailableError,
    RequestCancelledError,
)

if TYPE_CHECKING:
    from serval._private.proxy import ProxyApp

logger = logging.getLogger("serval.proxy")

Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]

_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


_STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}


# The statuses whose responses carry a body (not 1xx, 204, 304), for a set lookup.
_WITH_BODY = frozenset(s for s in range(200, 600) if s not in (204, 304))


def text_reply(status: int, text: str) -> Reply:
    return status, list(_TEXT), text.encode()


class _TimedOut(Exception):
    pass


_UNAVAILABLE = (BackPressureError, DeploymentUnavailableError, DeploymentNotFoundError)


class Exchange:
    """One request on a connection and its answer."""

    __slots__ = (
        "body",
        "body_done",
        "call",
        "close_after",
        "complete",
        "conn",
        "fetch",
        "head_only",
        "keep_alive",
        "method",
        "reply",
        "request_id",
        "route",
        "size",
        "started",
        "status",
        "target",
        "task",
        "timer",
        "wants_continue",
        "wire",
    )

    def __init__(
        self, conn: ProxyHttpProtocol, request_id: str, keep_alive: bool, method: str
    ) -> None:
        self.method = method
        self.route = ""  # the route prefix it matched, for /-/metrics
        self.status = 0
        self.conn = conn
        self.request_id = request_id
        self.keep_alive = keep_alive  # uvicorn's shutdown() turns it off
        self.head_only = False
        self.wants_continue = False
        self.close_after = False
        # What to do: answer ``reply`` as it is, or the one ``fetch`` makes (a system route that
        # asks the controller), or forward to ``target`` (app, ingress, meta).
        self.reply: Reply | None = None
        self.fetch: Callable[[], Awaitable[Reply]] | None = None
        self.target: tuple[str, str, dict[str, Any]] | None = None
        self.wire: tuple[Any, ...] = ()
        self.body: list[bytes] = []
        self.size = 0
        self.body_done = False
        self.started = False  # its turn on the connection has come
        self.complete = False
        self.call: Call | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    # -- the request ---------------------------------------------------------------------------

    def refuse(self, status: int, text: str) -> None:
        """Answer at once, without the body, and close the connection after it."""
        self.reply = text_reply(status, text)
        self.target = None
        self.close_after = True
        if self.started:
            self._answer()

    def add_body(self, chunk: bytes) -> None:
        if self.complete or self.reply is not None:
            return  # answered already: the rest of the body is read and dropped
        self.size += len(chunk)
        limit = self.conn.proxy.options.max_request_body_bytes
        if self.size > limit:
            self.body = []
            self.refuse(413, f"Request body larger than {limit} bytes")
            return
        self.body.append(chunk)

    def end_body(self) -> None:
        self.body_done = True
        if self.started and not self.complete:
            self._go()

    def start(self) -> None:
        """Its turn: answer it now if the whole request is here (or need not be)."""
        self.started = True
        if self.close_after or self.body_done:
            self._go()
        elif self.wants_continue and self.target is not None:
            self.conn.transport.write(_CONTINUE)

    def _go(self) -> None:
        if self.target is not None:
            self._forward()
        elif self.fetch is not None and self.reply is None:
            self.task = self.conn.proxy.client.loop.create_task(self._fetch_answer(self.fetch))
        else:
            self._answer()

    async def _fetch_answer(self, fetch: Callable[[], Awaitable[Reply]]) -> None:
        try:
            reply = await fetch()
        except Exception as exc:  # the controller is away (restarting, say): try again later
            logger.warning("%s could not be answered: %r", self.request_id, exc)
            reply = text_reply(503, "Not available now, try again")
        self.respond(*reply)

    def _answer(self) -> None:
        reply = self.reply
        assert reply is not None
        self.respond(*reply)

    def _forward(self) -> None:
        assert self.target is not None
        app, ingress, meta = self.target
        body = self.body
        payload = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        call = Call(app, ingress, "__call__", (self.wire, payload), {}, meta, stream=True)
        call.plain = True
        self.call = call
        proxy = self.conn.proxy
        timeout = proxy.options.request_timeout_s
        if timeout is not None:
            self.timer = proxy.client.loop.call_later(timeout, self._time_out)
        proxy.client.submit(call)
        stream = call.stream
        assert stream is not None
        stream.when_changed(self._on_reply)

    def _time_out(self) -> None:
        call = self.call
        if call is not None and not call.done.fired:
            call.set_exception(_TimedOut())  # first, so the reply handler sees a timeout
            self.conn.proxy.client.cancel(call)  # then the replica stops working on it

    # -- the reply -----------------------------------------------------------------------------

    def _on_reply(self) -> None:
        if self.complete:
            return
        call = self.call
        assert call is not None and call.stream is not None
        stream = call.stream
        if stream.items:
            self._stream(stream)
            return
        if not stream.ended:
            stream.when_changed(self._on_reply)
            return
        try:
            status, headers, body = call.outcome()
        except BaseException as exc:
            self._fail(exc)
            return
        self.respond(status, headers, body)

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, _TimedOut):
            self.respond(*text_reply(408, "Request timed out"))
        elif isinstance(exc, _UNAVAILABLE):
            # (not found: the app was deleted between this request's routing and its sending)
            self.respond(*text_reply(503, str(exc)))
        elif isinstance(exc, RequestCancelledError) and self.conn.transport.is_closing():
            self.complete = True  # the client went away; nobody to answer
        else:
            target = self.target[0] if self.target is not None else "?"
            logger.error("request %s to %s failed: %s", self.request_id, target, exc, exc_info=exc)
            self.respond(*text_reply(500, "Internal Server Error"))

    def _head(self, status: int, headers: Headers, length: int | None) -> tuple[list[bytes], bool]:
        """The status line and headers, as pieces; and whether the connection closes after."""
        out = [_STATUS_LINES.get(status) or _status_line(status)]
        has_length = False
        close = self.close_after or not self.keep_alive
        said_close = False
        for name, value in headers:
            if name == b"content-length":
                has_length = True
            elif name == b"connection" and b"close" in value.lower():
                close = said_close = True
            out += (name, b": ", value, b"\r\n")
        out += (b"x-request-id: ", self.request_id.encode(), b"\r\n")
        if not has_length and length is not None and status in _WITH_BODY:
            out += (b"content-length: ", b"%d" % length, b"\r\n")
        if close and not said_close:
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        return out, close

    def respond(self, status: int, headers: Headers, body: bytes) -> None:
        """Write a whole response in one write."""
        if self.complete:
            return
        self.status = status
        out, close = self._head(status, headers, len(body))
        if body and not self.head_only and status in _WITH_BODY:
            out.append(body)
        transport = self.conn.transport
        if not transport.is_closing():
            transport.write(b"".join(out))
        self._done(close)

    def _done(self, close: bool) -> None:
        self.complete = True
        counts = self.conn.proxy.http_requests
        key = (self.route, self.method, self.status)
        counts[key] = counts.get(key, 0) + 1
        if self.timer is not None:
            self.timer.cancel()
        if close:
            self.conn.transport.close()
        self.conn.exchange_done(self)

    def _stream(self, stream: StreamBuffer) -> None:
        self.task = self.conn.proxy.client.loop.create_task(self._stream_out(stream))

    async def _stream_out(self, stream: StreamBuffer) -> None:
        """Write a reply that arrives message by message, each as soon as it comes."""
        conn = self.conn
        transport = conn.transport
        loop = conn.proxy.client.loop
        chunked = close = started = False
        while True:
            out: list[bytes] = []
            finished = False
            while stream.items:  # what is here already leaves in one write
                message = stream.items.popleft()
                if message["type"] == "http.response.start":
                    status: int = message["status"]
                    self.status = status
                    headers: Headers = message.get("headers", [])
                    chunked = not self.head_only and status in _WITH_BODY
                    chunked = chunked and all(k != b"content-length" for k, _ in headers)
                    extra = [(b"transfer-encoding", b"chunked")] if chunked else []
                    head, close = self._head(status, [*headers, *extra], None)
                    out += head
                    started = True
                elif message["type"] == "http.response.body":
                    body: bytes = message.get("body", b"")
                    if chunked and body:
                        out += (b"%x\r\n" % len(body), body, b"\r\n")
                    elif body and not self.head_only:
                        out.append(body)
                    if not message.get("more_body", False):
                        if chunked:
                            out.append(b"0\r\n\r\n")
                        finished = True
            if transport.is_closing():
                return  # connection_lost cancels the call
            if out:
                transport.write(b"".join(out))
            if finished:
                self._done(close)
                return
            if stream.ended:
                self._end_stream(stream, started, chunked, close)
                return
            if conn.flow.write_paused:
                await conn.flow.drain()
            await stream.wait_changed(loop)

    def _end_stream(self, stream: StreamBuffer, started: bool, chunked: bool, close: bool) -> None:
        """The stream ended without a last body message: by an error, or just so."""
        if not started:
            self._fail(stream.error or RuntimeError("the replica streamed no response start"))
        elif stream.error is not None:
            # Too late for an error status: cut the response short so the client sees it broke.
            logger.error(
                "stream of request %s broke off: %s",
                self.request_id,
                stream.error,
                exc_info=stream.error,
            )
            self.complete = True
            self.conn.transport.close()
        else:
            if chunked:
                self.conn.transport.write(b"0\r\n\r\n")
            self._done(close)

    def abandon(self) -> None:
        """The connection is gone: stop the work done for it."""
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        call = self.call
        if call is not None and not call.done.fired and not self.complete:
            self.conn.proxy.client.cancel(call)
        self.complete = True


class ProxyHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering ordinary requests through ``Exchange``."""

    proxy: ProxyApp  # set on the subclass that ``protocol_for`` makes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._current: Exchange | None = None  # the request being parsed
        self._active: Exchange | None = None  # the request being answered
        self._queued: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self._idle_since: float | None = None  # see _arm_keep_alive
        self._keep_alive_timer: asyncio.TimerHandle | None = None

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # No ASGI scope: it is built only for a websocket upgrade (see on_headers_complete).
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_headers_complete(self) -> None:
        parser = self.parser
        if parser.should_upgrade() and self._should_upgrade():
            self._asgi_scope()
            super().on_headers_complete()  # uvicorn upgrades to its websocket protocol
            return
        version = parser.get_http_version()
        ex = self.proxy.exchange(
            self,
            method=parser.get_method().decode("ascii"),
            http_version=version,
            url=httptools.parse_url(self.url),
            headers=self.headers,
            keep_alive=version != "1.0" and parser.should_keep_alive(),
        )
        ex.wants_continue = self.expect_100_continue
        self._current = ex
        if self._active is None:
            self._active = ex
            ex.start()
        else:
            self.flow.pause_reading()
            self._queued.append(ex)

    def on_body(self, body: bytes) -> None:
        ex = self._current
        if ex is not None and not (self.parser.should_upgrade() and self._should_upgrade()):
            ex.add_body(body)

    def on_message_complete(self) -> None:
        ex = self._current
        if ex is not None and not (self.parser.should_upgrade() and self._should_upgrade()):
            self._current = None
            ex.end_body()

    def _asgi_scope(self) -> None:
        self.scope = {  # what uvicorn's on_message_begin builds
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,  # type: ignore[typeddict-item]
            "root_path": self.root_path,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }

    # -- answers -------------------------------------------------------------------------------

    def exchange_done(self, ex: Exchange) -> None:
        """``ex`` is answered: on to the next pipelined request, or wait for one."""
        if ex is not self._active:
            return
        self._active = None
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self._queued:
            self._active = self._queued.popleft()
            self._active.start()
        elif self._current is None or self._current.complete:
            self._arm_keep_alive()

    # -- keep-alive ----------------------------------------------------------------------------
    # uvicorn arms a timer after every response and cancels it on the next request: two heap
    # operations per request. Here the connection notes when it went idle, and one timer per
    # connection, re-armed only when it fires, closes the connection once it has been idle for
    # the whole keep-alive timeout.

    def _arm_keep_alive(self) -> None:
        self._idle_since = self.loop.time()
        if self._keep_alive_timer is None:
            self._keep_alive_timer = self.loop.call_at(
                self._idle_since + self.timeout_keep_alive, self._check_idle
            )

    def _check_idle(self) -> None:
        self._keep_alive_timer = None
        if self._idle_since is None or self.transport.is_closing():
            return  # busy: the next response re-arms it
        due = self._idle_since + self.timeout_keep_alive
        if self.loop.time() >= due:
            self.transport.close()
        else:
            self._keep_alive_timer = self.loop.call_at(due, self._check_idle)

    def _unset_keepalive_if_required(self) -> None:
        # Called by uvicorn's data_received for every read: data means not idle.
        self._idle_since = None

    # -- the connection's end ------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        for ex in (self._active, *self._queued):
            if ex is not None:
                ex.abandon()
        self._active = self._current = None
        self._queued.clear()
        if self._keep_alive_timer is not None:
            self._keep_alive_timer.cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server stops: close idle connections now, busy ones after their answer."""
        if self._active is None:
            self.transport.close()
            return
        for ex in (self._active, *self._queued):
            ex.keep_alive = False


def protocol_for(proxy: ProxyApp) -> type[ProxyHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to ``proxy``."""
    return type("ServalHttpProtocol", (ProxyHttpProtocol,), {"proxy": proxy})


def unquote_path(raw_path: bytes) -> str:
    path = raw_path.decode("ascii")
    return urllib.parse.unquote(path) if "%" in path else path
