"""@serve.batch: the queue logic in-process (plain asyncio, plus a property test), then one
end-to-end run through a real cluster."""

from __future__ import annotations

import asyncio
import inspect
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import cloudpickle
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import serval as serve
from serval.batching import batch

T = TypeVar("T")


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Each test on a fresh loop, with a hard ceiling so a bug fails instead of hanging."""

    async def bounded() -> T:
        return await asyncio.wait_for(main(), timeout=10)

    return asyncio.run(bounded())


class Recorder:
    """A batched method that doubles its inputs and records every batch it was given."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.batches: list[list[Any]] = []
        self.running = 0
        self.peak = 0

    async def work(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.running -= 1
        return [x * 2 for x in items]


def batched_recorder(delay: float = 0.0, **options: Any) -> tuple[Recorder, Any]:
    """A Recorder, and its `work` wrapped by @batch with these options."""
    recorder = Recorder(delay)
    return recorder, batch(**options)(recorder.work)


async def later(delay: float, call: Awaitable[T]) -> T:
    await asyncio.sleep(delay)
    return await call


# --- batch formation ------------------------------------------------------------------------


def test_full_batches_go_at_once_without_waiting_for_the_timeout() -> None:
    rec, work = batched_recorder(max_batch_size=4, batch_wait_timeout_s=30)

    async def main() -> list[int]:
        return await asyncio.gather(*(work(i) for i in range(8)))

    start = time.monotonic()
    assert run(main) == [i * 2 for i in range(8)]
    assert time.monotonic() - start < 2
    assert rec.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_timeout_flushes_a_partial_batch() -> None:
    rec, work = batched_recorder(max_batch_size=10, batch_wait_timeout_s=0.05)

    async def main() -> list[int]:
        return await asyncio.gather(*(work(i) for i in range(3)))

    start = time.monotonic()
    assert run(main) == [0, 2, 4]
    elapsed = time.monotonic() - start
    assert 0.045 <= elapsed < 1
    assert rec.batches == [[0, 1, 2]]


def test_timeout_counts_from_the_first_item_of_the_batch() -> None:
    rec, work = batched_recorder(max_batch_size=10, batch_wait_timeout_s=0.1)

    async def main() -> list[int]:
        # Items keep arriving, but the batch still goes 0.1 s after the first one.
        return await asyncio.gather(*(later(0.03 * i, work(i)) for i in range(8)))

    run(main)
    assert rec.batches[0] == [0, 1, 2, 3]
    assert [x for b in rec.batches for x in b] == list(range(8))


def test_sparse_arrivals_run_alone() -> None:
    rec, work = batched_recorder(max_batch_size=8, batch_wait_timeout_s=0.005)

    async def main() -> list[int]:
        return await asyncio.gather(*(later(0.05 * i, work(i)) for i in range(3)))

    assert run(main) == [0, 2, 4]
    assert rec.batches == [[0], [1], [2]]


def test_zero_timeout_batches_what_arrived_in_the_same_tick() -> None:
    rec, work = batched_recorder(max_batch_size=100, batch_wait_timeout_s=0)

    async def main() -> list[int]:
        return await asyncio.gather(*(work(i) for i in range(5)))

    assert run(main) == [0, 2, 4, 6, 8]
    assert rec.batches == [[0, 1, 2, 3, 4]]


def test_requests_queued_behind_a_running_batch_form_the_next_one() -> None:
    rec, work = batched_recorder(delay=0.05, max_batch_size=4, batch_wait_timeout_s=0.001)

    async def main() -> list[int]:
        first = asyncio.ensure_future(work(0))
        await asyncio.sleep(0.01)  # the first batch, [0], is running now
        rest = [work(i) for i in range(1, 10)]
        return [await first, *await asyncio.gather(*rest)]

    assert run(main) == [i * 2 for i in range(10)]
    assert rec.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]


def test_bare_decorator_uses_ray_defaults() -> None:
    sizes: list[int] = []

    @batch
    async def double(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return [x * 2 for x in xs]

    async def main() -> list[int]:
        return await asyncio.gather(*(double(i) for i in range(25)))

    assert run(main) == [i * 2 for i in range(25)]
    assert sizes == [10, 10, 5]


# --- concurrency --------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 3])
def test_max_concurrent_batches(limit: int) -> None:
    rec, work = batched_recorder(
        delay=0.03, max_batch_size=2, batch_wait_timeout_s=0, max_concurrent_batches=limit
    )

    async def main() -> list[int]:
        return await asyncio.gather(*(work(i) for i in range(12)))

    assert run(main) == [i * 2 for i in range(12)]
    assert rec.peak == limit
    assert all(len(b) == 2 for b in rec.batches)


def test_each_instance_has_its_own_queue() -> None:
    class Model:
        def __init__(self, tag: str) -> None:
            self.tag = tag
            self.batches: list[list[int]] = []

        @batch(max_batch_size=10, batch_wait_timeout_s=0.01)
        async def __call__(self, xs: list[int]) -> list[str]:
            self.batches.append(xs)
            return [f"{self.tag}{x}" for x in xs]

    a, b = Model("a"), Model("b")

    async def main() -> list[str]:
        return await asyncio.gather(a(1), b(2), a(3), b(4))

    assert run(main) == ["a1", "b2", "a3", "b4"]
    assert a.batches == [[1, 3]] and b.batches == [[2, 4]]


# --- errors -----------------------------------------------------------------------------


def test_a_failing_batch_fails_each_caller_and_the_next_batch_runs() -> None:
    seen: list[list[int]] = []

    @batch(max_batch_size=3, batch_wait_timeout_s=0.01)
    async def picky(xs: list[int]) -> list[int]:
        seen.append(xs)
        if 13 in xs:
            raise RuntimeError("unlucky batch")
        return xs

    async def main() -> tuple[list[Any], list[int]]:
        first = await asyncio.gather(*(picky(x) for x in (1, 13, 2)), return_exceptions=True)
        return first, await asyncio.gather(*(picky(x) for x in (4, 5, 6)))

    failed, recovered = run(main)
    assert all(isinstance(e, RuntimeError) and str(e) == "unlucky batch" for e in failed)
    assert recovered == [4, 5, 6]
    assert seen == [[1, 13, 2], [4, 5, 6]]


@pytest.mark.parametrize(
    ("returned", "error", "words"),
    [
        (lambda xs: xs[:-1], ValueError, ["expected length 3", "actual length 2"]),
        (lambda xs: xs + xs, ValueError, ["expected length 3", "actual length 6"]),
        (lambda xs: None, TypeError, ["must return a list", "NoneType"]),
        (lambda xs: "abc", TypeError, ["must return a list", "str"]),
        (lambda xs: (x for x in xs), TypeError, ["must return a list", "generator"]),
    ],
)
def test_a_wrong_result_is_a_clear_error_to_every_caller(
    returned: Callable[[list[int]], Any], error: type[Exception], words: list[str]
) -> None:
    @batch(max_batch_size=3, batch_wait_timeout_s=0.02)
    async def broken(xs: list[int]) -> Any:
        return returned(xs) if xs[0] == 0 else xs

    async def main() -> tuple[list[Any], int]:
        results = await asyncio.gather(*(broken(i) for i in range(3)), return_exceptions=True)
        return results, await broken(7)

    results, after = run(main)
    for exc in results:
        assert isinstance(exc, error)
        for word in [*words, "broken"]:
            assert word in str(exc)
    assert after == 7


def test_tuples_and_other_sized_iterables_are_accepted() -> None:
    @batch(max_batch_size=2, batch_wait_timeout_s=1)
    async def as_tuple(xs: list[int]) -> tuple[int, ...]:
        return tuple(x + 1 for x in xs)

    async def main() -> list[int]:
        return await asyncio.gather(as_tuple(1), as_tuple(2))

    assert run(main) == [2, 3]


# --- settings at run time -----------------------------------------------------------------


def test_set_max_batch_size_at_run_time() -> None:
    class Model:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        @batch(max_batch_size=2, batch_wait_timeout_s=1)
        async def handle(self, xs: list[int]) -> list[int]:
            self.sizes.append(len(xs))
            return xs

    model = Model()

    async def main() -> None:
        await asyncio.gather(*(model.handle(i) for i in range(4)))
        model.handle.set_max_batch_size(5)  # on the bound method, as in Ray Serve
        await asyncio.gather(*(model.handle(i) for i in range(10)))

    run(main)
    assert model.sizes == [2, 2, 5, 5]


def test_shrinking_max_batch_size_releases_a_waiting_batch() -> None:
    rec, work = batched_recorder(max_batch_size=10, batch_wait_timeout_s=30)

    async def main() -> list[int]:
        calls = asyncio.gather(*(work(i) for i in range(3)))
        await asyncio.sleep(0.01)
        work.set_max_batch_size(3)
        return await calls

    start = time.monotonic()
    assert run(main) == [0, 2, 4]
    assert time.monotonic() - start < 2
    assert rec.batches == [[0, 1, 2]]


def test_set_batch_wait_timeout_s_at_run_time() -> None:
    _, work = batched_recorder(max_batch_size=10, batch_wait_timeout_s=30)

    async def main() -> int:
        call = asyncio.ensure_future(work(1))
        await asyncio.sleep(0.01)
        work.set_batch_wait_timeout_s(0.02)  # the waiting batch now goes early
        return await call

    start = time.monotonic()
    assert run(main) == 2
    assert time.monotonic() - start < 2


def test_setters_validate() -> None:
    _, work = batched_recorder()
    with pytest.raises(ValueError, match="max_batch_size"):
        work.set_max_batch_size(0)
    with pytest.raises(TypeError, match="max_batch_size"):
        work.set_max_batch_size(2.5)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        work.set_batch_wait_timeout_s(-1)


# --- cancellation ---------------------------------------------------------------------------


def test_a_cancelled_caller_leaves_its_batch_before_it_starts() -> None:
    rec, work = batched_recorder(delay=0.05, max_batch_size=4, batch_wait_timeout_s=0.001)

    async def main() -> list[int]:
        blocker = asyncio.ensure_future(work(0))
        await asyncio.sleep(0.01)  # [0] runs; the next callers queue behind it
        waiting = [asyncio.ensure_future(work(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        waiting[1].cancel()
        results = await asyncio.gather(blocker, *waiting, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        return [r for r in results if isinstance(r, int)]

    assert run(main) == [0, 2, 6]
    assert rec.batches == [[0], [1, 3]]


def test_cancelling_a_caller_of_a_running_batch_spares_the_others() -> None:
    _, work = batched_recorder(delay=0.05, max_batch_size=3, batch_wait_timeout_s=0)

    async def main() -> list[Any]:
        calls = [asyncio.ensure_future(work(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        calls[0].cancel()
        return await asyncio.gather(*calls, return_exceptions=True)

    results = run(main)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [2, 4]


def test_all_callers_cancelled_leaves_the_queue_usable() -> None:
    rec, work = batched_recorder(max_batch_size=10, batch_wait_timeout_s=0.05)

    async def main() -> int:
        calls = [asyncio.ensure_future(work(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        return await work(5)

    assert run(main) == 10
    assert rec.batches == [[5]]


# --- decoration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"max_batch_size": 0}, ValueError),
        ({"max_batch_size": 1.5}, TypeError),
        ({"max_batch_size": True}, TypeError),
        ({"batch_wait_timeout_s": -0.1}, ValueError),
        ({"batch_wait_timeout_s": float("nan")}, ValueError),
        ({"batch_wait_timeout_s": "1"}, TypeError),
        ({"max_concurrent_batches": 0}, ValueError),
        ({"max_concurrent_batches": None}, TypeError),
    ],
)
def test_bad_settings_are_rejected_at_decoration(options: dict[str, Any], error: type) -> None:
    with pytest.raises(error, match=next(iter(options))):
        batch(**options)


def test_sync_functions_are_rejected() -> None:
    def sync(xs: list[int]) -> list[int]:
        return xs

    with pytest.raises(TypeError, match="async def"):
        batch(sync)  # type: ignore[arg-type]


def test_sync_generators_are_rejected() -> None:
    def stream(xs: list[int]) -> Any:
        yield xs

    with pytest.raises(TypeError, match="async def"):
        batch(stream)


def test_positional_settings_and_wrong_arity_are_rejected() -> None:
    with pytest.raises(TypeError, match="by keyword"):
        batch(4)  # type: ignore[call-overload]

    async def too_many(a: Any, b: Any, c: Any) -> list[Any]:
        return []

    with pytest.raises(TypeError, match="one list argument"):
        batch(too_many)  # type: ignore[arg-type]


def test_calling_with_more_than_one_item_is_a_clear_error() -> None:
    _, work = batched_recorder()

    async def main() -> None:
        await work(1, 2)

    with pytest.raises(TypeError, match="call it with one item"):
        run(main)


def test_stays_an_async_function_with_the_original_name() -> None:
    class Model:
        @batch
        async def predict(self, xs: list[int]) -> list[int]:
            """Doc."""
            return xs

    assert asyncio.iscoroutinefunction(Model.predict)
    assert asyncio.iscoroutinefunction(Model().predict)
    assert Model.predict.__name__ == "predict" and Model.predict.__doc__ == "Doc."


def test_picklable_by_value_before_and_after_use() -> None:
    class Model:
        @batch(max_batch_size=4, batch_wait_timeout_s=0.001)
        async def __call__(self, xs: list[int]) -> list[int]:
            return [x + 1 for x in xs]

    async def use(cls: type[Model]) -> list[int]:
        model = cls()
        return await asyncio.gather(*(model(i) for i in range(3)))

    fresh = pickle.loads(cloudpickle.dumps(Model))
    assert run(lambda: use(fresh)) == [1, 2, 3]
    shipped = pickle.loads(cloudpickle.dumps(fresh))  # after use: queues are not pickled
    assert run(lambda: use(shipped)) == [1, 2, 3]


def test_a_function_serves_one_loop_after_another() -> None:
    _, work = batched_recorder(max_batch_size=2, batch_wait_timeout_s=0.01)

    async def main() -> list[int]:
        return await asyncio.gather(work(1), work(2))

    assert run(main) == [2, 4]
    assert run(main) == [2, 4]  # a new loop gets a new queue


# --- property: every caller gets its own result, whatever the arrival pattern ------------------


arrivals = st.lists(
    st.tuples(st.floats(0, 0.003), st.booleans()),  # (delay before arriving, cancel it?)
    min_size=1,
    max_size=30,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=arrivals,
    max_batch_size=st.integers(1, 8),
    timeout=st.sampled_from([0.0, 0.0005, 0.002, 0.01]),
    concurrency=st.integers(1, 3),
    work_delay=st.sampled_from([0.0, 0.001, 0.003]),
    resize_to=st.none() | st.integers(1, 8),
)
def test_every_caller_gets_exactly_its_own_result(
    pattern: list[tuple[float, bool]],
    max_batch_size: int,
    timeout: float,
    concurrency: int,
    work_delay: float,
    resize_to: int | None,
) -> None:
    rec, work = batched_recorder(
        delay=work_delay,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=timeout,
        max_concurrent_batches=concurrency,
    )
    limits = [max_batch_size]

    async def main() -> list[Any]:
        calls = []
        for i, (delay, _) in enumerate(pattern):
            await asyncio.sleep(delay)
            if resize_to is not None and i == len(pattern) // 2:
                work.set_max_batch_size(resize_to)
                limits.append(resize_to)
            calls.append(asyncio.ensure_future(work(i)))
        for call, (_, cancel) in zip(calls, pattern, strict=True):
            if cancel:
                call.cancel()
        return await asyncio.gather(*calls, return_exceptions=True)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as in replicas
        results = runner.run(asyncio.wait_for(main(), 10))

    for i, ((_, cancelled), result) in enumerate(zip(pattern, results, strict=True)):
        if not cancelled:
            assert result == i * 2
    processed = [x for b in rec.batches for x in b]
    assert len(processed) == len(set(processed))  # nobody served twice
    assert {i for i, (_, c) in enumerate(pattern) if not c} <= set(processed)
    assert all(1 <= len(b) <= max(limits) for b in rec.batches)
    assert rec.peak <= concurrency


# --- streaming batches (async generator batch functions) ----------------------------------------


class Counter:
    """A streaming batched method: for each input n, the numbers 0..n-1, one per step; the
    input's place then holds StopIteration."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.steps = 0
        self.closed = False

    async def count(self, limits: list[int]) -> AsyncIterator[list[Any]]:
        self.batches.append(list(limits))
        try:
            for i in range(max(limits)):
                self.steps += 1
                yield [i if i < n else StopIteration for n in limits]
                await asyncio.sleep(0)
        finally:
            self.closed = True


async def collect(stream: AsyncIterator[T]) -> list[T]:
    return [item async for item in stream]


def test_each_caller_streams_its_own_outputs() -> None:
    counter = Counter()
    count = batch(max_batch_size=4, batch_wait_timeout_s=0.05)(counter.count)

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(collect(count(n)) for n in (3, 0, 5, 1))))

    assert run(main) == [[0, 1, 2], [], [0, 1, 2, 3, 4], [0]]
    assert counter.batches == [[3, 0, 5, 1]]  # one batch served all four
    assert counter.closed


def test_stop_markers_end_a_stream_and_later_outputs_for_it_are_dropped() -> None:
    @batch(max_batch_size=3, batch_wait_timeout_s=0.05)
    async def marks(xs: list[str]) -> AsyncIterator[list[Any]]:
        yield [f"{x}1" for x in xs]
        yield [StopIteration(), StopAsyncIteration, f"{xs[2]}2"]
        yield ["late", "late", f"{xs[2]}3"]

    async def main() -> list[list[str]]:
        return list(await asyncio.gather(*(collect(marks(x)) for x in "abc")))

    assert run(main) == [["a1"], ["b1"], ["c1", "c2", "c3"]]


def test_streamed_outputs_may_be_arrays() -> None:
    np = pytest.importorskip("numpy")

    @batch(max_batch_size=2, batch_wait_timeout_s=0.05)
    async def rows(ns: list[int]) -> AsyncIterator[list[Any]]:
        yield [np.full(3, n) for n in ns]

    async def main() -> list[list[Any]]:
        return list(await asyncio.gather(collect(rows(1)), collect(rows(2))))

    first, second = run(main)
    assert [a.tolist() for a in first] == [[1, 1, 1]]
    assert [a.tolist() for a in second] == [[2, 2, 2]]


def test_a_failing_stream_fails_every_open_stream_after_its_outputs() -> None:
    @batch(max_batch_size=2, batch_wait_timeout_s=0.05)
    async def flaky(xs: list[int]) -> AsyncIterator[list[int]]:
        yield xs
        raise RuntimeError("model fell over")

    async def one(x: int) -> tuple[list[int], BaseException | None]:
        got: list[int] = []
        try:
            async for item in flaky(x):
                got.append(item)
        except RuntimeError as exc:
            return got, exc
        return got, None

    async def main() -> list[tuple[list[int], BaseException | None]]:
        results = list(await asyncio.gather(one(1), one(2)))
        results.append(await one(3))  # the next batch still runs
        return results

    for x, (got, exc) in zip((1, 2, 3), run(main), strict=True):
        assert got == [x]
        assert isinstance(exc, RuntimeError) and "model fell over" in str(exc)


def test_a_wrong_step_length_is_a_clear_error_to_every_caller() -> None:
    @batch(max_batch_size=2, batch_wait_timeout_s=0.05)
    async def short(xs: list[int]) -> AsyncIterator[list[int]]:
        yield xs[:1]

    async def main() -> list[Any]:
        return list(
            await asyncio.gather(collect(short(1)), collect(short(2)), return_exceptions=True)
        )

    for result in run(main):
        assert isinstance(result, ValueError) and "expected length 2" in str(result)


def test_callers_that_stop_listening_spare_the_others_and_the_last_closes_the_batch() -> None:
    counter = Counter()
    count = batch(max_batch_size=2, batch_wait_timeout_s=0.05)(counter.count)

    async def take(n: int, limit: int) -> list[int]:
        got: list[int] = []
        async for item in count(limit):
            got.append(item)
            if len(got) == n:
                break  # the wrapper closes its stream at once
        return got

    async def main() -> tuple[list[int], list[int], int]:
        short, longer = await asyncio.gather(take(2, 1000), take(5, 1000))
        steps_at_exit = counter.steps
        await asyncio.sleep(0.05)
        return short, longer, steps_at_exit

    short, longer, steps_at_exit = run(main)
    assert short == [0, 1] and longer == [0, 1, 2, 3, 4]
    assert counter.closed  # the generator was closed, not run on to 1000
    assert counter.steps <= steps_at_exit + 1


def test_a_cancelled_stream_consumer_leaves_the_queue_usable() -> None:
    counter = Counter()
    count = batch(max_batch_size=2, batch_wait_timeout_s=0.05)(counter.count)

    async def main() -> list[int]:
        waiting = asyncio.ensure_future(collect(count(3)))
        await asyncio.sleep(0)
        waiting.cancel()  # before its batch starts
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return await collect(count(2))

    assert run(main) == [0, 1]
    assert counter.batches == [[2]]  # the cancelled caller took no place in a batch


def test_streaming_method_keeps_its_name_and_setters() -> None:
    class Model:
        @batch(max_batch_size=4)
        async def generate(self, prompts: list[str]) -> AsyncIterator[list[str]]:
            yield prompts

    assert Model.generate.__name__ == "generate"
    assert inspect.isasyncgenfunction(Model.generate)
    model = Model()
    model.generate.set_max_batch_size(2)
    assert asyncio.run(collect(model.generate("hi"))) == ["hi"]


# --- end to end: a real cluster -----------------------------------------------------------------


@serve.deployment(max_ongoing_requests=32)
class BatchSizes:
    @batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def __call__(self, xs: list[int]) -> list[tuple[int, int]]:
        return [(x * 10, len(xs)) for x in xs]


def test_batches_form_in_a_deployment(serve_instance: Any) -> None:
    handle = serve.run(BatchSizes.bind(), name="batching")

    async def main() -> list[tuple[int, int]]:
        return list(await asyncio.gather(*(handle.remote(i) for i in range(16))))

    results = asyncio.run(main())
    assert [value for value, _ in results] == [i * 10 for i in range(16)]
    sizes = [size for _, size in results]
    assert max(sizes) > 1
    assert all(1 <= size <= 8 for size in sizes)


@serve.deployment(max_ongoing_requests=32)
class Tokens:
    @batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate(self, prompts: list[str]) -> AsyncIterator[list[Any]]:
        for i in range(max(len(p) for p in prompts)):
            yield [f"{p[i]}/{len(prompts)}" if i < len(p) else StopIteration for p in prompts]

    async def relay(self, prompt: str) -> AsyncIterator[str]:
        async for token in self.generate(prompt):
            yield token


def test_streaming_batches_in_a_deployment(serve_instance: Any) -> None:
    handle = serve.run(Tokens.bind(), name="streaming_batching").options(stream=True)
    prompts = ["abc", "de", "f", "ghij"]

    async def main(method: str) -> list[list[str]]:
        target = getattr(handle, method)
        return list(await asyncio.gather(*(collect(target.remote(p)) for p in prompts)))

    for method in ("generate", "relay"):
        streams = asyncio.run(main(method))
        assert [[t.split("/")[0] for t in s] for s in streams] == [list(p) for p in prompts]
        assert max(int(t.split("/")[1]) for s in streams for t in s) > 1  # batched
    # a sync caller iterates with a plain for loop
    assert [t.split("/")[0] for t in handle.generate.remote("xyz")] == ["x", "y", "z"]
