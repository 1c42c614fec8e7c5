"""Large values cross processes intact and fast (out-of-band buffers)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import serval as serve

MB = 1024 * 1024


@pytest.fixture(scope="module")
def echo(cluster: None) -> serve.DeploymentHandle:
    """The module's cluster, with an Echo app deployed."""
    return serve.run(Echo.bind(), name="data", route_prefix="/data")


@serve.deployment
class Echo:
    def __call__(self, value):
        return value

    def checksum(self, arr: np.ndarray) -> tuple[float, tuple[int, ...], str]:
        return float(arr.sum()), arr.shape, str(arr.dtype)

    def make(self, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.float64)


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def test_numpy_array_round_trip(echo: serve.DeploymentHandle) -> None:
    arr = np.random.default_rng(0).random(16 * MB // 8)  # 16 MB of float64
    echo.remote(arr[:10]).result(timeout_s=10)  # warm the connection
    out, elapsed = _timed(lambda: echo.remote(arr).result(timeout_s=10))
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert np.array_equal(out, arr)
    assert elapsed < 0.5, f"16 MB numpy round trip took {elapsed:.3f}s"


def test_numpy_array_arrives_intact_in_replica(echo: serve.DeploymentHandle) -> None:
    arr = np.arange(16 * MB // 4, dtype=np.int32).reshape(1024, -1)
    total, shape, dtype = echo.checksum.remote(arr).result(timeout_s=10)
    assert total == float(arr.sum())
    assert shape == arr.shape
    assert dtype == "int32"
    made = echo.make.remote(2 * MB).result(timeout_s=10)
    assert np.array_equal(made, np.arange(2 * MB, dtype=np.float64))


def test_bytes_round_trip(echo: serve.DeploymentHandle) -> None:
    data = np.random.default_rng(1).bytes(16 * MB)
    echo.remote(b"x").result(timeout_s=10)
    out, elapsed = _timed(lambda: echo.remote(data).result(timeout_s=10))
    assert type(out) is bytes
    assert out == data
    assert elapsed < 0.5, f"16 MB bytes round trip took {elapsed:.3f}s"


def test_large_values_async_path(echo: serve.DeploymentHandle) -> None:
    arr = np.ones(16 * MB // 8)
    data = bytes(range(256)) * (16 * MB // 256)

    async def main():
        start = time.perf_counter()
        a, b = await asyncio.gather(echo.remote(arr), echo.remote(data))
        return a, b, time.perf_counter() - start

    a, b, elapsed = asyncio.run(main())
    assert np.array_equal(a, arr)
    assert b == data
    assert elapsed < 1.0, f"two 16 MB round trips took {elapsed:.3f}s"


def test_large_values_through_legacy_handle(echo: serve.DeploymentHandle) -> None:
    data = b"\x00\xff" * (8 * MB)
    modern = serve.get_deployment_handle("Echo", app_name="data")
    assert modern.remote(data).result(timeout_s=10) == data
    legacy = Echo.get_handle()
    assert serve.get(legacy.remote(data), timeout=10) == data


@serve.deployment(max_ongoing_requests=64)
class Shout:
    # Sync: a reply is written by the worker thread itself when the call is the replica's only
    # one and the socket is free, else through the loop; both must keep frames whole.
    def __call__(self, i: int, size: int) -> str:
        return f"{i}:" + "x" * size


def test_many_concurrent_sync_replies_arrive_whole(cluster: None) -> None:
    handle = serve.run(Shout.bind(), name="shout", route_prefix=None)

    async def burst() -> list[str]:
        # Sizes up to just under a frame's join limit, so that many threads' replies fill
        # the socket and some writes come out short or would block.
        sizes = [(i * 7919) % 60_000 for i in range(600)]
        got = await asyncio.gather(*[handle.remote(i, n) for i, n in enumerate(sizes)])
        assert got == [f"{i}:" + "x" * n for i, n in enumerate(sizes)]
        return got

    for _ in range(3):
        asyncio.run(burst())
    # One at a time (the worker thread writes each reply itself), sizes up to 60 KB.
    for i in range(300):
        n = (i * 7919) % 60_000
        assert handle.remote(i, n).result(timeout_s=10) == f"{i}:" + "x" * n


@serve.deployment(num_replicas=2, max_ongoing_requests=3)
class Measure:
    def __call__(self, i: int, blob: bytes) -> tuple[int, int]:
        return i, len(blob)


def test_requests_from_many_threads_arrive_whole(cluster: None) -> None:
    # Blocking callers send their own requests when a replica has room and its connection is
    # free, else hand them to the loop; small and large (loop-only) frames, two replicas, a
    # limit low enough that many wait at the caller: every answer must be the right one.
    handle = serve.run(Measure.bind(), name="measure", route_prefix=None)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for k in range(60):
                i = t * 1000 + k
                n = (i * 7919) % 200_000
                responses = [handle.remote(i, b"x" * n), handle.remote(-i, b"")]
                assert [r.result(timeout_s=20) for r in responses] == [(i, n), (-i, 0)]
        except BaseException as exc:  # the main thread reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
