"""An HTTP request's ASGI scope as it crosses from the proxy to a replica.

A tuple of the scope's fields in the order of ``FIELDS`` (smaller and faster to pickle than
the dict, whose constant parts the replica fills in itself). This module alone knows the
order: the proxy packs with ``pack_http`` (its own request cycle) or ``pack_scope`` (a
websocket's scope from uvicorn), the replica unpacks with ``unpack_scope``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FIELDS", "WireScope", "pack_http", "pack_scope", "scope_type", "unpack_scope"]

Scope = dict[str, Any]
Headers = list[tuple[bytes, bytes]]
WireScope = tuple[Any, ...]

FIELDS = (
    "root_path",
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


def pack_http(
    root_path: str,
    http_version: str,
    method: str,
    scheme: str | None,
    path: str,
    raw_path: bytes,
    query_string: bytes,
    headers: Headers,
    client: Any,
    server: Any,
) -> WireScope:
    """An HTTP request's scope, from the proxy's parsed request head."""
    return (
        root_path,
        "http",
        http_version,
        method,
        scheme,
        path,
        raw_path,
        query_string,
        headers,
        client,
        server,
        None,
    )


def pack_scope(scope: Scope, root_path: str) -> WireScope:
    """A scope uvicorn built (a websocket's), with the app's ``root_path``."""
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


def scope_type(wire: WireScope) -> str:
    """``"http"`` or ``"websocket"``."""
    kind: str = wire[1]
    return kind


def unpack_scope(wire: WireScope) -> Scope:
    """The ASGI scope dict the replica's app gets."""
    scope: Scope = dict(zip(FIELDS, wire, strict=True))
    scope["asgi"] = dict(_ASGI)
    if scope["subprotocols"] is None:
        del scope["subprotocols"]
    scope["state"] = {}
    return scope
