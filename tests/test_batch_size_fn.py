"""``@serve.batch(batch_size_fn=...)``: a batch measured by a function of its items (Ray Serve's
dynamic request batching guide, "Custom batch size functions").

The batcher in-process first, on an event loop whose time is virtual (it jumps to the next
timer whenever nothing else can run, as Trio's autojump clock), so what happens when is
asserted exactly; then a property test; then the guide's token batcher through a real cluster.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import serval as serve

T = TypeVar("T")


# -- virtual time ---------------------------------------------------------------------------------


class _Autojump(selectors.BaseSelector):
    """The loop's selector: when the loop would wait for a timer, time jumps to it instead."""

    def __init__(self, real: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self._real = real
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("deadlock: nothing can run and no timer is set")
        self._loop.now += timeout
        return []

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def close(self) -> None:
        self._real.close()

    def get_map(self) -> Any:
        return self._real.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self._selector = _Autojump(self._selector, self)  # type: ignore[has-type]

    def time(self) -> float:
        return self.now


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), timeout=3600))
    finally:
        loop.close()


def now() -> float:
    return asyncio.get_running_loop().time()


# -- the guide's examples, in-process ---------------------------------------------------------


class Graph:
    """The guide's graph: what costs is its number of nodes."""

    def __init__(self, num_nodes: int) -> None:
        self.num_nodes = num_nodes


class GraphNeuralNetwork:
    """The guide's deployment class (called directly here), recording each batch it gets."""

    def __init__(self, work_s: float = 0.0) -> None:
        self.work_s = work_s
        self.batches: list[tuple[float, list[int]]] = []

    @serve.batch(
        max_batch_size=10000,  # total nodes per batch
        batch_wait_timeout_s=0.1,
        batch_size_fn=lambda graphs: sum(g.num_nodes for g in graphs),
    )
    async def predict(self, graphs: list[Graph]) -> list[float]:
        self.batches.append((now(), [g.num_nodes for g in graphs]))
        await asyncio.sleep(self.work_s)
        return [g.num_nodes * 0.1 for g in graphs]


async def gather_all(*calls: Coroutine[Any, Any, T]) -> list[T | BaseException]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


def test_a_batch_closes_when_the_next_item_would_pass_the_limit_and_goes_at_once() -> None:
    async def main() -> None:
        model = GraphNeuralNetwork(work_s=1.0)
        sizes = [100, 5000, 3000, 4000, 2000]
        results = await gather_all(*(model.predict(Graph(n)) for n in sizes))
        assert results == [n * 0.1 for n in sizes]
        # 100 + 5000 + 3000 = 8100; with 4000 it would be 12100: the batch is closed and goes
        # now, not after its 0.1 s. The rest waited behind it (one batch at a time) and goes
        # when it ends.
        assert model.batches == [(0.0, [100, 5000, 3000]), (1.0, [4000, 2000])]

    run(main)


def test_a_partial_batch_waits_for_batch_wait_timeout_s() -> None:
    async def main() -> None:
        model = GraphNeuralNetwork()
        first = asyncio.ensure_future(model.predict(Graph(100)))
        await asyncio.sleep(0.04)
        second = asyncio.ensure_future(model.predict(Graph(200)))
        assert list(await asyncio.gather(first, second)) == [10.0, 20.0]
        assert model.batches == [(0.1, [100, 200])]  # from the first item's arrival

    run(main)


def test_reaching_the_limit_exactly_closes_the_batch() -> None:
    async def main() -> None:
        model = GraphNeuralNetwork()
        await gather_all(model.predict(Graph(6000)), model.predict(Graph(4000)))
        assert model.batches == [(0.0, [6000, 4000])]

    run(main)


def test_the_item_that_did_not_fit_leads_the_next_batch() -> None:
    async def main() -> None:
        model = GraphNeuralNetwork(work_s=1.0)
        early = [model.predict(Graph(n)) for n in (9000, 2000)]  # 2000 does not fit with 9000
        tasks = [asyncio.ensure_future(c) for c in early]
        await asyncio.sleep(0.5)  # the first batch runs; the second forms behind it
        late = [asyncio.ensure_future(model.predict(Graph(n))) for n in (7000, 500)]
        await asyncio.gather(*tasks, *late)
        assert [nodes for _, nodes in model.batches] == [[9000], [2000, 7000, 500]]

    run(main)


def test_an_item_too_large_for_any_batch_fails_its_caller_only() -> None:
    async def main() -> None:
        model = GraphNeuralNetwork()
        results = await gather_all(*(model.predict(Graph(n)) for n in (300, 20000, 700)))
        assert results[0] == 30.0 and results[2] == 70.0
        error = results[1]
        assert isinstance(error, RuntimeError)
        assert "greater than max_batch_size" in str(error)
        assert model.batches == [(0.1, [300, 700])]

    run(main)


def test_a_batch_size_fn_that_raises_fails_that_callers_request() -> None:
    def tokens(texts: list[str]) -> int:
        if any(not t for t in texts):
            raise ValueError("empty prompt")
        return sum(len(t.split()) for t in texts)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.1, batch_size_fn=tokens)
    async def count(texts: list[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    async def main() -> None:
        results = await gather_all(count("a b"), count(""), count("c d"))
        assert results[0] == 2 and results[2] == 2
        assert isinstance(results[1], ValueError) and str(results[1]) == "empty prompt"

    run(main)


def test_a_batch_size_fn_must_return_a_number() -> None:
    @serve.batch(batch_size_fn=lambda items: "big")  # type: ignore[arg-type,return-value]
    async def echo(items: list[int]) -> list[int]:
        return items

    async def main() -> None:
        with pytest.raises(TypeError, match="must return a number"):
            await echo(1)

    run(main)


def test_batch_size_fn_must_be_callable() -> None:
    with pytest.raises(TypeError, match="batch_size_fn must be a callable"):
        serve.batch(batch_size_fn=10)  # type: ignore[call-overload]


def test_set_max_batch_size_measures_the_waiting_batch_again() -> None:
    async def main() -> None:
        model = GraphNeuralNetwork()
        tasks = [asyncio.ensure_future(model.predict(Graph(n))) for n in (3000, 3000)]
        await asyncio.sleep(0.01)
        assert model.batches == []  # 6000 of 10000: waiting for more
        model.predict.set_max_batch_size(6000)  # now it is full
        await asyncio.gather(*tasks)
        assert model.batches == [(0.01, [3000, 3000])]
        type(model).predict.set_max_batch_size(10000)  # (shared by the class, as in Ray)

    run(main)


def test_a_cancelled_caller_leaves_and_the_rest_is_measured_without_it() -> None:
    async def main() -> None:
        model = GraphNeuralNetwork()
        big = asyncio.ensure_future(model.predict(Graph(8000)))
        small = asyncio.ensure_future(model.predict(Graph(1000)))
        await asyncio.sleep(0.01)
        big.cancel()
        fits = asyncio.ensure_future(model.predict(Graph(9000)))  # fits now that 8000 left
        assert list(await asyncio.gather(small, fits)) == [100.0, 900.0]
        assert model.batches == [(0.01, [1000, 9000])]  # 10000 exactly: at once

    run(main)


def test_streaming_batches_are_measured_the_same_way() -> None:
    @serve.batch(
        max_batch_size=5,
        batch_wait_timeout_s=0.1,
        batch_size_fn=lambda prompts: sum(len(p) for p in prompts),
    )
    async def spell(prompts: list[str]) -> AsyncIterator[list[Any]]:
        for i in range(max(len(p) for p in prompts)):
            yield [f"{p[i]}/{len(prompts)}" if i < len(p) else StopIteration for p in prompts]

    async def collect(prompt: str) -> list[str]:
        return [token async for token in spell(prompt)]

    async def main() -> None:
        results = await gather_all(*(collect(p) for p in ("ab", "cde", "fghij", "toolong")))
        # 2 + 3 letters: one batch of two, at once; 5 letters alone; 7 can never fit in 5
        assert results[:3] == [["a/2", "b/2"], ["c/2", "d/2", "e/2"], [f"{c}/1" for c in "fghij"]]
        assert isinstance(results[3], RuntimeError)

    run(main)


def test_without_batch_size_fn_a_batch_is_counted_by_items() -> None:
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.1)
    async def sizes(items: list[int]) -> list[int]:
        return [len(items)] * len(items)

    async def main() -> None:
        assert await asyncio.gather(*(sizes(10_000) for _ in range(3))) == [2, 2, 1]

    run(main)


# -- property: whatever arrives when, batches respect the limit and keep the order -------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limit=st.integers(1, 20),
    arrivals=st.lists(st.tuples(st.integers(0, 25), st.floats(0, 0.2)), min_size=1, max_size=25),
    work_s=st.sampled_from([0.0, 0.05, 0.3]),
    concurrency=st.integers(1, 3),
)
def test_batches_stay_within_the_limit_and_every_caller_gets_its_own_result(
    limit: int, arrivals: list[tuple[int, float]], work_s: float, concurrency: int
) -> None:
    batches: list[list[int]] = []

    @serve.batch(
        max_batch_size=limit,
        batch_wait_timeout_s=0.1,
        max_concurrent_batches=concurrency,
        batch_size_fn=lambda items: sum(size for size, _ in items),
    )
    async def work(items: list[tuple[int, int]]) -> list[int]:
        batches.append([index for _, index in items])
        assert sum(size for size, _ in items) <= limit
        await asyncio.sleep(work_s)
        return [index for _, index in items]

    arrived: list[int] = []

    async def one(index: int, size: int, delay: float) -> int:
        await asyncio.sleep(delay)
        arrived.append(index)  # (no await before the call: it joins the queue in this order)
        return await work((size, index))

    async def main() -> list[int | BaseException]:
        return await gather_all(*(one(i, size, delay) for i, (size, delay) in enumerate(arrivals)))

    results = run(main)
    for index, ((size, _), result) in enumerate(zip(arrivals, results, strict=True)):
        if size > limit:
            assert isinstance(result, RuntimeError)
        else:
            assert result == index
    served = [i for batch in batches for i in batch]
    assert sorted(served) == [i for i, (size, _) in enumerate(arrivals) if size <= limit]
    # first come, first batched: an item that did not fit leads the next batch
    assert served == [i for i in arrived if arrivals[i][0] <= limit]


# -- end to end: the guide's token batcher on a real cluster -----------------------------------


@serve.deployment(max_ongoing_requests=32)
class TokenBatcher:
    @serve.batch(
        max_batch_size=12,  # total tokens per batch
        batch_wait_timeout_s=0.2,
        batch_size_fn=lambda sequences: sum(len(s.split()) for s in sequences),
    )
    async def process(self, sequences: list[str]) -> list[tuple[int, int]]:
        total = sum(len(s.split()) for s in sequences)
        return [(len(s.split()), total) for s in sequences]

    async def __call__(self, sequence: str) -> tuple[int, int]:
        return await self.process(sequence)


def test_token_batching_in_a_deployment(serve_instance: Any) -> None:
    handle = serve.run(TokenBatcher.bind(), name="token_batching")
    sequences = [" ".join(["word"] * n) for n in (5, 4, 3, 6, 2, 7, 1, 12)]

    async def main() -> list[tuple[int, int]]:
        return list(await asyncio.gather(*(handle.remote(s) for s in sequences)))

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == [5, 4, 3, 6, 2, 7, 1, 12]
    totals = [total for _, total in results]
    assert all(total <= 12 for total in totals)
    assert any(total > tokens for tokens, total in results)  # some went together
    with pytest.raises(RuntimeError, match="greater than max_batch_size"):
        handle.remote(" ".join(["word"] * 13)).result(timeout_s=30)
