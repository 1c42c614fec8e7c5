"""Errors and limits over HTTP: user exceptions become 500s without a traceback in the body
(it goes to the log with the request id), every response carries ``x-request-id``,
backpressure is a 503, ``request_timeout_s`` a 408/504, a client that goes away cancels the
work in the replica (and the handle calls it made), malformed HTTP and oversize bodies get
4xx while the proxy keeps serving, and large bodies round-trip intact."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

import serval as serve
from conftest import free_port, poll


@contextlib.contextmanager
def own_cluster(log_file: Path | None = None, **http_options) -> Iterator[str]:
    """A cluster with these http_options on a free port (its processes' stderr to
    ``log_file`` if given); yields the base URL and shuts the cluster down after."""
    serve.shutdown()  # none is running in these tests; be sure
    port = free_port()
    saved = None
    if log_file is not None:
        saved = os.dup(2)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        serve.start(http_options={"port": port, **http_options})
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
    try:
        url = f"http://127.0.0.1:{port}"
        # (whether serve.start waits for the proxy is test_http_basic's concern)
        poll(lambda: _healthy(url), timeout=10, what="proxy up", interval=0.02)
        yield url
    finally:
        serve.shutdown()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# -- user exceptions ---------------------------------------------------------------------------

SECRET = "internal-detail-7f3a9c"

fastapi_app = FastAPI()


@serve.deployment
class Faulty:
    async def __call__(self, request: Request) -> str:
        kind = request.query_params.get("kind", "ok")
        if kind == "raise":
            raise ValueError(f"{SECRET} password=hunter2")
        if kind == "raise-sync":
            return await asyncio.to_thread(self.sync_raise)
        return "fine"

    def sync_raise(self) -> str:
        raise RuntimeError(SECRET)


@serve.deployment
class SyncFaulty:
    def __call__(self, request: Request) -> str:
        raise KeyError(SECRET)


@serve.deployment
@serve.ingress(fastapi_app)
class FaultyApi:
    @fastapi_app.get("/boom")
    def boom(self) -> dict:
        raise ZeroDivisionError(SECRET)

    @fastapi_app.get("/stream-boom")
    def stream_boom(self) -> StreamingResponse:
        async def gen():
            raise OSError(SECRET)
            yield b""  # pragma: no cover

        return StreamingResponse(gen())


def _assert_clean_500(r: httpx.Response) -> None:
    assert r.status_code == 500
    assert r.headers.get("x-request-id")
    assert "Traceback" not in r.text
    assert SECRET not in r.text
    assert "hunter2" not in r.text
    assert 'File "' not in r.text


def test_user_exception_is_a_500_without_traceback(http_url: str) -> None:
    serve.run(Faulty.bind(), name="faulty", route_prefix="/faulty")
    serve.run(SyncFaulty.bind(), name="sync", route_prefix="/sync")
    serve.run(FaultyApi.bind(), name="api", route_prefix="/api")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        _assert_clean_500(client.get("/faulty", params={"kind": "raise"}))
        _assert_clean_500(client.get("/faulty", params={"kind": "raise-sync"}))
        _assert_clean_500(client.get("/sync"))
        _assert_clean_500(client.get("/api/boom"))
        _assert_clean_500(client.get("/api/stream-boom"))
        # the replica and the proxy survive
        r = client.get("/faulty")
        assert r.status_code == 200
        assert r.text == "fine"


def test_the_traceback_goes_to_the_log_with_the_request_id(tmp_path: Path) -> None:
    log = tmp_path / "cluster.log"
    with own_cluster(log_file=log) as url:
        serve.run(Faulty.bind(), route_prefix="/faulty")
        r = httpx.get(
            f"{url}/faulty",
            params={"kind": "raise"},
            headers={"x-request-id": "trace-me-123"},
            timeout=10,
        )
        _assert_clean_500(r)
        assert r.headers["x-request-id"] == "trace-me-123"

        def logged() -> bool:
            text = log.read_text(errors="replace")
            return "trace-me-123" in text and SECRET in text and "Traceback" in text

        poll(logged, timeout=5, what="traceback with the request id in the log", interval=0.02)


# -- x-request-id ------------------------------------------------------------------------------


def test_every_response_carries_x_request_id(http_url: str) -> None:
    serve.run(Faulty.bind(), route_prefix="/faulty")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        responses = {
            200: client.get("/faulty"),
            404: client.get("/no/such/app"),
            500: client.get("/faulty", params={"kind": "raise"}),
        }
        ids = set()
        for status, r in responses.items():
            assert r.status_code == status
            assert r.headers.get("x-request-id"), status
            ids.add(r.headers["x-request-id"])
        for path in ("/-/healthz", "/-/routes", "/-/nothing"):
            r = client.get(path)
            assert r.headers.get("x-request-id"), path
            ids.add(r.headers["x-request-id"])
        assert len(ids) == 6, "request ids must be unique"


def test_client_supplied_request_id_is_echoed(http_url: str) -> None:
    serve.run(Faulty.bind(), route_prefix="/faulty")
    with httpx.Client(base_url=http_url, timeout=10) as client:
        for path, status in (
            ("/faulty", 200),
            ("/nope", 404),
            ("/faulty?kind=raise", 500),
            ("/-/healthz", 200),
        ):
            r = client.get(path, headers={"x-request-id": f"client-id-{status}"})
            assert r.status_code == status
            assert r.headers["x-request-id"] == f"client-id-{status}", path
            assert len(r.headers.get_list("x-request-id")) == 1


# -- backpressure ------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Slow:
    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(1.0)
        return "slow done"


def test_backpressure_gives_503(http_url: str) -> None:
    serve.run(Slow.bind(), route_prefix="/slow")

    def call(_: int) -> httpx.Response:
        return httpx.get(f"{http_url}/slow", timeout=10)

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(call, range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1, statuses
    assert statuses.count(200) >= 1, statuses
    assert time.monotonic() - start < 6
    for r in responses:
        assert r.headers.get("x-request-id")
        if r.status_code == 503:
            assert "Traceback" not in r.text
        else:
            assert r.text == "slow done"
    # once the burst is over, requests go through again
    assert httpx.get(f"{http_url}/slow", timeout=10).status_code == 200


# -- request_timeout_s -------------------------------------------------------------------------


@serve.deployment
class Sleepy:
    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(float(request.query_params.get("s", "0")))
        return "awake"


def test_request_timeout_gives_408_or_504_quickly() -> None:
    with own_cluster(request_timeout_s=0.5) as url:
        serve.run(Sleepy.bind(), route_prefix="/sleepy")
        with httpx.Client(base_url=url, timeout=10) as client:
            start = time.monotonic()
            r = client.get("/sleepy", params={"s": 5})
            elapsed = time.monotonic() - start
            assert r.status_code in (408, 504), (r.status_code, r.text)
            assert elapsed < 2.5, f"timed out only after {elapsed:.2f}s"
            assert r.headers.get("x-request-id")
            # a fast request is not affected, and the proxy keeps serving
            r = client.get("/sleepy", params={"s": 0})
            assert r.status_code == 200
            assert r.text == "awake"


# -- client disconnect -------------------------------------------------------------------------


@serve.deployment
class Recorder:
    """Sleeps, and records in a directory when it starts and when it is cancelled."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)

    async def work(self, tag: str) -> str:
        (self.dir / f"{tag}.child-started").touch()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            (self.dir / f"{tag}.child-cancelled").touch()
            raise
        (self.dir / f"{tag}.child-finished").touch()
        return "child done"

    async def __call__(self, request: Request) -> str:
        tag = request.query_params["tag"]
        (self.dir / f"{tag}.started").touch()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            (self.dir / f"{tag}.cancelled").touch()
            raise
        (self.dir / f"{tag}.finished").touch()
        return "done"


@serve.deployment
class Parent:
    def __init__(self, child, directory: str) -> None:
        self.child = child
        self.dir = Path(directory)

    async def __call__(self, request: Request) -> str:
        tag = request.query_params["tag"]
        (self.dir / f"{tag}.started").touch()
        try:
            return await self.child.work.remote(tag)
        except asyncio.CancelledError:
            (self.dir / f"{tag}.cancelled").touch()
            raise


def _go_away(url: str, params: dict, started: Path) -> None:
    """Send a request, and leave once the replica has started on it."""
    with httpx.Client(timeout=10) as client, contextlib.suppress(httpx.ReadTimeout):
        client.get(url, params=params, timeout=httpx.Timeout(10, read=1.0))
    poll(started.exists, timeout=5, what=f"{started.name}", interval=0.02)


def test_client_disconnect_cancels_the_replica_work(http_url: str, tmp_path: Path) -> None:
    serve.run(Recorder.bind(str(tmp_path)), route_prefix="/rec")
    start = time.monotonic()
    _go_away(f"{http_url}/rec", {"tag": "t1"}, tmp_path / "t1.started")
    poll((tmp_path / "t1.cancelled").exists, timeout=4, what="cancellation recorded", interval=0.02)
    assert time.monotonic() - start < 6
    assert not (tmp_path / "t1.finished").exists()
    # the replica serves on
    assert httpx.get(f"{http_url}/-/healthz", timeout=10).status_code == 200


def test_client_disconnect_cancels_the_handle_calls_it_made(http_url: str, tmp_path: Path) -> None:
    serve.run(Parent.bind(Recorder.bind(str(tmp_path)), str(tmp_path)), route_prefix="/parent")
    _go_away(f"{http_url}/parent", {"tag": "t2"}, tmp_path / "t2.child-started")
    poll((tmp_path / "t2.cancelled").exists, timeout=4, what="parent cancellation", interval=0.02)
    poll(
        (tmp_path / "t2.child-cancelled").exists,
        timeout=4,
        what="child cancellation",
        interval=0.02,
    )
    assert not (tmp_path / "t2.child-finished").exists()


@serve.deployment
class EndlessStream:
    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)

    async def __call__(self, request: Request) -> StreamingResponse:
        directory = self.dir

        async def gen():
            try:
                for i in range(1000):
                    yield f"{i}\n"
                    await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                (directory / "stream.cancelled").touch()
                raise
            finally:
                (directory / "stream.closed").touch()

        return StreamingResponse(gen(), media_type="text/plain")


def test_client_leaving_a_stream_stops_the_generator(http_url: str, tmp_path: Path) -> None:
    serve.run(EndlessStream.bind(str(tmp_path)), route_prefix="/endless")
    with httpx.Client(timeout=10) as client:
        with client.stream("GET", f"{http_url}/endless") as r:
            lines = r.iter_lines()
            assert next(lines) == "0"
            assert next(lines) == "1"
        # leaving the block closes the connection mid-stream
    poll((tmp_path / "stream.closed").exists, timeout=4, what="generator closed", interval=0.02)
    assert httpx.get(f"{http_url}/-/healthz", timeout=10).status_code == 200


# -- malformed HTTP ----------------------------------------------------------------------------


def _raw(url: str, payload: bytes, *, half_close: bool = False) -> bytes:
    """Send raw bytes to the proxy; return whatever comes back before it closes (or 3 s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        sock.settimeout(3)
        received = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError, socket.timeout):
            while chunk := sock.recv(65536):
                received += chunk
        return received


@pytest.mark.parametrize(
    "payload",
    [
        b"THIS IS NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # a TLS ClientHello
        b"GET /echo HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nxx\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["garbage", "bad-header", "tls", "bad-content-length", "bad-chunked", "huge-url"],
)
def test_malformed_http_gets_4xx_and_the_proxy_keeps_serving(http_url: str, payload: bytes) -> None:
    serve.run(Echo.bind(), route_prefix="/echo")
    reply = _raw(http_url, payload)
    if reply:
        status_line = reply.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 4"), status_line
    r = httpx.post(f"{http_url}/echo", content=b"still here", timeout=10)
    assert r.status_code == 200
    assert r.content == b"still here"


def test_truncated_body_then_disconnect_leaves_the_proxy_serving(http_url: str) -> None:
    serve.run(Echo.bind(), route_prefix="/echo")
    reply = _raw(
        http_url,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nonly a little",
        half_close=True,
    )
    assert not reply or reply.startswith(b"HTTP/1.1 4")
    r = httpx.post(f"{http_url}/echo", content=b"ok", timeout=10)
    assert r.status_code == 200
    assert r.content == b"ok"


# -- bodies ------------------------------------------------------------------------------------


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")


def test_oversize_body_is_413_and_the_proxy_keeps_serving() -> None:
    with own_cluster(max_request_body_bytes=1024) as url:
        serve.run(Echo.bind(), route_prefix="/echo")
        with httpx.Client(base_url=url, timeout=10) as client:
            r = client.post("/echo", content=b"x" * 10_000)
            assert r.status_code == 413
            assert r.headers.get("x-request-id")

            # without a content-length (chunked), the limit holds too
            def chunks():
                for _ in range(10):
                    yield b"y" * 1000

            r = client.post("/echo", content=chunks())
            assert r.status_code == 413

            r = client.post("/echo", content=b"z" * 1024)  # exactly the limit
            assert r.status_code == 200
            assert r.content == b"z" * 1024
        # a new connection works too
        assert httpx.post(f"{url}/echo", content=b"small", timeout=10).content == b"small"


def test_a_20_mb_body_round_trips_intact(http_url: str) -> None:
    serve.run(Echo.bind(), route_prefix="/echo")
    body = os.urandom(20 * 1024 * 1024)
    start = time.monotonic()
    r = httpx.post(f"{http_url}/echo", content=body, timeout=30)
    elapsed = time.monotonic() - start
    assert r.status_code == 200
    assert len(r.content) == len(body)
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(body).digest()
    assert elapsed < 8, f"20 MB echo took {elapsed:.1f}s"


def test_a_large_chunked_body_round_trips_intact(http_url: str) -> None:
    serve.run(Echo.bind(), route_prefix="/echo")
    parts = [os.urandom(1024 * 1024) for _ in range(12)]
    r = httpx.post(f"{http_url}/echo", content=iter(parts), timeout=30)
    assert r.status_code == 200
    assert r.content == b"".join(parts)
