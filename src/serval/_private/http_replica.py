"""HTTP and WebSocket requests inside a replica.

The proxy sends the request's ASGI scope and its whole body. The replica answers by running the
deployment's ASGI app (``@serve.ingress``) or calling its ``__call__(request)`` with a Starlette
``Request``. A response that fits in one body message goes back as one reply
``(status, headers, body)``; anything longer (streaming, SSE, websockets) goes back message by
message as it is produced, so the first chunk arrives long before the last.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from serval._private import request_context

Message = dict[str, Any]
Emit = Callable[[Message], None]
ASGIApp = Callable[
    [Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


# The ASGI scope crosses to the replica as a tuple of these, in this order: smaller and faster
# to pickle than the dict (whose constant parts the replica fills in itself).
_SCOPE_FIELDS = (
    "type",
    "http_version",
    "method",
    "scheme",
    "path",
    "raw_path",
    "query_string",
    "headers",
    "client",
    "server",
    "subprotocols",
)
_ASGI = {"version": "3.0", "spec_version": "2.3"}


def pack_scope(scope: Message, root_path: str) -> tuple[Any, ...]:
    get = scope.get
    return (
        root_path,
        scope["type"],
        get("http_version"),
        get("method"),
        get("scheme"),
        scope["path"],
        get("raw_path"),
        get("query_string"),
        scope["headers"],
        get("client"),
        get("server"),
        get("subprotocols"),
    )


def unpack_scope(wire: tuple[Any, ...]) -> Message:
    scope: Message = dict(zip(_SCOPE_FIELDS, wire[1:], strict=True))
    scope["root_path"] = wire[0]
    scope["asgi"] = dict(_ASGI)
    if scope["subprotocols"] is None:
        del scope["subprotocols"]
    scope["state"] = {}
    return scope


class ResponseCollector:
    """The ``send`` of the ASGI app: holds back a response that completes in one message."""

    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self._start: Message | None = None
        self.streaming = False
        self.complete: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        self.started = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._start = message
            self.started = True
            return
        if kind == "http.response.body" and not self.streaming and self._start is not None:
            if not message.get("more_body", False):
                start = self._start
                self.complete = (
                    start["status"],
                    list(start.get("headers", [])),
                    bytes(message.get("body", b"")),
                )
                return
            self.streaming = True
            self._emit(_plain(self._start))
        elif kind.startswith("websocket."):
            self.started = True
        self._emit(_plain(message))

    def outcome(self) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """The whole response, or None if it was streamed."""
        if self.complete is not None:
            return self.complete
        if not self.started:
            raise RuntimeError("the ASGI app returned without sending a response")
        return None


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
    user: Any,
    asgi_app: ASGIApp | None,
    scope: Message,
    body: bytes,
    collector: ResponseCollector,
    inputs: asyncio.Queue[Message] | None,
    call_user: Callable[..., Awaitable[Any]],
) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
    """Serve one request; returns the whole response, or None if it was streamed."""
    if scope["type"] == "websocket":
        assert inputs is not None
        if asgi_app is None:
            raise TypeError("websockets need a FastAPI app (@serve.ingress)")
        await asgi_app(scope, inputs.get, collector.send)
        return None
    receive = http_receive(body)
    if asgi_app is not None:
        await asgi_app(scope, receive, collector.send)
    else:
        from starlette.requests import Request

        request = Request(scope, receive)
        request._body = body  # so sync __call__ methods can read it too
        result = await call_user(user.__call__, request)
        plain = plain_response(result)
        if plain is not None:
            return plain
        await to_response(result)(scope, receive, collector.send)
    return collector.outcome()


class Unfinished:
    """What a sync ``__call__`` returned that is not a plain response: finished on the loop."""

    __slots__ = ("body", "result", "scope")

    def __init__(self, result: Any, scope: Message, body: bytes) -> None:
        self.result = result
        self.scope = scope
        self.body = body

    async def finish(
        self, collector: ResponseCollector
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        await to_response(self.result)(self.scope, http_receive(self.body), collector.send)
        return collector.outcome()


def serve_http_sync(
    user: Any, wire: tuple[Any, ...], body: bytes, meta: Message
) -> tuple[int, list[tuple[bytes, bytes]], bytes] | Unfinished:
    """An HTTP request to a sync ``__call__(request)``, on a worker thread from start to end
    (no task on the loop): the common results come back finished."""
    from starlette.requests import Request

    request_context.set_request(meta)
    scope = unpack_scope(wire)
    request = Request(scope, http_receive(body))
    request._body = body
    result = user.__call__(request)
    plain = plain_response(result)
    return plain if plain is not None else Unfinished(result, scope, body)


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
    """Ray Serve's conversions: Response as is; str/bytes as text; anything else as JSON."""
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
        return PlainTextResponse(json.dumps(result, default=str))
