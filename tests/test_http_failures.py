"""Failures that must show as failures over HTTP: a streamed response that breaks off mid-way
breaks the connection off (no last chunk), from every kind of app; a response that was whole
stays whole even if the app raises after it; a replica that dies mid-request is a 502 (retried
by clients and load balancers, unlike a user error's 500); a returned value that is not
JSON-serialisable is a 500 whose reason is in the replica's log, never a 200 of ``repr()``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

import serval as serve
from conftest import poll
from test_http_errors import own_cluster

SECRET = "mid-stream-secret-4b1d"


async def _breaking(n: int) -> Any:
    for i in range(n):
        yield f"part{i};"
        await asyncio.sleep(0.01)
    raise RuntimeError(SECRET)


def _sync_breaking(n: int) -> Any:
    for i in range(n):
        yield f"sync{i};"
    raise RuntimeError(SECRET)


def _fail_after() -> None:
    raise RuntimeError(SECRET)


class Unfinishing(Response):
    """A response that starts streaming and returns without ending."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"half", "more_body": True})


@serve.deployment
class Streams:
    async def __call__(self, request: Request) -> Any:
        kind = request.url.path.rsplit("/", 1)[-1]
        if kind == "breaks":
            return StreamingResponse(_breaking(3), media_type="text/plain")
        if kind == "unfinished":
            return Unfinishing()
        if kind == "after":  # whole, then a background task that raises
            return PlainTextResponse("whole", background=BackgroundTask(_fail_after))
        return StreamingResponse(_breaking(0), media_type="text/plain")  # breaks at once


@serve.deployment
class SyncStreams:
    def __call__(self, request: Request) -> Any:
        return StreamingResponse(_sync_breaking(2), media_type="text/plain")


api = FastAPI()


@serve.deployment
@serve.ingress(api)
class ApiStreams:
    @api.get("/breaks")
    def breaks(self) -> StreamingResponse:
        return StreamingResponse(_breaking(2), media_type="text/plain")


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The module's cluster (a later test's own cluster ends it: those come last)."""
    with own_cluster() as base:
        serve.run(Streams.bind(), name="streams", route_prefix="/streams")
        serve.run(SyncStreams.bind(), name="sync", route_prefix="/sync")
        serve.run(ApiStreams.bind(), name="api", route_prefix="/api")
        yield base


def _get_raw(url: str, path: str) -> bytes:
    """Everything the proxy sends for ``GET path`` until it closes the connection (it must,
    when the response breaks off: the test would time out otherwise)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        return received


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        ("/streams/breaks", [b"part0;", b"part1;", b"part2;"]),
        ("/sync/x", [b"sync0;", b"sync1;"]),
        ("/api/breaks", [b"part0;", b"part1;"]),
        ("/streams/unfinished", [b"half"]),
    ],
)
def test_a_stream_that_breaks_off_breaks_the_connection(
    url: str, path: str, sent: list[bytes]
) -> None:
    reply = _get_raw(url, path)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head, head
    for part in sent:  # what was produced before the error arrived...
        assert b"%x\r\n%s\r\n" % (len(part), part) in body
    assert not body.endswith(b"0\r\n\r\n"), body  # ...but never the last chunk
    assert SECRET.encode() not in reply and b"Traceback" not in reply
    # an HTTP client reports it as the error it is
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{url}{path}", timeout=10)
    assert httpx.get(f"{url}/-/healthz", timeout=10).text == "success"


def test_a_stream_that_breaks_before_its_first_chunk_is_a_500(url: str) -> None:
    r = httpx.get(f"{url}/streams/at-once", timeout=10)
    assert r.status_code == 500
    assert SECRET not in r.text and "Traceback" not in r.text


def test_a_whole_response_stays_whole_when_the_app_raises_after_it(url: str) -> None:
    r = httpx.get(f"{url}/streams/after", timeout=10)
    assert (r.status_code, r.text) == (200, "whole")


# -- a replica's death mid-request ------------------------------------------------------------


@serve.deployment
class Mortal:
    async def __call__(self, request: Request) -> Any:
        kind = request.query_params.get("kind", "")
        if kind == "die":
            os._exit(1)
        if kind == "die-streaming":

            async def parts() -> Any:
                yield "first;"
                await asyncio.sleep(0.2)
                os._exit(1)
                yield "never"  # pragma: no cover

            return StreamingResponse(parts(), media_type="text/plain")
        if kind == "die-reading":
            async for _ in request.stream():
                os._exit(1)
        return f"alive {os.getpid()}"


def test_a_replica_that_dies_mid_request_is_a_502(url: str) -> None:
    serve.run(Mortal.bind(), name="mortal", route_prefix="/mortal")
    try:
        for kind in ("die", "die-reading"):
            content = os.urandom(8 * 1024 * 1024) if kind == "die-reading" else None
            r = httpx.post(f"{url}/mortal", params={"kind": kind}, content=content, timeout=30)
            assert r.status_code == 502, (kind, r.status_code, r.text)
            assert "Traceback" not in r.text
            _wait_alive(url)
        # dying in the middle of a streamed response: too late for a status, the stream breaks
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(f"{url}/mortal", params={"kind": "die-streaming"}, timeout=30)
        _wait_alive(url)
    finally:
        serve.delete("mortal")


def _wait_alive(url: str) -> None:
    def alive() -> bool:
        r = httpx.get(f"{url}/mortal", timeout=10)
        return r.status_code == 200 and r.text.startswith("alive")

    poll(alive, timeout=30, what="a replacement replica", interval=0.2)


# -- values that are not JSON -----------------------------------------------------------------


class Opaque:
    """Not JSON, even to FastAPI's encoder (no attributes to encode: no __dict__)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<Opaque thing-7e2c>"


@serve.deployment
class NotJson:
    async def __call__(self, request: Request) -> Any:
        if request.query_params.get("kind") == "nan":
            return {"value": float("nan")}
        return {"thing": Opaque()}


@serve.deployment
class SyncNotJson:
    def __call__(self, request: Request) -> Any:
        return [Opaque()]


def test_a_value_that_is_not_json_is_a_500_with_the_reason_logged(tmp_path: Path) -> None:
    log = tmp_path / "cluster.log"
    with own_cluster(log_file=log) as base:
        serve.run(NotJson.bind(), name="notjson", route_prefix="/notjson")
        serve.run(SyncNotJson.bind(), name="syncnotjson", route_prefix="/syncnotjson")
        for path, request_id in (
            ("/notjson", "json-1"),
            ("/notjson?kind=nan", "json-2"),
            ("/syncnotjson", "json-3"),
        ):
            r = httpx.get(f"{base}{path}", headers={"x-request-id": request_id}, timeout=10)
            assert r.status_code == 500, (path, r.status_code, r.text)
            assert "Opaque" not in r.text and "thing-7e2c" not in r.text

        def logged() -> bool:
            text = log.read_text(errors="replace")
            return all(
                f"request {rid}: the response" in text and "not JSON-serialisable" in text
                for rid in ("json-1", "json-2", "json-3")
            )

        poll(logged, timeout=5, what="the reasons in the replica's log", interval=0.05)
        assert "<Opaque thing-7e2c>" in log.read_text(errors="replace")
        assert httpx.get(f"{base}/-/healthz", timeout=10).status_code == 200
