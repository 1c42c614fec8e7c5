"""Streaming handles: generator methods (sync and async) called with
``handle.options(stream=True)`` give a DeploymentResponseGenerator, iterable with ``for`` and
``async for``, each item arriving as it is produced; misuse is a clear TypeError; an error
mid-stream reaches the consumer after the items before it; an HTTP ingress streams what a
child deployment yields."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import StreamingResponse

import serval as serve
from serval.handle import DeploymentResponseGenerator

N = 5
GAP_S = 0.4  # the generators sleep this long between items
DEADLINE_S = 10.0


@serve.deployment(max_ongoing_requests=10)
class Gen:
    def sync_gen(self, n: int, gap: float) -> Iterator[int]:
        for i in range(n):
            if i:
                time.sleep(gap)
            yield i

    async def async_gen(self, n: int, gap: float) -> AsyncIterator[int]:
        for i in range(n):
            if i:
                await asyncio.sleep(gap)
            yield i

    def sync_gen_fails(self, n: int) -> Iterator[int]:
        yield from range(n)
        raise ValueError(f"sync boom after {n}")

    async def async_gen_fails(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i
            await asyncio.sleep(0.01)
        raise ValueError(f"async boom after {n}")

    def plain(self) -> str:
        return "plain"

    async def endless(self) -> AsyncIterator[int]:
        i = 0
        while True:
            self.produced = i + 1
            yield i
            i += 1
            await asyncio.sleep(0.02)

    def produced_count(self) -> int:
        return getattr(self, "produced", 0)

    def pid(self) -> int:
        return os.getpid()

    async def dicts(self) -> AsyncIterator[dict[str, Any]]:
        for i in range(3):
            yield {"i": i, "payload": b"x" * (i * 100_000)}


def _timed_sync(gen: Any) -> list[tuple[float, Any]]:
    return [(time.monotonic(), item) for item in gen]


async def _timed_async(gen: Any) -> list[tuple[float, Any]]:
    return [(time.monotonic(), item) async for item in gen]


def _check_incremental(start: float, timed: list[tuple[float, Any]]) -> None:
    assert [item for _, item in timed] == list(range(N))
    first, last = timed[0][0], timed[-1][0]
    expected_span = (N - 1) * GAP_S
    assert first - start < expected_span / 2, (
        f"the first item came {first - start:.2f}s after the call: items are not streamed"
    )
    assert last - first > expected_span * 0.7, (
        f"items arrived {last - first:.2f}s apart in all (expected about {expected_span}s): "
        "they were buffered, not streamed"
    )


@pytest.mark.parametrize("method", ["sync_gen", "async_gen"])
def test_sync_iteration_items_arrive_as_produced(serve_instance: Any, method: str) -> None:
    handle = serve.run(Gen.bind())
    start = time.monotonic()
    gen = getattr(handle.options(stream=True), method).remote(N, GAP_S)
    assert isinstance(gen, DeploymentResponseGenerator)
    _check_incremental(start, _timed_sync(gen))


@pytest.mark.parametrize("method", ["sync_gen", "async_gen"])
def test_async_iteration_items_arrive_as_produced(serve_instance: Any, method: str) -> None:
    handle = serve.run(Gen.bind())

    async def main() -> tuple[float, list[tuple[float, Any]]]:
        start = time.monotonic()
        gen = getattr(handle.options(stream=True), method).remote(N, GAP_S)
        assert isinstance(gen, DeploymentResponseGenerator)
        return start, await _timed_async(gen)

    start, timed = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    _check_incremental(start, timed)


def test_many_concurrent_streams_each_get_their_own_items(serve_instance: Any) -> None:
    handle = serve.run(Gen.bind())

    async def main() -> list[list[int]]:
        gens = [
            handle.options(stream=True).async_gen.remote(i + 1, 0.01)
            if i % 2
            else handle.options(stream=True).sync_gen.remote(i + 1, 0.01)
            for i in range(10)
        ]

        async def drain(g: Any) -> list[int]:
            return [x async for x in g]

        return await asyncio.gather(*(drain(g) for g in gens))

    results = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    assert results == [list(range(i + 1)) for i in range(10)]


def test_empty_stream_and_large_items(serve_instance: Any) -> None:
    handle = serve.run(Gen.bind())
    assert list(handle.options(stream=True).async_gen.remote(0, 0)) == []
    items = list(handle.options(stream=True).dicts.remote())
    assert [d["i"] for d in items] == [0, 1, 2]
    assert [len(d["payload"]) for d in items] == [0, 100_000, 200_000]


@pytest.mark.parametrize("method", ["sync_gen", "async_gen"])
def test_generator_without_stream_is_a_type_error(serve_instance: Any, method: str) -> None:
    handle = serve.run(Gen.bind())
    with pytest.raises(TypeError, match=r"stream=True"):
        getattr(handle, method).remote(3, 0).result(timeout_s=DEADLINE_S)
    # The replica is fine afterwards.
    assert handle.plain.remote().result(timeout_s=DEADLINE_S) == "plain"


def test_stream_true_on_a_plain_method_is_a_type_error(serve_instance: Any) -> None:
    handle = serve.run(Gen.bind())
    gen = handle.options(stream=True).plain.remote()
    with pytest.raises(TypeError, match="generator"):
        list(gen)


@pytest.mark.parametrize("method", ["sync_gen_fails", "async_gen_fails"])
def test_error_mid_stream_reaches_consumer_after_earlier_items(
    serve_instance: Any, method: str
) -> None:
    handle = serve.run(Gen.bind())
    received: list[int] = []
    with pytest.raises(ValueError, match="boom after 3"):
        for item in getattr(handle.options(stream=True), method).remote(3):
            received.append(item)
    assert received == [0, 1, 2]


def test_error_mid_stream_async_iteration(serve_instance: Any) -> None:
    handle = serve.run(Gen.bind())

    async def main() -> tuple[list[int], BaseException | None]:
        received: list[int] = []
        try:
            async for item in handle.options(stream=True).async_gen_fails.remote(2):
                received.append(item)
        except ValueError as exc:
            return received, exc
        return received, None

    received, exc = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    assert received == [0, 1]
    assert isinstance(exc, ValueError) and "boom after 2" in str(exc)


def test_cancel_stops_the_generator_in_the_replica(serve_instance: Any) -> None:
    handle = serve.run(Gen.bind())
    gen = handle.options(stream=True).endless.remote()
    for item in gen:
        if item == 3:
            break
    gen.cancel()

    def stopped() -> int | None:
        a = handle.produced_count.remote().result(timeout_s=DEADLINE_S)
        time.sleep(0.2)  # ten production periods
        b = handle.produced_count.remote().result(timeout_s=DEADLINE_S)
        return a if a == b else None

    deadline = time.monotonic() + 5
    while (count := stopped()) is None:
        assert time.monotonic() < deadline, "the generator kept running after cancel()"
    assert count < 100


def test_replica_killed_mid_stream_fails_the_consumer_fast(serve_instance: Any) -> None:
    handle = serve.run(Gen.bind())
    pid = handle.pid.remote().result(timeout_s=DEADLINE_S)
    received: list[int] = []
    killed_at = 0.0
    with pytest.raises(serve.exceptions.ReplicaDiedError):
        for item in handle.options(stream=True).async_gen.remote(100, 0.2):
            received.append(item)
            if item == 2:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
    assert time.monotonic() - killed_at < 2.0
    assert received[:3] == [0, 1, 2]


@serve.deployment
class Collector:
    """Consumes a child's stream inside a replica, from an async and from a sync method."""

    def __init__(self, child: Any) -> None:
        self.child = child

    async def collect_async(self, n: int) -> list[int]:
        return [x async for x in self.child.options(stream=True).async_gen.remote(n, 0.01)]

    def collect_sync(self, n: int) -> list[int]:
        return list(self.child.options(stream=True).sync_gen.remote(n, 0.01))


def test_streams_consumed_inside_a_replica(serve_instance: Any) -> None:
    handle = serve.run(Collector.bind(Gen.bind()))
    assert handle.collect_async.remote(4).result(timeout_s=DEADLINE_S) == [0, 1, 2, 3]
    assert handle.collect_sync.remote(4).result(timeout_s=DEADLINE_S) == [0, 1, 2, 3]


@serve.deployment
class StreamingIngress:
    def __init__(self, child: Any) -> None:
        self.child = child

    async def __call__(self, request: Request) -> StreamingResponse:
        n = int(request.query_params.get("n", N))
        method = request.query_params.get("method", "async_gen")
        gen = getattr(self.child.options(stream=True), method).remote(n, GAP_S)

        async def body() -> AsyncIterator[str]:
            async for item in gen:
                yield f"{item}\n"

        return StreamingResponse(body(), media_type="text/plain")


@pytest.mark.parametrize("method", ["sync_gen", "async_gen"])
def test_http_ingress_streams_what_the_child_yields(
    serve_instance: Any, http_url: str, method: str
) -> None:
    serve.run(StreamingIngress.bind(Gen.bind()))
    timed: list[tuple[float, str]] = []
    start = time.monotonic()
    with httpx.stream("GET", f"{http_url}/", params={"method": method}, timeout=DEADLINE_S) as r:
        assert r.status_code == 200
        for chunk in r.iter_text():
            if chunk:
                timed.append((time.monotonic(), chunk))
    text = "".join(c for _, c in timed)
    assert text == "".join(f"{i}\n" for i in range(N))
    first, last = timed[0][0], timed[-1][0]
    expected_span = (N - 1) * GAP_S
    assert first - start < expected_span / 2, f"first chunk after {first - start:.2f}s"
    assert last - first > expected_span * 0.7, f"chunks only {last - first:.2f}s apart"
