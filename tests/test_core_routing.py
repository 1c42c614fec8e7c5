"""Routing and replica concurrency: load balancing, max_ongoing_requests as a hard limit,
max_queued_requests back pressure, separate processes, sync methods off the event loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

import serval as serve
from conftest import poll


@serve.deployment
class Who:
    async def __call__(self, delay: float = 0.0) -> tuple[str, int]:
        await asyncio.sleep(delay)
        return serve.get_replica_context().replica_id, os.getpid()


@serve.deployment
class Gauge:
    """Records how many requests are inside it at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self.total = 0

    def _in(self) -> None:
        with self.lock:
            self.current += 1
            self.total += 1
            self.peak = max(self.peak, self.current)

    def _out(self) -> None:
        with self.lock:
            self.current -= 1

    async def async_enter(self, delay: float) -> int:
        self._in()
        try:
            await asyncio.sleep(delay)
        finally:
            self._out()
        return 1

    def sync_enter(self, delay: float) -> int:
        self._in()
        try:
            time.sleep(delay)
        finally:
            self._out()
        return 1

    def stats(self) -> tuple[int, int]:
        with self.lock:
            return self.peak, self.total


@serve.deployment(num_replicas=2)
class Fanout:
    """Another caller process hitting the gauge concurrently."""

    def __init__(self, gauge) -> None:
        self.gauge = gauge

    async def hit(self, n: int, delay: float) -> int:
        return sum(await asyncio.gather(*[self.gauge.async_enter.remote(delay) for _ in range(n)]))


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Single:
    async def __call__(self, delay: float) -> str:
        await asyncio.sleep(delay)
        return "done"


@serve.deployment
class Mixed:
    def slow_sync(self, seconds: float, flag: str | None = None) -> str:
        if flag:
            Path(flag).write_text("started")
        time.sleep(seconds)
        return "slow"

    async def fast_async(self) -> str:
        return "fast"

    def fast_sync(self) -> str:
        return "fast-sync"


def test_requests_spread_over_replicas(apps: None) -> None:
    h = serve.run(Who.options(num_replicas=2).bind())
    responses = [h.remote(0.1) for _ in range(20)]
    replicas = {r.result(timeout_s=10)[0] for r in responses}
    assert len(replicas) == 2


def test_busy_replica_is_skipped(apps: None) -> None:
    h = serve.run(Who.options(num_replicas=2, max_ongoing_requests=1).bind())
    first, second = h.remote(0.5), h.remote(0.5)
    assert first.result(timeout_s=10)[0] != second.result(timeout_s=10)[0]


def test_replicas_are_separate_processes(apps: None) -> None:
    h = serve.run(Who.options(num_replicas=2, max_ongoing_requests=1).bind())
    pids = {r.result(timeout_s=10)[1] for r in [h.remote(0.3), h.remote(0.3)]}
    assert len(pids) == 2
    assert os.getpid() not in pids


@pytest.mark.parametrize("method", ["async_enter", "sync_enter"])
def test_max_ongoing_requests_is_a_hard_limit(apps: None, method: str) -> None:
    h = serve.run(Gauge.options(max_ongoing_requests=2).bind())
    call = getattr(h, method)
    responses = [call.remote(0.1) for _ in range(10)]
    assert sum(r.result(timeout_s=10) for r in responses) == 10
    peak, total = h.stats.remote().result(timeout_s=10)
    assert total == 10
    assert peak == 2  # the limit is used, and never exceeded


def test_max_ongoing_requests_limit_holds_across_caller_processes(apps: None) -> None:
    gauge = Gauge.options(max_ongoing_requests=2).bind()
    serve.run(Fanout.bind(gauge), name="fan", route_prefix="/fan")
    fanout = serve.get_deployment_handle("Fanout", app_name="fan")
    direct = serve.get_deployment_handle("Gauge", app_name="fan")
    # three caller processes (two Fanout replicas and this test) at once
    remote_callers = [fanout.hit.remote(5, 0.1) for _ in range(4)]
    local = [direct.async_enter.remote(0.1) for _ in range(5)]
    assert sum(r.result(timeout_s=15) for r in remote_callers) == 20
    assert sum(r.result(timeout_s=15) for r in local) == 5
    peak, total = direct.stats.remote().result(timeout_s=10)
    assert total == 25
    assert peak <= 2


def test_default_max_ongoing_requests_is_five(apps: None) -> None:
    h = serve.run(Gauge.bind())
    responses = [h.async_enter.remote(0.1) for _ in range(12)]
    assert sum(r.result(timeout_s=10) for r in responses) == 12
    assert h.stats.remote().result(timeout_s=10)[0] == 5


def test_max_queued_requests_back_pressure(apps: None) -> None:
    h = serve.run(Single.bind())
    # the sync legacy handle returns once the request is assigned: the replica is now busy
    busy = Single.get_handle().remote(1.0)
    start = time.monotonic()
    queued = h.remote(0.0)  # waits in the caller's queue (1 allowed)
    rejected = [h.remote(0.0) for _ in range(3)]
    for r in rejected:
        with pytest.raises(serve.exceptions.BackPressureError):
            r.result(timeout_s=10)
    assert time.monotonic() - start < 0.9  # rejected at once, not after the busy call
    assert serve.get(busy, timeout=10) == "done"
    assert queued.result(timeout_s=10) == "done"
    # once the queue has drained, requests are accepted again
    assert h.remote(0.0).result(timeout_s=10) == "done"


def test_back_pressure_on_legacy_sync_handle(apps: None) -> None:
    serve.run(Single.bind())
    handle = Single.get_handle()
    busy = handle.remote(1.0)
    queued = serve.get_app_handle("default").remote(0.0)
    with pytest.raises(serve.exceptions.BackPressureError):
        serve.get(handle.remote(0.0), timeout=10)
    assert serve.get(busy, timeout=10) == "done"
    assert queued.result(timeout_s=10) == "done"


def test_slow_sync_method_does_not_block_async_method(apps: None, tmp_path: Path) -> None:
    h = serve.run(Mixed.bind())
    flag = tmp_path / "started"
    slow = h.slow_sync.remote(2.0, str(flag))
    poll(flag.exists, timeout=5.0, what="the slow sync method to start", interval=0.01)
    start = time.monotonic()
    assert h.fast_async.remote().result(timeout_s=5) == "fast"
    assert h.fast_sync.remote().result(timeout_s=5) == "fast-sync"
    assert time.monotonic() - start < 1.0
    assert slow.result(timeout_s=10) == "slow"


def test_sync_methods_run_concurrently(apps: None) -> None:
    h = serve.run(Mixed.bind())
    start = time.monotonic()
    responses = [h.slow_sync.remote(0.5) for _ in range(3)]
    assert [r.result(timeout_s=10) for r in responses] == ["slow"] * 3
    assert time.monotonic() - start < 1.2  # not 1.5 s one after another


@serve.deployment(max_ongoing_requests=1)
class Ledger:
    """Runs one request at a time and notes the order they came in."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def add(self, key: object) -> object:
        self.seen.append(key)
        return key

    def log(self) -> list[object]:
        return self.seen


def test_one_threads_calls_run_in_the_order_it_made_them(apps: None) -> None:
    h = serve.run(Ledger.bind())
    responses = [h.add.remote(i) for i in range(40)]  # most wait at the caller
    assert [r.result(timeout_s=10) for r in responses] == list(range(40))
    assert h.log.remote().result(timeout_s=10) == list(range(40))


def test_threads_calling_at_once_each_keep_their_order(apps: None) -> None:
    h = serve.run(Ledger.bind())
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        start.wait(timeout=10)
        responses = [h.add.remote((t, i)) for i in range(15)]
        for r in responses:
            r.result(timeout_s=20)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    log = h.log.remote().result(timeout_s=10)
    assert len(log) == 60
    for t in range(4):
        assert [i for (who, i) in log if who == t] == list(range(15))


def test_threads_calling_at_once_are_spread_over_free_replicas(apps: None) -> None:
    # Each replica takes one request at a time: two threads calling at the same moment must
    # land on different replicas, never both on one (where the second would wait).
    h = serve.run(Who.options(num_replicas=2, max_ongoing_requests=1).bind())

    def worker(start: threading.Barrier, where: list[str]) -> None:
        start.wait(timeout=10)
        where.append(h.remote(0.3).result(timeout_s=10)[0])

    for _ in range(3):
        start = threading.Barrier(2)
        where: list[str] = []
        threads = [threading.Thread(target=worker, args=(start, where)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=20)
        assert len(set(where)) == 2, where
