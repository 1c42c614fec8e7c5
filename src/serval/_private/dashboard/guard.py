"""Every request to the dashboard passes here first (an ASGI middleware).

1. Its ``Host`` must be the dashboard's own address (``127.0.0.1:<port>``, ``localhost:<port>``
   or the configured host), and its ``Origin``, when it has one, the dashboard's own origin:
   else 403. A page elsewhere that a browser runs cannot reach the dashboard through a DNS name
   rebound to 127.0.0.1 (its Host is that name), nor send it a request of its own (its Origin
   is its own) — Ray's CVE-2026-27482 was an unauthenticated DELETE reachable that way.
2. It must carry the token: ``Authorization: Bearer <token>`` (API clients), the cookie the
   token URL set (the page), or ``?token=`` on a GET, which sets that cookie (HttpOnly,
   SameSite=Strict) and redirects to the same path without the token, as Jupyter does.
   Else 401, with a short page saying where the URL is. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

__all__ = ["Guard", "allowed_hosts", "cookie_name"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_UNAUTHORIZED_PAGE = """serval dashboard: a token is needed.

Open the URL that `serval start` or `serval run` printed (it ends in ?token=...), or send
`Authorization: Bearer <token>`; the token is in the cluster's runtime directory, in the
file dashboard.token (readable by the cluster's user only).
"""


def cookie_name(port: int) -> str:
    """Cookies are per host, not per port: each dashboard's has its port in its name."""
    return f"serval_dashboard_token_{port}"


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The ``Host`` values that name this dashboard."""
    names = {"127.0.0.1", "localhost"}
    if host not in ("", "0.0.0.0", "::"):
        names.add(f"[{host}]" if ":" in host else host)
    return frozenset(f"{name}:{port}" for name in names)


class Guard:
    def __init__(self, app: ASGIApp, token: str, hosts: frozenset[str], port: int) -> None:
        self.app = app
        self._token = token.encode()
        self._hosts = hosts
        self._origins = frozenset(f"http://{h}" for h in hosts)
        self._cookie = cookie_name(port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # (lifespan; the dashboard serves no websockets)
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if headers.get("host", "") not in self._hosts:
            await _answer(send, 403, "this dashboard answers only to its own address (Host)")
            return
        origin = headers.get("origin")
        if origin is not None and origin not in self._origins:
            await _answer(send, 403, "requests from other origins are refused (Origin)")
            return
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        given = query.get("token")
        if given is not None and scope["method"] == "GET" and self._valid(given):
            await self._set_cookie_and_redirect(scope, send, given, query)
            return
        if self._valid(_bearer(headers)) or self._valid(_cookie(headers, self._cookie)):
            await self.app(scope, receive, send)
            return
        wants_page = "text/html" in headers.get("accept", "")
        if wants_page:
            await _answer(send, 401, _UNAUTHORIZED_PAGE, plain=True)
        else:
            await _answer(send, 401, "a valid token is needed (Authorization: Bearer <token>)")

    def _valid(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self._token)

    async def _set_cookie_and_redirect(
        self, scope: Scope, send: Send, token: str, query: dict[str, str]
    ) -> None:
        rest = urlencode({k: v for k, v in query.items() if k != "token"})
        location = scope.get("path", "/") + (f"?{rest}" if rest else "")
        cookie = f"{self._cookie}={token}; Path=/; HttpOnly; SameSite=Strict"
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", location.encode()),
                    (b"set-cookie", cookie.encode()),
                    (b"cache-control", b"no-store"),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        key = name.decode("latin-1").lower()
        if key in out and key in ("host", "origin", "authorization"):
            out[key] = "\0"  # repeated: matches nothing, rather than the first or the last
            continue
        out[key] = value.decode("latin-1")
    return out


def _bearer(headers: dict[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _cookie(headers: dict[str, str], name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value
    return None


async def _answer(send: Send, status: int, text: str, plain: bool = False) -> None:
    if plain:
        body, kind = text.encode(), b"text/plain; charset=utf-8"
    else:
        body, kind = json.dumps({"error": text}).encode(), b"application/json"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
