"""The ServeHandle guide's handles: Deployment.get_handle(sync=True|False), ObjectRef,
serve.get and serve.wait."""

from __future__ import annotations

import asyncio
import time

import pytest

import serval as serve


@serve.deployment
class Model:
    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def __call__(self, x: int) -> int:
        return x + 1

    def double(self, x: int) -> int:
        return 2 * x

    def which(self) -> str:
        return self.tag

    async def slow(self, seconds: float, value: int) -> int:
        await asyncio.sleep(seconds)
        return value


@serve.deployment
class Caller:
    """Uses the legacy ``Model.get_handle()`` from inside a replica."""

    def __init__(self, model=None) -> None:
        pass

    def sync_which(self) -> str:
        return serve.get(Model.get_handle().which.remote(), timeout=10)

    async def async_which(self) -> str:
        handle = Model.get_handle(sync=False)
        ref = await handle.which.remote()
        return await ref

    def sync_chain(self, x: int) -> int:
        h = Model.get_handle()
        return serve.get(h.double.remote(h.remote(x)), timeout=10)


def test_sync_handle_remote_returns_object_ref(apps: None) -> None:
    serve.run(Model.bind())
    handle = Model.get_handle()
    assert isinstance(handle, serve.RayServeSyncHandle)
    ref = handle.remote(1)
    assert isinstance(ref, serve.ObjectRef)
    assert serve.get(ref) == 2
    assert serve.get(handle.double.remote(4)) == 8
    assert serve.get(handle.options(method_name="double").remote(5)) == 10


def test_get_list_keeps_order(apps: None) -> None:
    serve.run(Model.bind())
    handle = Model.get_handle()
    refs = [handle.slow.remote(0.3 - i * 0.05, i) for i in range(5)]
    assert serve.get(refs) == [0, 1, 2, 3, 4]
    assert serve.get([]) == []


def test_wait_splits_ready_and_not_ready(apps: None) -> None:
    serve.run(Model.bind())
    handle = Model.get_handle()
    slow = handle.slow.remote(1.5, 1)
    fast = handle.remote(1)
    start = time.monotonic()
    ready, not_ready = serve.wait([slow, fast], num_returns=1, timeout=5)
    assert time.monotonic() - start < 2
    assert ready == [fast]
    assert not_ready == [slow]
    assert serve.get(ready[0]) == 2


def test_wait_timeout_returns_promptly(apps: None) -> None:
    serve.run(Model.bind())
    handle = Model.get_handle()
    slow = [handle.slow.remote(1.5, i) for i in range(2)]
    start = time.monotonic()
    ready, not_ready = serve.wait(slow, num_returns=1, timeout=0.2)
    assert time.monotonic() - start < 2
    assert ready == []
    assert not_ready == slow


def test_wait_all(apps: None) -> None:
    serve.run(Model.bind())
    handle = Model.get_handle()
    refs = [handle.slow.remote(0.05 * i, i) for i in range(4)]
    ready, not_ready = serve.wait(refs, num_returns=4, timeout=10)
    assert ready == refs
    assert not_ready == []
    assert serve.get(ready) == [0, 1, 2, 3]


def test_get_timeout_raises_promptly(apps: None) -> None:
    serve.run(Model.bind())
    ref = Model.get_handle().slow.remote(1.5, 1)
    start = time.monotonic()
    with pytest.raises(serve.exceptions.GetTimeoutError) as info:
        serve.get(ref, timeout=0.2)
    assert time.monotonic() - start < 2
    assert isinstance(info.value, TimeoutError)
    # a list with a timeout too
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        serve.get([Model.get_handle().remote(1), ref], timeout=0.2)
    assert time.monotonic() - start < 2


def test_async_handle(apps: None) -> None:
    serve.run(Model.bind())

    async def main() -> tuple[int, list[int]]:
        handle = Model.get_handle(sync=False)
        assert isinstance(handle, serve.RayServeHandle)
        ref = await handle.remote(10)
        assert isinstance(ref, serve.ObjectRef)
        value = await ref
        refs = [await handle.double.remote(i) for i in range(10)]
        values = await asyncio.gather(*refs)
        return value, list(values)

    value, values = asyncio.run(main())
    assert value == 11
    assert values == [2 * i for i in range(10)]


def test_sync_refs_as_arguments(apps: None) -> None:
    serve.run(Model.bind())
    handle = Model.get_handle()
    ref = handle.remote(1)  # 2
    chained = handle.double.remote(ref)  # 4
    assert serve.get(handle.remote(chained)) == 5


def test_async_refs_and_unawaited_submissions_as_arguments(apps: None) -> None:
    serve.run(Model.bind())

    async def main() -> tuple[int, int]:
        handle = Model.get_handle(sync=False)
        ref = await handle.remote(1)  # 2
        from_ref = await (await handle.double.remote(ref))  # 4
        pending = handle.remote(5)  # not awaited: 6
        from_pending = await (await handle.double.remote(pending))  # 12
        await pending  # awaiting it afterwards is fine too
        return from_ref, from_pending

    assert asyncio.run(main()) == (4, 12)


def test_get_accepts_deployment_response(apps: None) -> None:
    h = serve.run(Model.bind())
    assert serve.get(h.remote(1)) == 2
    assert serve.get([h.remote(1), h.double.remote(3)]) == [2, 6]
    ready, not_ready = serve.wait([h.remote(2)], num_returns=1, timeout=10)
    assert len(ready) == 1 and not_ready == []
    assert serve.get(ready[0]) == 3


def test_legacy_handle_inside_replica_targets_callers_app(apps: None) -> None:
    serve.run(Model.bind("in-a"), name="a", route_prefix="/a")
    b = serve.run(Caller.bind(Model.bind("in-b")), name="b", route_prefix="/b")
    assert b.sync_which.remote().result(timeout_s=10) == "in-b"
    assert b.async_which.remote().result(timeout_s=10) == "in-b"
    assert b.sync_chain.remote(3).result(timeout_s=10) == 8


def test_legacy_handle_user_error(apps: None) -> None:
    serve.run(Model.bind())
    ref = Model.get_handle().remote("not a number")
    with pytest.raises(TypeError):
        serve.get(ref)
