"""HTTP/1.1 on the wire, as clients other than httpx speak it: keep-alive, pipelining (answers
in request order), HEAD, HTTP/1.0 and ``Connection: close``, ``Expect: 100-continue``, bodyless
statuses, chunked responses and unsafe request ids. Raw sockets, so nothing smooths it over."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import pytest
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

import serval as serve
from serval import HTTPOptions
from test_http_errors import own_cluster


@serve.deployment(max_ongoing_requests=100)
class Echo:
    async def __call__(self, request: Request) -> Any:
        delay = float(request.query_params.get("sleep", "0"))
        if delay:
            await asyncio.sleep(delay)
        if request.url.path.endswith("/empty"):
            return Response(status_code=204)
        if request.url.path.endswith("/stream"):

            async def parts() -> Any:
                for i in range(3):
                    yield f"part{i};"

            return StreamingResponse(parts(), media_type="text/plain")
        body = await request.body()
        return f"{request.method} {request.url.path} {body.decode()}"


@pytest.fixture
def addr(http_url: str) -> tuple[str, int]:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    parts = urlsplit(http_url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


@contextlib.contextmanager
def connect(addr: tuple[str, int]) -> Iterator[tuple[socket.socket, BinaryIO]]:
    sock = socket.create_connection(addr, timeout=10)
    try:
        yield sock, sock.makefile("rb")
    finally:
        sock.close()


def read_response(f: BinaryIO, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response off the stream: status, headers (lower-case names), body."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only or status in (100, 204, 304):
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(f.readline().strip(), 16):
            body += f.read(size)
            assert f.readline() == b"\r\n"
        assert f.readline() == b"\r\n"
        return status, headers, body
    return status, headers, f.read(int(headers["content-length"]))


def get(path: str, *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: x", *extra, "", ""]
    return "\r\n".join(lines).encode()


def test_keep_alive_serves_many_requests_on_one_connection(addr: tuple[str, int]) -> None:
    with connect(addr) as (sock, f):
        for i in range(5):
            sock.sendall(get(f"/echo/{i}"))
            status, headers, body = read_response(f)
            assert (status, body) == (200, f"GET /echo/{i} ".encode())
            assert headers["content-length"] == str(len(body))
            assert "connection" not in headers


def test_pipelined_requests_are_answered_in_order(addr: tuple[str, int]) -> None:
    with connect(addr) as (sock, f):
        # The first is the slowest: its answer must still come first.
        sock.sendall(get("/echo/a?sleep=0.3") + get("/echo/b?sleep=0.1") + get("/echo/c"))
        bodies = [read_response(f)[2] for _ in range(3)]
    assert bodies == [b"GET /echo/a ", b"GET /echo/b ", b"GET /echo/c "]


def test_pipelined_post_bodies_stay_with_their_requests(addr: tuple[str, int]) -> None:
    def post(path: str, body: str) -> bytes:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        return (head + body).encode()

    with connect(addr) as (sock, f):
        sock.sendall(post("/echo/1", "one") + post("/echo/2", "two") + get("/nowhere"))
        answers = [read_response(f) for _ in range(3)]
    assert [a[2] for a in answers[:2]] == [b"POST /echo/1 one", b"POST /echo/2 two"]
    assert answers[2][0] == 404


def test_head_has_the_length_but_no_body(addr: tuple[str, int]) -> None:
    with connect(addr) as (sock, f):
        sock.sendall(b"HEAD /echo/x HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = read_response(f, head_only=True)
        assert status == 200
        assert headers["content-length"] == str(len(b"HEAD /echo/x "))
        # No body bytes came: the next answer on the connection starts right away.
        sock.sendall(get("/echo/y"))
        assert read_response(f)[2] == b"GET /echo/y "


def test_http_1_0_and_connection_close_end_the_connection(addr: tuple[str, int]) -> None:
    for request in (
        b"GET /echo/old HTTP/1.0\r\n\r\n",
        get("/echo/old", "Connection: close"),
    ):
        with connect(addr) as (sock, f):
            sock.sendall(request)
            status, headers, body = read_response(f)
            assert (status, body) == (200, b"GET /echo/old ")
            assert headers["connection"] == "close"
            assert f.read() == b""  # the server closed it


def test_expect_100_continue(addr: tuple[str, int]) -> None:
    with connect(addr) as (sock, f):
        sock.sendall(
            b"POST /echo/up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert read_response(f)[0] == 100  # the go-ahead, before any body was sent
        sock.sendall(b"hello")
        assert read_response(f)[:3:2] == (200, b"POST /echo/up hello")


def test_no_content_has_no_body(addr: tuple[str, int]) -> None:
    with connect(addr) as (sock, f):
        sock.sendall(get("/echo/empty") + get("/echo/after"))
        status, headers, _ = read_response(f)
        assert status == 204 and "content-length" not in headers
        assert read_response(f)[2] == b"GET /echo/after "


def test_streamed_response_is_chunked_and_the_connection_lives_on(addr: tuple[str, int]) -> None:
    with connect(addr) as (sock, f):
        sock.sendall(get("/echo/stream"))
        status, headers, body = read_response(f)
        assert (status, body) == (200, b"part0;part1;part2;")
        assert headers["transfer-encoding"] == "chunked"
        assert headers["x-request-id"]
        sock.sendall(get("/echo/next"))
        assert read_response(f)[2] == b"GET /echo/next "


def test_unsafe_request_id_is_replaced_not_echoed(addr: tuple[str, int]) -> None:
    with connect(addr) as (sock, f):
        sock.sendall(get("/echo/x", "X-Request-Id: has space"))
        _, headers, _ = read_response(f)
        assert headers["x-request-id"] and headers["x-request-id"] != "has space"
        sock.sendall(get("/echo/x", "X-Request-Id: good-id-1"))
        assert read_response(f)[1]["x-request-id"] == "good-id-1"


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    assert HTTPOptions().keep_alive_timeout_s == 90  # Ray Serve's default
    with own_cluster(keep_alive_timeout_s=2) as url:
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        with connect((parts.hostname, parts.port)) as (sock, f):
            sock.sendall(get("/echo/a"))
            read_response(f)
            time.sleep(1.2)  # idle, but not long enough: still served
            sock.sendall(get("/echo/b"))
            assert read_response(f)[2] == b"GET /echo/b "
            answered = time.monotonic()
            assert f.read() == b""  # blocks until the server closes it (socket timeout: 10 s)
            assert 1.8 < time.monotonic() - answered < 4
