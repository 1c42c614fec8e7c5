"""Streams are flow-controlled: a generator runs at most about a window (1 MiB) ahead of what
its caller has taken, through handles and over HTTP; a stream its caller cancels or drops stops
the generator; and a stream's items always arrive before its end, whatever else finishes."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
import time
from typing import Any

import httpx
import pytest

import serval as serve
from conftest import poll
from serval.exceptions import RequestCancelledError

MB = 1 << 20
ITEMS = 64  # of 1 MB each: far more than the window


@serve.deployment(max_ongoing_requests=8)
class Producer:
    def __init__(self) -> None:
        self.produced: dict[str, int] = {}
        self.closed: set[str] = set()

    def sync_items(self, key: str) -> Any:
        try:
            for i in range(ITEMS):
                self.produced[key] = i + 1
                yield bytes([i % 256]) * MB
        finally:
            self.closed.add(key)

    async def async_items(self, key: str) -> Any:
        try:
            for i in range(ITEMS):
                self.produced[key] = i + 1
                yield bytes([i % 256]) * MB
        finally:
            self.closed.add(key)

    def progress(self, key: str) -> tuple[int, bool]:
        return self.produced.get(key, 0), key in self.closed

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import StreamingResponse

        key = request.query_params["key"]
        return StreamingResponse(self.async_items(key))


def _ahead(handle: Any, key: str) -> int:
    """How many items the generator has produced, once it has stopped producing."""
    last, steady_since = -1, time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        produced, _ = handle.progress.remote(key).result(timeout_s=10)
        if produced != last:
            last, steady_since = produced, time.monotonic()
        elif time.monotonic() - steady_since > 0.5:
            return produced
        time.sleep(0.05)
    return last


@pytest.fixture
def producer(apps: None) -> Any:
    return serve.run(Producer.bind(), name="flow", route_prefix="/flow")


@pytest.mark.parametrize("method", ["sync_items", "async_items"])
def test_a_handle_stream_runs_a_window_ahead_of_its_reader(producer: Any, method: str) -> None:
    stream = getattr(producer.options(stream=True), method).remote(method)
    first = next(stream)
    assert first == bytes([0]) * MB
    # Without flow control the generator runs to the end (64 MB waiting at the caller).
    assert _ahead(producer, method) <= 4
    rest = list(stream)
    assert [item[0] for item in rest] == [i % 256 for i in range(1, ITEMS)]
    assert producer.progress.remote(method).result(timeout_s=10) == (ITEMS, True)


def test_an_async_reader_is_flow_controlled_too(producer: Any) -> None:
    async def read() -> list[int]:
        stream = producer.options(stream=True).async_items.remote("async reader")
        got = [(await stream.__anext__())[0]]
        await asyncio.sleep(1)
        produced, _ = await producer.progress.remote("async reader")
        assert produced <= 4
        async for item in stream:
            got.append(item[0])
        return got

    assert asyncio.run(read()) == [i % 256 for i in range(ITEMS)]


@pytest.mark.parametrize("method", ["sync_items", "async_items"])
def test_cancelling_a_held_back_stream_stops_its_generator(producer: Any, method: str) -> None:
    key = f"cancel {method}"
    stream = getattr(producer.options(stream=True), method).remote(key)
    next(stream)
    poll(lambda: producer.progress.remote(key).result(timeout_s=10)[0] >= 2, 10, "production")
    stream.cancel()
    poll(lambda: producer.progress.remote(key).result(timeout_s=10)[1], 10, "the generator closed")
    with pytest.raises(RequestCancelledError):
        list(stream)


def test_a_dropped_stream_stops_its_generator(producer: Any) -> None:
    stream = producer.options(stream=True).sync_items.remote("dropped")
    next(stream)
    del stream
    gc.collect()
    poll(
        lambda: producer.progress.remote("dropped").result(timeout_s=10)[1],
        10,
        "the dropped stream's generator to close",
    )


def test_a_slow_http_reader_holds_the_stream_back(producer: Any, cluster_url: str) -> None:
    host, port = cluster_url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /flow?key=http HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        # The client reads nothing more: the socket buffers and a window or two fill up, then
        # the replica is held back (64 MB would be produced without flow control).
        assert _ahead(producer, "http") <= 12
    # The client left: its stream is cancelled, the generator closed.
    poll(lambda: producer.progress.remote("http").result(timeout_s=10)[1], 10, "close")
    with httpx.stream("GET", f"{cluster_url}/flow", params={"key": "whole"}, timeout=30) as r:
        assert sum(len(chunk) for chunk in r.iter_bytes()) == ITEMS * MB


@serve.deployment(max_ongoing_requests=32)
class Busy:
    def items_then_error(self) -> Any:
        yield 1
        yield 2
        yield 3
        raise ValueError("the end")

    def quick(self) -> int:
        return os.getpid()


def test_a_sync_streams_items_arrive_before_its_error_under_load(apps: None) -> None:
    # A sync generator's end is reported through the worker pool's batched completions; with
    # other sync calls finishing all the time, one of those batches may already be due on the
    # loop when the generator ends. Its items must still arrive first.
    handle = serve.run(Busy.bind(), name="busy", route_prefix=None)
    stop = threading.Event()

    def background() -> None:
        while not stop.is_set():
            [r.result(timeout_s=10) for r in [handle.quick.remote() for _ in range(16)]]

    threads = [threading.Thread(target=background, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(200):
            got = []
            with pytest.raises(ValueError, match="the end"):
                for item in handle.options(stream=True).items_then_error.remote():
                    got.append(item)
            assert got == [1, 2, 3]
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
