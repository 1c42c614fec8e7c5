"""Every request ends in an answer, whatever user code does: exceptions whose ``__str__``,
``__repr__`` or ``__reduce__`` raise, ``StopIteration`` from a ``def``, values and stream items
that do not pickle. A caller is never left holding a slot for good: after such calls, and after
a ``result(timeout_s=)`` that expired, the same handle still gets through."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx
import pytest

import serval as serve
from serval.exceptions import (
    BackPressureError,
    GetTimeoutError,
    RequestCancelledError,
    SerializationError,
    UserCodeError,
)


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class StrAndReduceRaise(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __reduce__(self) -> Any:
        raise SystemExit("reduce exits")  # a BaseException from user code, not an Exception


class ReprAndReduceRaise:
    def __repr__(self) -> str:
        raise ValueError("no repr")

    def __reduce__(self) -> Any:
        raise StrRaises()  # and the pickling error's own __str__ raises too


LIMIT = 2  # max_ongoing_requests: more failing calls than this would wedge a leaky caller


@serve.deployment(max_ongoing_requests=LIMIT)
class Misbehaving:
    def str_raises(self) -> None:
        raise StrRaises()

    async def async_str_raises(self) -> None:
        raise StrRaises()

    def nothing_works(self) -> None:
        raise StrAndReduceRaise()

    def stop_iteration(self, value: int) -> None:
        raise StopIteration(value)

    def echo(self, value: Any) -> Any:
        return value

    def bad_return(self) -> Any:
        return ReprAndReduceRaise()

    def pid(self) -> int:
        return os.getpid()

    def items(self, bad_at: int) -> Any:
        for i in range(3):
            yield ReprAndReduceRaise() if i == bad_at else i

    async def async_items(self, bad_at: int) -> Any:
        for i in range(3):
            yield ReprAndReduceRaise() if i == bad_at else i


@pytest.fixture
def handle(apps: None) -> Any:
    return serve.run(Misbehaving.bind(), name="answers", route_prefix=None)


def test_exception_whose_str_raises_reaches_the_caller(handle: Any) -> None:
    pid = handle.pid.remote().result(timeout_s=10)
    for method in ("str_raises", "async_str_raises"):
        for _ in range(LIMIT + 2):
            with pytest.raises(StrRaises):
                getattr(handle, method).remote().result(timeout_s=10)
    assert handle.echo.remote("still here").result(timeout_s=10) == "still here"
    assert handle.pid.remote().result(timeout_s=10) == pid  # the replica survived it all


def test_exception_that_breaks_every_method_is_still_answered(handle: Any) -> None:
    for _ in range(LIMIT + 2):
        with pytest.raises(UserCodeError) as info:
            handle.nothing_works.remote().result(timeout_s=10)
        assert info.value.type_name == "StrAndReduceRaise"
    assert handle.echo.remote(1).result(timeout_s=10) == 1


def test_stop_iteration_from_a_def_reaches_the_caller(handle: Any) -> None:
    # asyncio futures refuse StopIteration; before, the call was never answered.
    for i in range(LIMIT + 2):
        with pytest.raises(StopIteration) as info:
            handle.stop_iteration.remote(i).result(timeout_s=10)
        assert info.value.args == (i,)
    assert handle.echo.remote(2).result(timeout_s=10) == 2


def test_stop_iteration_does_not_lose_the_other_calls_finishing_with_it(handle: Any) -> None:
    # Sync calls that finish together are completed in one loop callback: one bad outcome
    # must not drop the others'.
    for _ in range(5):
        responses = [
            handle.stop_iteration.remote(0) if i % 2 else handle.echo.remote(i) for i in range(6)
        ]
        for i, response in enumerate(responses):
            if i % 2:
                with pytest.raises(StopIteration):
                    response.result(timeout_s=10)
            else:
                assert response.result(timeout_s=10) == i


def test_return_value_whose_repr_and_reduce_raise_is_a_serialization_error(handle: Any) -> None:
    for _ in range(LIMIT + 2):
        with pytest.raises(SerializationError, match=r"return value of Misbehaving\.bad_return"):
            handle.bad_return.remote().result(timeout_s=10)
    assert handle.echo.remote(3).result(timeout_s=10) == 3


def test_argument_whose_reduce_raises_a_base_exception(handle: Any) -> None:
    class Arg:
        def __reduce__(self) -> Any:
            raise KeyboardInterrupt  # must not take down the caller's event loop

    for _ in range(LIMIT + 2):
        with pytest.raises(SerializationError, match=r"argument 0 of Misbehaving\.echo"):
            handle.echo.remote(Arg()).result(timeout_s=10)

    async def from_async() -> None:
        with pytest.raises(SerializationError, match="argument 0"):
            await handle.echo.remote(Arg())
        assert await handle.echo.remote(4) == 4

    asyncio.run(from_async())
    assert handle.echo.remote(5).result(timeout_s=10) == 5


@pytest.mark.parametrize("method", ["items", "async_items"])
def test_unpicklable_stream_item_is_named_after_the_items_before_it(
    handle: Any, method: str
) -> None:
    stream = getattr(handle.options(stream=True), method).remote(1)
    got = []
    with pytest.raises(SerializationError, match=rf"item 1 streamed by Misbehaving\.{method}"):
        for item in stream:
            got.append(item)
    assert got == [0]
    assert handle.echo.remote(6).result(timeout_s=10) == 6


def test_http_requests_after_misbehaving_errors(cluster_url: str) -> None:
    @serve.deployment(max_ongoing_requests=LIMIT)
    class Web:
        def __call__(self, request: Any) -> str:
            if request.query_params.get("bad"):
                raise StrRaises()
            return "fine"

    serve.run(Web.bind(), name="answers_http", route_prefix="/answers")
    with httpx.Client(timeout=10) as client:
        for _ in range(LIMIT + 2):
            r = client.get(f"{cluster_url}/answers", params={"bad": "1"})
            assert r.status_code == 500
            assert "Traceback" not in r.text
        assert client.get(f"{cluster_url}/answers").text == "fine"


# -- a caller that stops waiting frees its slot ---------------------------------------------------


@serve.deployment(max_ongoing_requests=1, max_queued_requests=0)
class Slow:
    """Each call waits until the file it is given exists: the replica's one slot stays busy
    until the test lets go (a request to let go would queue behind the waiting ones)."""

    def wait(self, path: str) -> str:
        with open(f"{path}.runs", "a") as runs:
            runs.write("run\n")
        deadline = time.monotonic() + 30
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "waited"


def test_expired_result_frees_the_callers_slot(apps: None, tmp_path: Any) -> None:
    # max_queued_requests=0: a call that finds no free slot at the caller is refused at once.
    handle = serve.run(Slow.bind(), name="slow", route_prefix=None)
    go = str(tmp_path / "go")
    first = handle.wait.remote(go)
    with pytest.raises(GetTimeoutError):
        first.result(timeout_s=0.3)
    # The caller no longer counts `first` against max_ongoing_requests: this one is sent
    # (the replica itself holds it until its slot is free) instead of being refused.
    second = handle.wait.remote(go)
    with pytest.raises(GetTimeoutError):
        second.result(timeout_s=0.3)
    # Without a timed-out wait in between, the caller's one slot is taken: refused.
    third = handle.wait.remote(go)
    fourth = handle.wait.remote(go)
    with pytest.raises(BackPressureError):
        fourth.result(timeout_s=10)
    open(go, "w").close()
    # Late replies still reach the calls that were given up on.
    assert first.result(timeout_s=10) == "waited"
    assert second.result(timeout_s=10) == "waited"
    assert third.result(timeout_s=10) == "waited"


def test_expired_get_frees_the_legacy_handles_slot(apps: None, tmp_path: Any) -> None:
    serve.run(Slow.bind(), name="slow_legacy", route_prefix=None)
    go = str(tmp_path / "go")
    legacy = Slow.get_handle()
    ref = legacy.wait.remote(go)
    with pytest.raises(GetTimeoutError):
        serve.get(ref, timeout=0.3)
    second = legacy.wait.remote(go)  # assigned to the replica, not refused at the caller
    open(go, "w").close()
    assert serve.get([ref, second], timeout=10) == ["waited", "waited"]


def test_cancelling_a_call_queued_at_the_replica_drops_it(apps: None, tmp_path: Any) -> None:
    handle = serve.run(Slow.bind(), name="slow_cancel", route_prefix=None)
    go, runs = str(tmp_path / "go"), tmp_path / "go.runs"
    first = handle.wait.remote(go)
    with pytest.raises(GetTimeoutError):
        first.result(timeout_s=0.3)
    queued = handle.wait.remote(go)  # sent; it waits in the replica's queue behind `first`
    with pytest.raises(GetTimeoutError):
        queued.result(timeout_s=0.3)
    queued.cancel()
    with pytest.raises(RequestCancelledError):
        queued.result(timeout_s=10)
    open(go, "w").close()
    assert first.result(timeout_s=10) == "waited"
    assert handle.wait.remote(go).result(timeout_s=10) == "waited"
    assert runs.read_text() == "run\nrun\n"  # the cancelled one never ran
