"""HTTP and WebSocket requests inside a replica.

The proxy sends the request's ASGI scope and its body: whole, or (a large upload) the part
that had come, with the rest following as input messages that ``BodyStream`` hands to the app
and credits back to the proxy as the app takes them. The replica answers by running the
deployment's ASGI app (``@serve.ingress``) or calling its ``__call__(request)`` with a Starlette
``Request``. A response that fits in one body message goes back as one reply
``(status, headers, body)``; anything longer (streaming, SSE, websockets) goes back message by
message as it is produced, so the first chunk arrives long before the last. A response that
breaks off after it began streaming ends the call with an error, so the proxy breaks the
connection off too instead of ending the body as if it were whole.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from serval._private.replica import request_context
from serval._private.wire import protocol
from serval._private.wire.asgi import unpack_scope

logger = logging.getLogger(__name__)

Message = dict[str, Any]
Emit = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
ASGIApp = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


class ResponseCollector:
    """The ``send`` of the ASGI app: holds back a response that completes in one message."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._start: Message | None = None
        self.streaming = False
        self.complete: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        self.started = False
        # The client has (or will have) its whole answer: the last body message was sent, or
        # the websocket began. An error after that cannot change the answer; one before can.
        self.answered = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            check_response_start(message)
            self._start = message
            self.started = True
            return
        if kind == "http.response.body":
            if not message.get("more_body", False):
                self.answered = True
            if not self.streaming and self._start is not None:
                if self.answered:
                    start = self._start
                    self.complete = (
                        start["status"],
                        list(start.get("headers", [])),
                        bytes(message.get("body", b"")),
                    )
                    return
                self.streaming = True
                await self._emit(_plain(self._start))
        elif kind.startswith("websocket."):
            self.started = self.answered = True
        await self._emit(_plain(message))

    def outcome(self) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """The whole response, or None if it was streamed."""
        if self.complete is not None:
            return self.complete
        if not self.started:
            raise RuntimeError("the ASGI app returned without sending a response")
        if not self.answered:
            raise RuntimeError("the ASGI app returned without completing its response")
        return None


class BodyStream:
    """``receive`` for a request whose body streams in after it: first the part that came
    with the request, then the input messages that ``inputs`` collects. Each part the app
    takes is credited to the proxy (``credit``), which sends more as credit allows: so at most
    about a window of the body waits here, whatever its size."""

    __slots__ = ("_credit", "_ended", "_first", "_inputs")

    def __init__(
        self, first: bytes, inputs: asyncio.Queue[Message], credit: Callable[[int], None]
    ) -> None:
        self._first: bytes | None = first
        self._inputs = inputs
        self._credit = credit
        self._ended = False

    async def receive(self) -> Message:
        first = self._first
        if first is not None:
            self._first = None
            self._credit(len(first))
            return {"type": "http.request", "body": first, "more_body": True}
        if self._ended:  # as http_receive: the client leaving cancels the request instead
            await asyncio.Event().wait()
        message = await self._inputs.get()
        if not message.get("more_body", False):
            self._ended = True
        size = len(message.get("body", b""))
        if size:
            self._credit(size)
        return message

    async def read_all(self) -> bytes:
        parts = []
        while True:
            message = await self.receive()
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(parts)


# RFC 9110 §5.1: a field name is a token; §5.5: a value holds no control character but HTAB.
# The proxy writes the head as the app gave it, so a CR or LF here would split the response.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE_CHAR = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def check_response_start(message: Message) -> None:
    """Refuse a response head the proxy must not write: a status that is not a final one
    (200-599; 1xx are interim, and anything else is no status), or a header whose name is
    not a token or whose value holds a control character (response splitting)."""
    status = message.get("status")
    if type(status) is not int or not 200 <= status <= 599:
        raise ValueError(f"invalid HTTP response status {status!r}: a final status is 200-599")
    for name, value in message.get("headers", ()):
        if not isinstance(name, (bytes, bytearray)) or not isinstance(value, (bytes, bytearray)):
            raise TypeError(f"HTTP response header {name!r}: names and values must be bytes")
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"invalid HTTP response header name {bytes(name)!r}")
        if _BAD_VALUE_CHAR.search(value):
            raise ValueError(f"invalid value of HTTP response header {bytes(name)!r}")


def _plain(message: Message) -> Message:
    """ASGI messages may hold bytearrays or header tuples; keep them picklable and small."""
    out = dict(message)
    if "headers" in out:
        out["headers"] = [(bytes(k), bytes(v)) for k, v in out["headers"]]
    return out


def http_receive(body: bytes) -> Callable[[], Awaitable[Message]]:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        # The body is all there was; the next event would be the client leaving, which the
        # replica learns as cancellation instead.
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return receive


async def respond(
    call: Callable[[Any], Any],
    asgi_app: ASGIApp | None,
    scope: Message,
    body: bytes,
    receive: Receive | None,
    collector: ResponseCollector,
    call_user: Callable[..., Awaitable[Any]],
) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """Serve one request; returns the whole response, or None if it was streamed.
    ``receive``: a websocket's events, or a streamed body's; None when ``body`` is whole."""
    if scope["type"] == "websocket":
        assert receive is not None
        if asgi_app is None:
            raise TypeError("websockets need a FastAPI app (@serve.ingress)")
        await asgi_app(scope, receive, collector.send)
        return None
    whole = receive is None
    if receive is None:
        receive = http_receive(body)
    if asgi_app is not None:
        await asgi_app(scope, receive, collector.send)
    else:
        from starlette.requests import Request

        request = Request(scope, receive)
        if whole:
            request._body = body  # so sync __call__ methods can read it too
        result = await call_user(call, request)
        plain = plain_response(result)
        if plain is not None:
            return plain
        await to_response(result)(scope, receive, collector.send)
    return collector.outcome()


class Unfinished:
    """What a sync ``__call__`` returned that is not a plain response: finished on the loop."""

    __slots__ = ("body", "meta", "result", "scope")

    def __init__(self, result: Any, scope: Message, body: bytes, meta: Message) -> None:
        self.result = result
        self.scope = scope
        self.body = body
        self.meta = meta

    async def finish(
        self, collector: ResponseCollector
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        await to_response(self.result)(self.scope, http_receive(self.body), collector.send)
        return collector.outcome()


def serve_http_sync(
    call: Callable[[Any], Any], wire: tuple[Any, ...], body: bytes, meta: Message
) -> tuple[int, list[tuple[bytes, bytes]], bytes] | Unfinished:
    """An HTTP request to a sync ``__call__(request)``, on a worker thread from start to end
    (no task on the loop): the common results come back finished."""
    from starlette.requests import Request

    request_context.set_request(meta)
    scope = unpack_scope(wire)
    request = Request(scope, http_receive(body))
    request._body = body
    result = call(request)
    plain = plain_response(result)
    return plain if plain is not None else Unfinished(result, scope, body, meta)


_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
_JSON = [(b"content-type", b"application/json")]
_OCTETS = [(b"content-type", b"application/octet-stream")]


def plain_response(result: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """The common results as a finished response, without building a Starlette Response:
    the same bytes and headers ``to_response`` would give, for a fraction of the work."""
    kind = type(result)
    if kind is str:
        return 200, list(_TEXT), result.encode()
    if kind is bytes:
        return 200, list(_OCTETS), result
    if kind is dict or kind is list:
        try:
            body = json.dumps(
                result, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
            )
        except (TypeError, ValueError):
            return None  # to_response decides what to do with it
        return 200, list(_JSON), body.encode()
    return None


def to_response(result: Any) -> Any:
    """Ray Serve's conversions: Response as is; str as text, bytes as bytes; anything else as
    JSON (through FastAPI's ``jsonable_encoder`` when ``json`` alone cannot); a value neither
    can encode is a 500, its reason logged."""
    from starlette.responses import JSONResponse, PlainTextResponse, Response

    if isinstance(result, Response):
        return result
    if isinstance(result, (bytes, bytearray, memoryview)):
        return Response(bytes(result), media_type="application/octet-stream")
    if isinstance(result, str):
        return PlainTextResponse(result)
    if result is None:
        return Response(b"", status_code=200)
    try:
        return JSONResponse(result)
    except (TypeError, ValueError):
        pass
    try:
        # As Ray Serve: whatever FastAPI's encoder takes (a Mapping such as query_params, a
        # pydantic model, a dataclass, a set, an object's attributes) is JSON too.
        from fastapi.encoders import jsonable_encoder

        return JSONResponse(jsonable_encoder(result))
    except (TypeError, ValueError) as exc:
        # Not the client's doing, and no text of it is the answer: a 500, the reason logged.
        meta = request_context.current_request() or {}
        logger.error(
            "request %s: the response %s is not JSON-serialisable: %s: %s",
            meta.get("request_id", "?"),
            protocol.describe(result),
            type(exc).__name__,
            exc,  # (json's own error: its text is safe to take)
        )
        return PlainTextResponse("Internal Server Error", status_code=500)
