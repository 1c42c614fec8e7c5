"""Modern handles: DeploymentHandle.remote() -> DeploymentResponse, result/await, method
selection, chaining responses as arguments, and composition inside replicas."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

import serval as serve
from conftest import poll


@serve.deployment
class Calc:
    def __call__(self, x: int) -> int:
        return x + 1

    def double(self, x: int) -> int:
        return 2 * x

    async def adouble(self, x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    async def slow(self, seconds: float, value: int) -> int:
        await asyncio.sleep(seconds)
        return value


def _note(path: str, text: str) -> None:
    Path(path).write_text(text)


@serve.deployment
class Sleeper:
    """Notes, in a file, how a long call ended."""

    async def nap(self, path: str) -> str:
        _note(path, "started")
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            _note(path, "cancelled")
            raise
        return "woke"


@serve.deployment
class Child:
    def __call__(self, x: int) -> int:
        return x * 10

    async def aslow(self, x: int) -> int:
        await asyncio.sleep(0.05)
        return x * 10


@serve.deployment
class Parent:
    def __init__(self, child) -> None:
        self.child = child

    async def via_await(self, x: int) -> int:
        return await self.child.remote(x) + 1

    def via_result(self, x: int) -> int:
        return self.child.remote(x).result(timeout_s=10) + 2

    async def gather(self, n: int) -> list[int]:
        return list(await asyncio.gather(*[self.child.aslow.remote(i) for i in range(n)]))

    async def blocking_result_in_async(self, x: int) -> str:
        try:
            self.child.remote(x).result(timeout_s=5)
        except RuntimeError as exc:
            return f"RuntimeError: {exc}"
        return "no error"

    async def chain_inside(self, x: int) -> int:
        # a response passed as an argument inside a replica
        return await self.child.remote(self.child.remote(x))


def test_remote_returns_deployment_response(apps: None) -> None:
    h = serve.run(Calc.bind())
    response = h.remote(1)
    assert isinstance(response, serve.DeploymentResponse)
    assert response.result(timeout_s=10) == 2
    assert response.result() == 2  # the result can be read again


def test_result_timeout(apps: None) -> None:
    h = serve.run(Calc.bind())
    response = h.slow.remote(1, 7)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        response.result(timeout_s=0.2)
    assert time.monotonic() - start < 2
    # the request keeps running and its value is still delivered
    assert response.result(timeout_s=10) == 7


def test_await_response_in_async_code(apps: None) -> None:
    h = serve.run(Calc.bind())

    async def main() -> tuple[int, list[int]]:
        one = await h.remote(41)
        many = await asyncio.gather(*[h.double.remote(i) for i in range(20)])
        return one, list(many)

    one, many = asyncio.run(main())
    assert one == 42
    assert many == [2 * i for i in range(20)]


def test_method_selection(apps: None) -> None:
    h = serve.run(Calc.bind())
    assert h.double.remote(4).result(timeout_s=10) == 8
    assert h.adouble.remote(5).result(timeout_s=10) == 10
    assert h.options(method_name="double").remote(6).result(timeout_s=10) == 12
    assert h.add.remote(1, b=2).result(timeout_s=10) == 3
    # options() returns a new handle; the original still calls __call__
    assert h.remote(1).result(timeout_s=10) == 2


def test_many_concurrent_sync_results(apps: None) -> None:
    h = serve.run(Calc.bind())
    responses = [h.double.remote(i) for i in range(100)]
    assert [r.result(timeout_s=10) for r in responses] == [2 * i for i in range(100)]


def test_response_passed_as_argument_is_resolved(apps: None) -> None:
    h = serve.run(Calc.bind())
    first = h.double.remote(3)  # 6
    second = h.remote(first)  # 7
    third = h.add.remote(second, b=h.double.remote(10))  # 7 + 20
    assert isinstance(second, serve.DeploymentResponse)
    assert third.result(timeout_s=10) == 27


def test_chaining_does_not_wait_for_slow_argument_before_returning(apps: None) -> None:
    h = serve.run(Calc.bind())
    start = time.monotonic()
    slow = h.slow.remote(0.5, 4)
    chained = h.double.remote(slow)
    assert time.monotonic() - start < 0.3  # remote() returns at once
    assert chained.result(timeout_s=10) == 8


def test_chaining_in_async_code(apps: None) -> None:
    h = serve.run(Calc.bind())

    async def main() -> int:
        return await h.double.remote(h.remote(h.double.remote(1)))

    assert asyncio.run(main()) == 6


def test_composition_async_method_awaits_child(apps: None) -> None:
    h = serve.run(Parent.bind(Child.bind()))
    assert h.via_await.remote(2).result(timeout_s=10) == 21
    assert h.gather.remote(8).result(timeout_s=10) == [i * 10 for i in range(8)]
    assert h.chain_inside.remote(3).result(timeout_s=10) == 300


def test_composition_sync_method_calls_result_on_child(apps: None) -> None:
    h = serve.run(Parent.bind(Child.bind()))
    assert h.via_result.remote(2).result(timeout_s=10) == 22
    # several at once: sync methods blocking on children must not deadlock the replica
    responses = [h.via_result.remote(i) for i in range(5)]
    assert [r.result(timeout_s=10) for r in responses] == [i * 10 + 2 for i in range(5)]


def test_handle_from_get_app_handle_in_async_code(apps: None) -> None:
    serve.run(Calc.bind(), name="calc", route_prefix="/calc")

    async def main() -> int:
        h = serve.get_app_handle("calc")
        return await h.double.remote(21)

    assert asyncio.run(main()) == 42


def test_result_inside_async_method_is_refused(apps: None) -> None:
    # blocking on the replica's own event loop would deadlock it: a clear error instead
    h = serve.run(Parent.bind(Child.bind()))
    out = h.blocking_result_in_async.remote(1).result(timeout_s=10)
    assert out.startswith("RuntimeError"), out
    assert h.via_await.remote(1).result(timeout_s=10) == 11  # the replica is fine


def test_handle_shared_by_threads(apps: None) -> None:
    h = serve.run(Calc.bind())
    results: dict[int, list[int]] = {}

    def worker(t: int) -> None:
        results[t] = [h.double.remote(t * 100 + i).result(timeout_s=10) for i in range(20)]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert results == {t: [2 * (t * 100 + i) for i in range(20)] for t in range(8)}


def test_cancel_a_response_from_sync_code(apps: None, tmp_path: Path) -> None:
    h = serve.run(Sleeper.bind())
    flag = tmp_path / "nap"
    response = h.nap.remote(str(flag))
    poll(flag.exists, timeout=10.0, what="the call to start", interval=0.01)
    response.cancel()
    with pytest.raises(serve.exceptions.RequestCancelledError):
        response.result(timeout_s=10)
    # the replica's coroutine was cancelled too, and the replica still serves
    poll(lambda: flag.read_text() == "cancelled", timeout=10.0, what="the replica to cancel")
    other = tmp_path / "other"
    second = h.nap.remote(str(other))
    poll(other.exists, timeout=10.0, what="a second call to start", interval=0.01)
    second.cancel()
