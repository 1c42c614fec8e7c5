"""The proxy's own answers and the bytes every answer starts with: status lines made once,
which statuses carry a body, a text reply, and a last answer that closes the connection."""

from __future__ import annotations

import asyncio
import http

__all__ = [
    "CONTINUE",
    "STATUS_LINES",
    "WITH_BODY",
    "Headers",
    "Reply",
    "close_with",
    "status_line",
    "text_reply",
]

Headers = list[tuple[bytes, bytes]]
Reply = tuple[int, Headers, bytes]

_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


STATUS_LINES = {status: status_line(status) for status in range(100, 600)}


# The statuses whose responses carry a body (not 1xx, 204, 304), for a set lookup.
WITH_BODY = frozenset(s for s in range(200, 600) if s not in (204, 304))


def text_reply(status: int, text: str) -> Reply:
    return status, list(_TEXT), text.encode()


def close_with(transport: asyncio.BaseTransport, status: int, text: str) -> None:
    """Write a whole text response that ends the connection, and close it."""
    body = text.encode()
    transport.write(  # type: ignore[attr-defined]
        b"".join(
            (
                STATUS_LINES[status],
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body),
                body,
            )
        )
    )
    transport.close()
