"""Streaming through the proxy: StreamingResponse and server-sent events arrive chunk by chunk
(the first chunk long before the last), from plain ``__call__`` and from FastAPI routes; and
WebSockets through FastAPI routes."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.requests import Request
from starlette.responses import StreamingResponse
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import serval as serve

CHUNKS = 5
GAP_S = 0.3  # the generator sleeps this long between chunks


async def _numbers(prefix: str):
    for i in range(CHUNKS):
        if i:
            await asyncio.sleep(GAP_S)
        yield f"{prefix}{i}\n"


async def _events():
    for i in range(CHUNKS):
        if i:
            await asyncio.sleep(GAP_S)
        yield f"event: tick\ndata: {i}\n\n"


def _sync_numbers():
    for i in range(CHUNKS):
        if i:
            time.sleep(GAP_S)
        yield f"sync{i}\n".encode()


@serve.deployment
class Streamer:
    async def __call__(self, request: Request):
        kind = request.query_params.get("kind", "plain")
        if kind == "sse":
            return StreamingResponse(
                _events(), media_type="text/event-stream", headers={"cache-control": "no-cache"}
            )
        if kind == "sync":
            return StreamingResponse(_sync_numbers(), media_type="text/plain")
        return StreamingResponse(
            _numbers("chunk"), media_type="text/plain", status_code=206, headers={"x-stream": "yes"}
        )


def _timed_chunks(response: httpx.Response, start: float) -> list[tuple[float, bytes]]:
    """(seconds since start, chunk) as each piece of the body arrives."""
    return [(time.monotonic() - start, chunk) for chunk in response.iter_raw() if chunk]


def _assert_incremental(times: list[float]) -> None:
    total_gap = GAP_S * (CHUNKS - 1)
    first, last = times[0], times[-1]
    assert first < total_gap / 2, f"first chunk came only after {first:.2f}s: {times}"
    assert last - first > total_gap * 0.7, f"chunks arrived together: {times}"


@pytest.mark.parametrize("kind", ["plain", "sync"])
def test_streaming_response_arrives_chunk_by_chunk(http_url: str, kind: str) -> None:
    serve.run(Streamer.bind(), route_prefix="/stream")
    httpx.get(f"{http_url}/-/healthz", timeout=10)  # a warm connection pool is not the point
    with httpx.Client(timeout=10) as client:
        start = time.monotonic()
        with client.stream("GET", f"{http_url}/stream", params={"kind": kind}) as r:
            if kind == "plain":
                assert r.status_code == 206
                assert r.headers["x-stream"] == "yes"
            else:
                assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            assert r.headers.get("x-request-id")
            timed = _timed_chunks(r, start)
    body = b"".join(c for _, c in timed).decode()
    prefix = "chunk" if kind == "plain" else "sync"
    assert body == "".join(f"{prefix}{i}\n" for i in range(CHUNKS))
    _assert_incremental([t for t, _ in timed])


def test_server_sent_events_arrive_one_by_one(http_url: str) -> None:
    serve.run(Streamer.bind(), route_prefix="/stream")
    with httpx.Client(timeout=10) as client:
        start = time.monotonic()
        events: list[tuple[float, str]] = []
        with client.stream(
            "GET",
            f"{http_url}/stream",
            params={"kind": "sse"},
            headers={"accept": "text/event-stream"},
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers.get("x-request-id")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic() - start, line[len("data: ") :]))
    assert [data for _, data in events] == [str(i) for i in range(CHUNKS)]
    _assert_incremental([t for t, _ in events])


def test_concurrent_streams_interleave(http_url: str) -> None:
    # Two slow streams at once finish in about the time of one: neither waits for the other.
    serve.run(Streamer.bind(), route_prefix="/stream")
    import concurrent.futures

    def one() -> float:
        start = time.monotonic()
        with httpx.stream("GET", f"{http_url}/stream", timeout=10) as r:
            assert r.status_code == 206
            r.read()
        return time.monotonic() - start

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        durations = list(pool.map(lambda _: one(), range(3)))
    assert max(durations) < 2 * GAP_S * (CHUNKS - 1), durations


# -- FastAPI streaming and websockets ----------------------------------------------------------

app = FastAPI()


@serve.deployment
@serve.ingress(app)
class Live:
    def __init__(self) -> None:
        self.prefix = "fa"

    @app.get("/numbers")
    def numbers(self) -> StreamingResponse:
        return StreamingResponse(_numbers(self.prefix), media_type="text/plain")

    @app.get("/events")
    async def events(self) -> StreamingResponse:
        return StreamingResponse(_events(), media_type="text/event-stream")


ws_app = FastAPI()


@serve.deployment
@serve.ingress(ws_app)
class Sockets:
    """WebSocket routes as methods of the deployment class."""

    def __init__(self) -> None:
        self.prefix = "fa"

    @ws_app.websocket("/ws/echo")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                text = await ws.receive_text()
                await ws.send_text(f"{self.prefix}:{text}")
        except WebSocketDisconnect:
            pass

    @ws_app.websocket("/ws/count")
    async def count(self, ws: WebSocket) -> None:
        await ws.accept()
        n = int(await ws.receive_text())
        for i in range(n):
            await ws.send_json({"i": i})
        await ws.close(code=1000)

    @ws_app.websocket("/ws/bytes")
    async def echo_bytes(self, ws: WebSocket) -> None:
        await ws.accept()
        data = await ws.receive_bytes()
        await ws.send_bytes(data[::-1])
        await ws.close()


# The same routes as plain functions of the app (no ``self``): the transport on its own.
fn_ws_app = FastAPI()


@fn_ws_app.websocket("/ws/echo")
async def fn_echo(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:
            text = await ws.receive_text()
            await ws.send_text(f"fa:{text}")
    except WebSocketDisconnect:
        pass


@fn_ws_app.websocket("/ws/count")
async def fn_count(ws: WebSocket) -> None:
    await ws.accept()
    n = int(await ws.receive_text())
    for i in range(n):
        await ws.send_json({"i": i})
    await ws.close(code=1000)


@fn_ws_app.websocket("/ws/bytes")
async def fn_echo_bytes(ws: WebSocket) -> None:
    await ws.accept()
    data = await ws.receive_bytes()
    await ws.send_bytes(data[::-1])
    await ws.close()


@serve.deployment
@serve.ingress(fn_ws_app)
class FunctionSockets:
    pass


WS_DEPLOYMENTS = pytest.mark.parametrize(
    "deployment", [Sockets, FunctionSockets], ids=["method-routes", "function-routes"]
)


def test_fastapi_streaming_routes(http_url: str) -> None:
    serve.run(Live.bind(), route_prefix="/live")
    with httpx.Client(timeout=10) as client:
        start = time.monotonic()
        with client.stream("GET", f"{http_url}/live/numbers") as r:
            assert r.status_code == 200
            timed = _timed_chunks(r, start)
        assert b"".join(c for _, c in timed).decode() == "".join(f"fa{i}\n" for i in range(CHUNKS))
        _assert_incremental([t for t, _ in timed])

        start = time.monotonic()
        with client.stream("GET", f"{http_url}/live/events") as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            data = [
                (time.monotonic() - start, line)
                for line in r.iter_lines()
                if line.startswith("data: ")
            ]
        assert [line for _, line in data] == [f"data: {i}" for i in range(CHUNKS)]
        _assert_incremental([t for t, _ in data])


@WS_DEPLOYMENTS
def test_websocket_echo(http_url: str, deployment) -> None:
    serve.run(deployment.bind(), route_prefix="/live")
    ws_url = http_url.replace("http://", "ws://")
    with connect(f"{ws_url}/live/ws/echo", open_timeout=10, close_timeout=5) as ws:
        for text in ("hello", "world", "ünïcode", "x" * 100_000):
            ws.send(text)
            assert ws.recv(timeout=10) == f"fa:{text}"
    # the connection closed cleanly and the replica keeps serving
    with connect(f"{ws_url}/live/ws/echo", open_timeout=10) as ws:
        ws.send("again")
        assert ws.recv(timeout=10) == "fa:again"


@WS_DEPLOYMENTS
def test_websocket_server_side_close_and_binary(http_url: str, deployment) -> None:
    serve.run(deployment.bind(), route_prefix="/live")
    ws_url = http_url.replace("http://", "ws://")
    with connect(f"{ws_url}/live/ws/count", open_timeout=10) as ws:
        ws.send("3")
        got = [ws.recv(timeout=10) for _ in range(3)]
        assert got == ['{"i":0}', '{"i":1}', '{"i":2}'] or [g.replace(" ", "") for g in got] == [
            '{"i":0}',
            '{"i":1}',
            '{"i":2}',
        ]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
        assert ws.close_code == 1000
    with connect(f"{ws_url}/live/ws/bytes", open_timeout=10) as ws:
        ws.send(b"\x00\x01\x02abc")
        assert ws.recv(timeout=10) == b"cba\x02\x01\x00"


@WS_DEPLOYMENTS
def test_websocket_concurrent_connections(http_url: str, deployment) -> None:
    serve.run(deployment.bind(), route_prefix="/live")
    ws_url = http_url.replace("http://", "ws://")
    with contextlib.ExitStack() as stack:
        conns = [
            stack.enter_context(connect(f"{ws_url}/live/ws/echo", open_timeout=10))
            for _ in range(4)
        ]
        for round_ in range(3):
            for i, ws in enumerate(conns):
                ws.send(f"{i}-{round_}")
            for i, ws in enumerate(conns):
                assert ws.recv(timeout=10) == f"fa:{i}-{round_}"


@WS_DEPLOYMENTS
def test_websocket_to_unknown_route_is_refused(http_url: str, deployment) -> None:
    serve.run(deployment.bind(), route_prefix="/live")
    ws_url = http_url.replace("http://", "ws://")
    for path in ("/nowhere", "/live/ws/none"):
        with pytest.raises((InvalidStatus, ConnectionClosed)):
            with connect(f"{ws_url}{path}", open_timeout=10) as ws:
                ws.recv(timeout=5)
    # and the proxy still serves
    with connect(f"{ws_url}/live/ws/echo", open_timeout=10) as ws:
        ws.send("ok")
        assert ws.recv(timeout=10) == "fa:ok"
