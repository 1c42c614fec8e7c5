"""The proxy's HTTP/1.1 connections: uvicorn's protocol with serval's own request cycle.

uvicorn's ``HttpToolsProtocol`` still does part of the connection's work: httptools parsing,
flow control, graceful shutdown, the 400 for malformed requests, and upgrading websockets
(which then run through the ASGI app, ``ProxyApp``). What changes is the cycle of an ordinary
request. Through ASGI, a request costs a scope dict, a ``RequestResponseCycle``, a Task, an
Event and four message dicts before the proxy does its own work of routing and forwarding.
Here ``on_headers_complete`` routes the request, the body collects as it arrives, the request
leaves for a replica as one message once it is whole, and the reply is written with one
``transport.write`` by the callback that delivers it. Only a streamed reply gets a task.

A large body that is not whole when its request's turn comes leaves as it arrives instead
(``Upload``): the request with the body so far, then the rest as input messages, under a
credit window the replica's acknowledgements open, so an upload holds about one window here.

Pipelined requests are answered in order: while one is answered the next waits, and reading
pauses, as uvicorn does.

The connection's limits (see ``HTTPOptions``) cost the common request no timer of its own:
one timer per connection, re-armed only when it fires, serves the header, body and
keep-alive timeouts from timestamps the connection notes as it goes; header bytes are counted
per read while a head is incomplete, so an endless header stops being read at the limit.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, ClassVar, Protocol

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serval._private.caller.calls import Call, StreamBuffer
from serval._private.caller.client import ClusterClient
from serval._private.proxy.replies import (
    CONTINUE,
    STATUS_LINES,
    WITH_BODY,
    Headers,
    Reply,
    close_with,
    status_line,
    text_reply,
)
from serval._private.proxy.upload import Upload, UploadCall
from serval._private.wire.protocol import safe_str
from serval._private.wire.tasks import TaskOwner
from serval.config import HTTPOptions
from serval.exceptions import (
    BackPressureError,
    DeploymentNotFoundError,
    DeploymentUnavailableError,
    ReplicaDiedError,
    RequestCancelledError,
)

logger = logging.getLogger("serval.proxy")


class ProxyApp(Protocol):
    """What the connections need of the proxy's routing (``app.ProxyApp``)."""

    client: ClusterClient
    options: HTTPOptions
    tasks: TaskOwner  # owns every task an exchange starts

    def ended(self, ex: Exchange) -> None:
        """``ex`` is answered, or broke off: its metrics and access line."""

    def exchange(
        self,
        conn: ProxyHttpProtocol,
        method: str,
        http_version: str,
        url: Any,
        headers: Headers,
        keep_alive: bool,
    ) -> Exchange: ...


class _TimedOut(Exception):
    pass


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a connection that is being closed."""


_UNAVAILABLE = (DeploymentUnavailableError, DeploymentNotFoundError)
_NEVER = math.inf


class Exchange:
    """One request on a connection and its answer."""

    __slots__ = (
        "app",
        "began",
        "body",
        "body_done",
        "call",
        "close_after",
        "complete",
        "conn",
        "deployment",
        "fetch",
        "head_only",
        "keep_alive",
        "method",
        "path",
        "reply",
        "request_id",
        "route",
        "size",
        "started",
        "status",
        "target",
        "task",
        "timer",
        "upload",
        "wants_continue",
        "wire",
    )

    def __init__(
        self, conn: ProxyHttpProtocol, request_id: str, keep_alive: bool, method: str
    ) -> None:
        self.began = time.time()
        self.method = method
        self.path = ""
        # For its metrics and access line: the route prefix it matched, that route's app and
        # ingress deployment ("" for none)
        self.route = self.app = self.deployment = ""
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
        self.upload: Upload | None = None  # a body that streams (see Upload)
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    # -- the request ---------------------------------------------------------------------------

    def refuse(self, status: int, text: str) -> None:
        """Answer at once, without (the rest of) the body, and close the connection after it;
        a request already on its way to a replica is cancelled."""
        if self.complete:
            return
        self.reply = text_reply(status, text)
        self.target = None
        self.close_after = True
        self.body = []
        call = self.call
        if self.started:
            self._answer()
        if call is not None and not call.done.fired:  # (answered first: the cancel is no error)
            self.conn.proxy.client.cancel(call)

    def add_body(self, chunk: bytes) -> None:
        if self.complete or self.target is None:
            return  # answered already, or answered without it: the body is read and dropped
        size = self.size + len(chunk)
        self.size = size
        conn = self.conn
        if size > conn.max_body:
            self.refuse(413, f"Request body larger than {conn.max_body} bytes")
            return
        upload = self.upload
        if upload is not None:
            upload.add(chunk)
            return
        self.body.append(chunk)
        if size > conn.window and self.started:
            self._forward(streamed=True)

    def end_body(self) -> None:
        self.body_done = True
        upload = self.upload
        if upload is not None:
            if not self.complete:
                upload.end()
        elif self.started and not self.complete:
            self._go()

    def start(self) -> None:
        """Its turn: answer it now if the whole request is here (or need not be)."""
        self.started = True
        if self.close_after or self.body_done:
            self._go()
            return
        if self.wants_continue and self.target is not None:
            self.conn.transport.write(CONTINUE)
        if self.size > self.conn.window and self.target is not None:
            self._forward(streamed=True)

    def _go(self) -> None:
        if self.target is not None:
            self._forward()
        elif self.fetch is not None and self.reply is None:
            self.task = self.conn.proxy.tasks.spawn(
                self._fetch_answer(self.fetch), self.conn.proxy.client.loop
            )
        else:
            self._answer()

    async def _fetch_answer(self, fetch: Callable[[], Awaitable[Reply]]) -> None:
        try:
            reply = await fetch()
        except Exception as exc:  # the controller is away (restarting, say): try again later
            logger.warning("%s could not be answered: %s", self.request_id, _describe(exc))
            reply = text_reply(503, "Not available now, try again")
        self.respond(*reply)

    def _answer(self) -> None:
        reply = self.reply
        assert reply is not None
        self.respond(*reply)

    def _forward(self, streamed: bool = False) -> None:
        assert self.target is not None
        app, ingress, meta = self.target
        body = self.body
        payload = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        args = (self.wire, payload)
        call: Call
        if streamed:
            meta["more_body"] = True  # the replica takes the rest as input (see Upload)
            upload = self.upload = Upload(self, len(payload), self.conn.window)
            call = UploadCall(upload, app, ingress, args, meta)
        else:
            call = Call(app, ingress, "__call__", args, {}, meta, stream=True)
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
        elif isinstance(exc, BackPressureError):
            self.respond(*self._shed(exc))
        elif isinstance(exc, _UNAVAILABLE):
            # (not found: the app was deleted between this request's routing and its sending)
            self.respond(*text_reply(503, str(exc)))
        elif isinstance(exc, ReplicaDiedError):
            # The replica, not the request, failed: 502 (a gateway's upstream broke off), which
            # clients and load balancers retry; 503 says the service refused, which it did not.
            logger.warning("request %s: %s", self.request_id, exc)
            self.respond(*text_reply(502, "Bad Gateway: the replica serving it died"))
        elif isinstance(exc, RequestCancelledError) and self.conn.transport.is_closing():
            self.complete = True  # the client went away; nobody to answer
        else:
            target = self.target[0] if self.target is not None else "?"
            logger.error(
                "request %s to %s failed: %s", self.request_id, target, _describe(exc), exc_info=exc
            )
            self.respond(*text_reply(500, "Internal Server Error"))

    def _shed(self, exc: BackPressureError) -> Reply:
        """The answer to a request its deployment's queue had no room for: a 503 unless the
        deployment's backpressure_config says otherwise (429, Retry-After)."""
        status, headers, body = text_reply(503, str(exc))
        router = None
        if self.target is not None:
            router = self.conn.proxy.client.routers.get((self.target[0], self.target[1]))
        config = router.info.backpressure if router is not None else None
        if config is not None:
            status = config.status_code
            retry_after = config.retry_after_header()
            if retry_after is not None:
                headers.append((b"retry-after", retry_after))
        return status, headers, body

    def _head(self, status: int, headers: Headers, length: int | None) -> tuple[list[bytes], bool]:
        """The status line and headers, as pieces; and whether the connection closes after."""
        out = [STATUS_LINES.get(status) or status_line(status)]
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
        if not has_length and length is not None and status in WITH_BODY:
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
        if body and not self.head_only and status in WITH_BODY:
            out.append(body)
        transport = self.conn.transport
        if not transport.is_closing():
            transport.write(b"".join(out))
        self._done(close)

    def _done(self, close: bool) -> None:
        self.complete = True
        self.conn.proxy.ended(self)
        if self.timer is not None:
            self.timer.cancel()
        if close:
            self.conn.transport.close()
        self.conn.exchange_done(self)

    def _stream(self, stream: StreamBuffer) -> None:
        self.task = self.conn.proxy.tasks.spawn(
            self._stream_out(stream), self.conn.proxy.client.loop
        )

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
                message = stream.take()
                if message["type"] == "http.response.start":
                    status: int = message["status"]
                    self.status = status
                    headers: Headers = message.get("headers", [])
                    chunked = not self.head_only and status in WITH_BODY
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
            # Too late for an error status: cut the response short so the client sees it broke
            # (no last chunk), as uvicorn does.
            logger.error(
                "stream of request %s broke off: %s",
                self.request_id,
                stream.error,
                exc_info=stream.error,
            )
            self.complete = True
            self.conn.proxy.ended(self)
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
    """uvicorn's httptools protocol, answering ordinary requests through ``Exchange``, with
    serval's limits (``HTTPOptions``) on what a connection may take and for how long."""

    # Set on the subclass that ``protocol_for`` makes (no per-connection copies).
    proxy: ProxyApp
    max_connections: int
    max_head: int
    max_body: int
    window: int
    header_timeout: float
    body_timeout: float
    keep_alive_timeout: float
    # TLS connections in their handshake -> when they opened (tls.TlsHttpProtocol's)
    handshaking: ClassVar[dict[ProxyHttpProtocol, float]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        now = self.loop.time()
        self._current: Exchange | None = None  # the request being parsed
        self._active: Exchange | None = None  # the request being answered
        self._queued: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self._free_since = now  # when it last had nothing to answer: the idle go first
        self._stopped = False  # being closed by us: the rest of what it sends is dropped
        # Where the parser is: in a head (``_begun``: some of it is here), or in a body.
        self._in_head = True
        self._begun = False
        self._body_pending = False
        self._head_bytes = 0  # read while the head was incomplete (see data_received)
        # What the timer watches, each None when it does not apply: the head must be whole
        # by ``_head_since`` + header timeout, the body's next bytes come by ``_body_since`` +
        # body timeout, and a connection waiting between requests closes at ``_wait_since`` +
        # keep-alive timeout.
        self._head_since: float | None = now
        self._body_since: float | None = None
        self._wait_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = _NEVER
        self._wake_by(now + self.header_timeout)
        if len(self.connections) > self.max_connections:
            self._make_room()

    # -- reading -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._in_head:
            # httptools keeps a partial header to itself, so its callbacks cannot tell how
            # much a head has grown: count here, before an endless header fills the memory.
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            if not self._stopped:  # (else a callback stopped the parser: it is being closed)
                self._parse_failed(exc)
            return
        if self._in_head:
            if self._head_bytes > self.max_head:
                self._stop(431, f"Request header fields larger than {self.max_head} bytes")
            elif self._begun and self._head_since is None and self._active is None:
                # A head begun after a wait between requests, not whole yet: its clock starts.
                self._head_since = now = self.loop.time()
                self._wake_by(now + self.header_timeout)
        elif self._body_pending:
            self._body_since = now = self.loop.time()
            self._wake_by(now + self.body_timeout)

    def _parse_failed(self, exc: httptools.HttpParserError) -> None:
        cause = exc.__context__  # what a callback raised, for a callback error
        if isinstance(exc, httptools.HttpParserCallbackError) and not isinstance(
            cause, httptools.HttpParserError
        ):
            logger.error("handling a request failed", exc_info=cause)
            self._stop(500, "Internal Server Error")
        else:
            self.logger.warning("Invalid HTTP request received.")
            self._stop(400, "Invalid HTTP request received.")

    def resume_body(self) -> None:
        """Read the client again after holding it back for credit (see ``Upload``)."""
        if self._stopped or self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self._body_pending:  # the time held back does not count against it
            self._body_since = now = self.loop.time()
            self._wake_by(now + self.body_timeout)

    # -- parser callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        # No ASGI scope: it is built only for a websocket upgrade (see on_headers_complete).
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._begun = True
        self._wait_since = None  # a request begins: the keep-alive wait is over (bare CRLFs
        # between requests, which the parser skips, do not end it)

    def on_headers_complete(self) -> None:
        self._in_head = self._begun = False
        self._head_since = None
        if self._head_bytes > self.max_head:  # the count is of whole reads: measure the head
            self._head_bytes = 0
            if _head_size(self.url, self.headers) > self.max_head:
                self._stop(431, f"Request header fields larger than {self.max_head} bytes")
                raise _Stop
        self._head_bytes = 0
        parser = self.parser
        if parser.should_upgrade() and self._should_upgrade():
            self._asgi_scope()
            super().on_headers_complete()  # uvicorn upgrades to its websocket protocol
            return
        self._body_pending = True  # until on_message_complete, at once when there is none
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
        self._body_pending = False
        self._body_since = None
        self._in_head = True  # the next request's (the rest of this read is not counted)
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

    def handle_websocket_upgrade(self) -> None:
        self._cancel_timer()  # the websocket protocol has the connection from here on
        self._stopped = True
        super().handle_websocket_upgrade()

    # -- answers -------------------------------------------------------------------------------

    def exchange_done(self, ex: Exchange) -> None:
        """``ex`` is answered: on to the next pipelined request, or wait for one."""
        if ex is not self._active:
            return
        self._active = None
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self._queued:
            if self._body_pending:  # (its body was held back while it waited its turn)
                self._body_since = self.loop.time()
            self._active = self._queued.popleft()
            self._active.start()
            return
        now = self._free_since = self.loop.time()
        if self._in_head:
            if self._begun:  # the next head has begun: it has the header timeout from now
                self._head_since = now
                self._wake_by(now + self.header_timeout)
            else:
                self._wait_since = now
                self._wake_by(now + self.keep_alive_timeout)
        elif self._body_pending:  # answered before its body was all here: it is read on
            self._body_since = now
            self._wake_by(now + self.body_timeout)

    def _stop(self, status: int, text: str) -> None:
        """Read no more of this connection; answer ``status`` and close (after the answers
        already under way, if any)."""
        self._stopped = True
        self._cancel_timer()
        current = self._current
        if current is not None and current is self._active and not current.complete:
            current.refuse(status, text)  # its body can never be whole now: answer it so
            return
        if self._active is None:
            close_with(self.transport, status, text)
            return
        self.flow.pause_reading()
        last = self._queued[-1] if self._queued else self._active
        last.keep_alive = False

    # -- the timer -----------------------------------------------------------------------------
    # uvicorn arms a keep-alive timer after every response and cancels it on the next request:
    # two heap operations per request. Here one timer per connection, due at the earliest
    # deadline known when it was armed, looks at the timestamps when it fires, and acts or
    # re-arms for the deadline they give then; a request that comes and goes in the meantime
    # only notes the time (or not even that).

    def _wake_by(self, due: float) -> None:
        if due < self._timer_due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(due, self._on_timer)
            self._timer_due = due

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_due = _NEVER

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_due = _NEVER
        if self._stopped or self.transport.is_closing():
            return
        now = self.loop.time()
        if self._head_since is not None:
            due = self._head_since + self.header_timeout
            if now >= due:
                if self._begun:
                    self._stop(408, "Request header timed out")
                else:  # nothing came: nobody to tell
                    self._stopped = True
                    self._drop()
                return
        elif self._body_pending and self._body_since is not None:
            if self.flow.read_paused:  # held back by this side (credit, pipelining)
                due = now + self.body_timeout
            else:
                due = self._body_since + self.body_timeout
                if now >= due:
                    self._body_timed_out()
                    return
        elif self._wait_since is not None:
            due = self._wait_since + self.keep_alive_timeout
            if now >= due:
                self._drop()
                return
        else:
            return  # answering: exchange_done arms it again
        self._wake_by(due)

    def _body_timed_out(self) -> None:
        ex = self._current
        if ex is not None and ex.started and not ex.complete:
            ex.refuse(408, "Request body timed out")  # (cancels it if it had left already)
        self._stopped = True
        self._cancel_timer()
        if not self.transport.is_closing():
            self.transport.close()  # answered already: just end it

    # -- the number of connections -------------------------------------------------------------

    def _make_room(self) -> None:
        """More connections than allowed: close those idle longest, this new one excepted, or
        refuse this one when none is idle (or, TLS, in its handshake). A batch of them, so the
        connections that come next find room without this scan."""
        live = [c for c in self.connections if not c.transport.is_closing()]
        handshaking = self.handshaking
        excess = len(live) + len(handshaking) - self.max_connections
        if excess <= 0:
            return
        idle = [(c._free_since, c) for c in live if type(c) is type(self) and c._active is None]
        idle += [(opened, c) for c, opened in handshaking.items()]
        idle = [pair for pair in idle if pair[1] is not self]
        if not idle:
            if self in handshaking:
                return  # (it is checked again once through its handshake, and told then)
            logger.warning("%d connections open and none idle: refusing a new one", len(live))
            self._stop(503, "Too many connections, try again")
            return
        count = min(len(idle), max(excess, self.max_connections // 64))
        for _, conn in heapq.nsmallest(count, idle, key=lambda pair: pair[0]):
            conn._stopped = True
            conn._drop()

    def _drop(self) -> None:  # (it has nothing on its way to the client)
        self.transport.close()

    # -- the connection's end ------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        for ex in (self._active, *self._queued):
            if ex is not None:
                ex.abandon()
        self._active = self._current = None
        self._queued.clear()
        self._cancel_timer()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """The server stops: close idle connections now, busy ones after their answer."""
        if self._active is None:
            self.transport.close()
            return
        for ex in (self._active, *self._queued):
            ex.keep_alive = False


def _describe(exc: BaseException) -> str:
    # A user's exception reaches the proxy as itself: its __str__ may raise.
    return f"{type(exc).__name__}: {safe_str(exc)}"


def _head_size(url: bytes, headers: Headers) -> int:
    """About the size of a parsed request head (the method and version are left out)."""
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


def requests_in_flight(connections: Iterable[object]) -> int:
    """Requests on ``connections`` sent to an app and not answered yet (the pipelined ones
    waiting their turn are not begun): counted when asked, at no cost per request."""
    count = 0
    for conn in connections:
        if isinstance(conn, ProxyHttpProtocol):
            ex = conn._active
            if ex is not None and ex.app and not ex.complete:
                count += 1
    return count


def protocol_for(proxy: ProxyApp, max_connections: int) -> type[ProxyHttpProtocol]:
    """The protocol class uvicorn instantiates per connection, bound to ``proxy`` and its
    limits (``tls.https_protocol`` makes its TLS variant)."""
    options = proxy.options
    limits = {
        "proxy": proxy,
        "max_connections": max_connections,
        "max_head": options.max_request_header_bytes,
        "max_body": options.max_request_body_bytes,
        "window": options.request_body_window_bytes,
        "header_timeout": options.request_header_timeout_s,
        "body_timeout": options.request_body_timeout_s,
        "keep_alive_timeout": options.keep_alive_timeout_s,
    }
    return type("ServalHttpProtocol", (ProxyHttpProtocol,), limits)


def unquote_path(raw_path: bytes) -> str:
    path = raw_path.decode("ascii")
    return urllib.parse.unquote(path) if "%" in path else path
