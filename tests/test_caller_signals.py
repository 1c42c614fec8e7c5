"""The caller's one-shot signals and stream buffers across threads (``caller/calls.py``).

``Signal`` is lock-free: these tests race threads that add callbacks against threads that
fire, many rounds over, and count that every callback ran exactly once. ``StreamBuffer`` is
produced on one thread and consumed on another: every item arrives, in order, and the
consumer credits the producer every ``CREDIT_EVERY`` bytes it takes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from types import FrameType
from typing import Any

import pytest

from serval._private.caller.calls import Call, Signal, StreamBuffer
from serval._private.wire.messages import CREDIT_EVERY
from serval.exceptions import GetTimeoutError

ROUNDS = 300


@pytest.fixture(autouse=True)
def _switch_often() -> Any:
    """Threads switch every microsecond instead of every 5 ms, so that they interleave inside
    these few lines of code (else one thread runs them all before the next starts)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


class Tally:
    """Counts how many times each callback ran, and on which thread."""

    def __init__(self) -> None:
        self.runs: Counter[int] = Counter()
        self.threads: dict[int, int] = {}
        self._lock = threading.Lock()

    def callback(self, key: int) -> Any:
        def run() -> None:
            with self._lock:
                self.runs[key] += 1
                self.threads[key] = threading.get_ident()

        return run


def _race(adders: int, firers: int, per_adder: int) -> None:
    for _ in range(ROUNDS):
        _race_once(adders, firers, per_adder)


def _race_once(adders: int, firers: int, per_adder: int) -> None:
    signal, tally = Signal(), Tally()
    start = threading.Barrier(adders + firers)

    def add(base: int) -> None:
        start.wait()
        for i in range(per_adder):
            signal.add_callback(tally.callback(base + i))

    def fire() -> None:
        start.wait()
        signal.fire()

    threads = [threading.Thread(target=add, args=(a * per_adder,)) for a in range(adders)]
    threads += [threading.Thread(target=fire) for _ in range(firers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert signal.fired
    assert dict(tally.runs) == {key: 1 for key in range(adders * per_adder)}


def test_every_callback_runs_once_when_adding_races_one_firing() -> None:
    _race(adders=3, firers=1, per_adder=20)


def test_every_callback_runs_once_when_firings_race_too() -> None:
    _race(adders=2, firers=2, per_adder=20)


# -- every interleaving -------------------------------------------------------------------------
# Threads racing rarely stop inside the few bytecodes where a lock-free design can go wrong.
# These tests stop one thread before each bytecode it runs in the code under test, in turn, run
# the other side to completion there, then let the first finish: every point where the GIL
# could switch threads is tried once, deterministically.

Scenario = tuple[Callable[[], Any], Callable[[], Any], Callable[[], None]]


def _stopped_at(
    victim: Callable[[], Any], other: Callable[[], Any], k: int, codes: set[Any]
) -> bool:
    """Run ``victim`` on a thread, stopped before its ``k``-th bytecode in ``codes``; run
    ``other`` on this thread there; then let ``victim`` finish. False if it ran fewer."""
    paused, resume = threading.Event(), threading.Event()
    seen = [0]

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            seen[0] += 1
            if seen[0] == k:
                paused.set()
                resume.wait(5)
        return local

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code in codes:
            frame.f_trace_opcodes = True
            return local
        return None

    def target() -> None:
        sys.settrace(trace)
        try:
            victim()
        finally:
            sys.settrace(None)
            paused.set()

    thread = threading.Thread(target=target)
    thread.start()
    assert paused.wait(10)
    reached = seen[0] == k
    other()
    resume.set()
    thread.join(10)
    assert not thread.is_alive()
    return reached


def _every_interleaving(make: Callable[[], Scenario], codes: set[Any]) -> int:
    """Check ``make()``'s scenario (victim, other, check) stopped at every point; the count."""
    k = 1
    while True:
        victim, other, check = make()
        if not _stopped_at(victim, other, k, codes):
            return k - 1
        check()
        k += 1


_SIGNAL_CODE = {Signal.add_callback.__code__, Signal.fire.__code__, Signal._drain.__code__}


def _signal_with(keys: str) -> tuple[Signal, Tally]:
    signal, tally = Signal(), Tally()
    for key in keys:
        signal.add_callback(tally.callback(ord(key)))
    return signal, tally


def _ran_once(tally: Tally, keys: str) -> Callable[[], None]:
    def check() -> None:
        assert dict(tally.runs) == {ord(k): 1 for k in keys}

    return check


def test_adding_at_every_point_of_a_firing() -> None:
    def make() -> Scenario:
        signal, tally = _signal_with("ab")
        return (
            signal.fire,
            lambda: signal.add_callback(tally.callback(ord("n"))),
            _ran_once(tally, "abn"),
        )

    assert _every_interleaving(make, _SIGNAL_CODE) > 20


def test_firing_at_every_point_of_an_add() -> None:
    def make() -> Scenario:
        signal, tally = _signal_with("a")
        return (
            lambda: signal.add_callback(tally.callback(ord("n"))),
            signal.fire,
            _ran_once(tally, "an"),
        )

    assert _every_interleaving(make, _SIGNAL_CODE) > 5


def test_firing_at_every_point_of_a_firing() -> None:
    def make() -> Scenario:
        signal, tally = _signal_with("abc")
        return signal.fire, signal.fire, _ran_once(tally, "abc")

    assert _every_interleaving(make, _SIGNAL_CODE) > 20


def test_a_stream_item_put_at_every_point_of_a_look_is_never_missed() -> None:
    """The consumer looks (``_next_or_signal``) while the producer puts, either stopped at any
    point: the consumer has the item, or the signal it was given to wait on has fired."""
    codes = {
        StreamBuffer._next_or_signal.__code__,
        StreamBuffer.put.__code__,
        StreamBuffer._wake.__code__,
        StreamBuffer.take.__code__,
        *_SIGNAL_CODE,
    }

    def scenario(consumer_first: bool) -> Callable[[], Scenario]:
        def make() -> Scenario:
            stream = StreamBuffer()
            looked: list[tuple[bool, Any]] = []

            def look() -> None:
                looked.append(stream._next_or_signal())

            def put() -> None:
                stream.put("item", 10)

            def check() -> None:
                ((ok, got),) = looked
                assert (ok and got == "item") or (not ok and got.fired)

            return (look, put, check) if consumer_first else (put, look, check)

        return make

    assert _every_interleaving(scenario(consumer_first=True), codes) > 5
    assert _every_interleaving(scenario(consumer_first=False), codes) > 5


def test_a_calls_assigned_signal_made_at_every_point_of_its_marking() -> None:
    codes = {Call.assigned.fget.__code__, Call.mark_assigned.__code__, *_SIGNAL_CODE}  # type: ignore[attr-defined]

    def scenario(waiter_first: bool) -> Callable[[], Scenario]:
        def make() -> Scenario:
            call = Call("app", "d", "m", (), {}, None)
            signals: list[Signal] = []

            def wait() -> None:
                signals.append(call.assigned)

            def check() -> None:
                assert signals[0] is call.assigned and signals[0].fired

            return (
                (wait, call.mark_assigned, check)
                if waiter_first
                else (
                    call.mark_assigned,
                    wait,
                    check,
                )
            )

        return make

    assert _every_interleaving(scenario(waiter_first=True), codes) > 5
    assert _every_interleaving(scenario(waiter_first=False), codes) > 3


def test_a_callback_added_after_firing_runs_at_once_in_the_adding_thread() -> None:
    signal, tally = Signal(), Tally()
    signal.add_callback(tally.callback(0))
    signal.fire()
    assert tally.runs == {0: 1} and tally.threads[0] == threading.get_ident()

    def late() -> None:
        signal.add_callback(tally.callback(1))
        assert tally.runs[1] == 1  # before add_callback returned

    t = threading.Thread(target=late)
    t.start()
    t.join(10)
    assert tally.threads[1] == t.ident
    signal.fire()  # a second firing runs nothing again
    assert tally.runs == {0: 1, 1: 1}


def test_callbacks_run_in_the_firing_thread() -> None:
    signal, tally = Signal(), Tally()
    for key in range(5):
        signal.add_callback(tally.callback(key))
    t = threading.Thread(target=signal.fire)
    t.start()
    t.join(10)
    assert set(tally.threads.values()) == {t.ident}


def test_a_raising_callback_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    signal, tally = Signal(), Tally()

    def broken() -> None:
        raise RuntimeError("a waiter's bug")

    signal.add_callback(tally.callback(0))
    signal.add_callback(broken)
    signal.add_callback(tally.callback(1))
    with caplog.at_level(logging.ERROR, logger="serval._private.caller.calls"):
        signal.fire()
        signal.add_callback(broken)  # after firing, on the adding thread: logged too
        signal.add_callback(tally.callback(2))
    assert tally.runs == {0: 1, 1: 1, 2: 1}
    assert [r.getMessage() for r in caplog.records].count("a completion callback failed") == 2


def test_wait_sync_times_out_then_sees_a_firing_from_another_thread() -> None:
    signal = Signal()
    began = time.monotonic()
    assert signal.wait_sync(0.1) is False
    assert time.monotonic() - began >= 0.09  # it did wait
    assert signal.wait_sync(0) is False
    assert signal.wait_sync(-1) is False  # a deadline already past: no wait, no error

    timer = threading.Timer(0.05, signal.fire)
    timer.start()
    began = time.monotonic()
    assert signal.wait_sync(10) is True
    assert time.monotonic() - began < 5
    assert signal.wait_sync(0) is True and signal.wait_sync(None) is True
    timer.join()


def _wait_and_fire() -> list[bool]:
    signal, woke = Signal(), []
    t = threading.Thread(target=lambda: woke.append(signal.wait_sync(None)))
    t.start()
    signal.fire()
    t.join(10)
    return woke


def test_wait_sync_without_timeout_wakes_on_fire() -> None:
    for _ in range(ROUNDS):
        assert _wait_and_fire() == [True]


def test_async_waits_wake_when_another_thread_fires() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for _ in range(100):
            signal = Signal()
            waiters = [
                asyncio.ensure_future(signal.wait()),
                signal.future(loop, fires_here=False),
            ]
            await asyncio.sleep(0)
            await asyncio.to_thread(signal.fire)
            await asyncio.wait_for(asyncio.gather(*waiters), 5)
        # fired on the loop's own thread: the local waits
        signal = Signal()
        local = asyncio.ensure_future(signal.wait_local(loop))
        await asyncio.sleep(0)
        loop.call_soon(signal.fire)
        await asyncio.wait_for(local, 5)
        await asyncio.wait_for(signal.wait_local(loop), 1)  # fired already: returns

    asyncio.run(main())


def test_a_calls_result_sync_times_out_naming_it() -> None:
    call = Call("app", "Model", "predict", (), {}, None)
    with pytest.raises(GetTimeoutError, match=r"app\.Model\.predict did not finish within 0.05s"):
        call.result_sync(0.05)


def test_assigned_signal_fires_whichever_comes_first() -> None:
    """``Call.assigned`` is made only when someone waits: made before or after the call is
    marked, by racing threads, it fires once, and every waiter wakes."""
    for _ in range(ROUNDS):
        assert _assign_while_two_wait() == [True, True]


def _assign_while_two_wait() -> list[bool]:
    call = Call("app", "d", "m", (), {}, None)
    start = threading.Barrier(3)
    woke: list[bool] = []

    def wait() -> None:
        start.wait()
        woke.append(call.assigned.wait_sync(5))

    threads = [threading.Thread(target=wait) for _ in range(2)]
    for t in threads:
        t.start()
    start.wait()
    call.mark_assigned()
    for t in threads:
        t.join(10)
    return woke


# -- StreamBuffer -------------------------------------------------------------------------------


@pytest.mark.parametrize("consumer", ["sync", "async"])
def test_a_streams_items_arrive_in_order_on_another_thread(consumer: str) -> None:
    count = 5000
    stream = StreamBuffer()
    got: list[Any] = []
    failure: list[BaseException] = []

    async def drain() -> None:
        while True:
            got.append(await stream.next_async())

    def consume() -> None:
        try:
            if consumer == "sync":
                while True:
                    got.append(stream.next_sync(5))
            else:
                asyncio.run(drain())
        except (StopIteration, StopAsyncIteration):
            pass
        except BaseException as exc:
            failure.append(exc)

    t = threading.Thread(target=consume)
    t.start()
    for i in range(count):
        stream.put(i)
        if i % 97 == 0:
            time.sleep(0)  # let the consumer catch up and wait, now and then
    stream.close()
    t.join(15)
    assert not failure, failure
    assert got == list(range(count))


def test_a_streams_error_comes_after_its_items() -> None:
    stream = StreamBuffer()
    for i in range(3):
        stream.put(i)
    stream.close(ValueError("the replica's stream broke"))
    assert [stream.next_sync(1) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="broke"):
        stream.next_sync(1)
    with pytest.raises(GetTimeoutError):
        StreamBuffer().next_sync(0.01)


@pytest.mark.parametrize("size", [1 << 14, 10_000])  # items that make CREDIT_EVERY exactly, or not
def test_a_stream_credits_every_credit_every_bytes_taken(size: int) -> None:
    stream = StreamBuffer()
    credits: list[tuple[int, int]] = []  # (bytes credited, bytes taken when credited)
    taken = 0
    stream.on_taken = lambda nbytes: credits.append((nbytes, taken))
    items = 3 * CREDIT_EVERY // size + 5
    done = threading.Event()

    def produce() -> None:
        for i in range(items):
            stream.put(i, size)
        done.set()

    t = threading.Thread(target=produce)
    t.start()
    for i in range(items):
        assert stream.next_sync(5) == i
        taken += size
    t.join(10)
    # A credit each time CREDIT_EVERY bytes more were taken, for what was taken, and none
    # before: the producer never has more than the window unread here.
    per_credit = -(-CREDIT_EVERY // size) * size  # whole items make up a credit
    assert [nbytes for nbytes, _ in credits] == [per_credit] * (items * size // per_credit)
    assert [at for _, at in credits] == [per_credit * (k + 1) - size for k in range(len(credits))]
    # Once the stream has ended, it credits nothing more.
    stream.close()
    assert stream.on_taken is None
