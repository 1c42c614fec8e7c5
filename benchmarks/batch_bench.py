"""@serve.batch: items/s of a model that is cheaper per item in batches, unbatched vs batched.

    python benchmarks/batch_bench.py            # about 15 s
    python benchmarks/batch_bench.py --quick    # a few seconds, for a smoke test
    python benchmarks/batch_bench.py --check    # exit 1 if batched < 8x unbatched

The model: one forward pass costs 5 ms + 0.05 ms per item, and the replica has one
accelerator, modelled by an asyncio.Lock held for the pass, so passes never overlap.

- unbatched: ``async def __call__(self, x)``: one item per pass;
- batched: ``@batch(max_batch_size=32)``: up to 32 items per pass.

Both deployments get ``max_ongoing_requests=CONCURRENCY`` and are driven by CONCURRENCY
async callers through one handle, each calling again as soon as it has its answer, so the
model is never short of work: what differs is only how many items a pass serves.

Beside each serval figure: the ideal (the model's own cost, nothing else) and the same model
and callers in this process without serval (plain asyncio, the same ``@batch``), so that what
serval's request path costs shows up separately from what batching gains.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import uvloop

import serval as serve
from serval.batching import batch

FIXED_S = 0.005
PER_ITEM_S = 0.00005
MAX_BATCH_SIZE = 32
CONCURRENCY = 128
GOAL_RATIO = 8.0


class _Accelerator:
    """One device: passes run one at a time and cost FIXED_S + PER_ITEM_S per item."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.passes = 0
        self.items = 0

    async def forward(self, items: int) -> None:
        async with self.lock:
            await _sleep_at_least(FIXED_S + PER_ITEM_S * items)
            self.passes += 1
            self.items += items


async def _sleep_at_least(seconds: float) -> None:
    # uvloop's timers have millisecond resolution and fire up to ~1 ms early against the
    # clock; a model that ran faster than its stated cost would flatter the unbatched figure.
    deadline = time.perf_counter() + seconds
    while (left := deadline - time.perf_counter()) > 0:  # noqa: ASYNC110 - waiting on a clock
        await asyncio.sleep(left)


class _Model:
    def __init__(self) -> None:
        self.device = _Accelerator()

    def items_per_pass(self) -> float:
        return self.device.items / max(1, self.device.passes)


class Unbatched(_Model):
    async def __call__(self, x: int) -> int:
        await self.device.forward(1)
        return x


class Batched(_Model):
    @batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=0.01)
    async def __call__(self, xs: list[int]) -> list[int]:
        await self.device.forward(len(xs))
        return xs


async def drive(call: Callable[[int], Awaitable[Any]], seconds: float, warmup: float) -> float:
    """Items/s completed by CONCURRENCY callers, counted after `warmup`, over `seconds`."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    stop = start + seconds
    done = 0

    async def caller(i: int) -> None:
        nonlocal done
        while loop.time() < stop:
            assert await call(i) == i
            # Only answers that arrive inside the window: the callers still queued at `stop`
            # finish later, and counting them would inflate the slow variant the most.
            if start <= loop.time() < stop:
                done += 1

    await asyncio.gather(*(caller(i) for i in range(CONCURRENCY)))
    return done / seconds


Figure = tuple[float, float]  # (items/s, mean items per forward pass)


def measure_in_process(cls: type[_Model], seconds: float, warmup: float) -> Figure:
    async def main() -> Figure:
        model: Any = cls()  # called like a handle: one item in, one result out
        return await drive(model, seconds, warmup), model.items_per_pass()

    return _run(main())


def measure_serval(cls: type[_Model], seconds: float, warmup: float) -> Figure:
    name = f"batch_bench_{cls.__name__.lower()}"
    handle = serve.run(serve.deployment(max_ongoing_requests=CONCURRENCY)(cls).bind(), name=name)

    async def main() -> Figure:
        rate = await drive(handle.remote, seconds, warmup)
        return rate, await handle.items_per_pass.remote()

    try:
        return _run(main())
    finally:
        serve.delete(name)


def _run(main: Coroutine[Any, Any, Figure]) -> Figure:
    # uvloop everywhere, as in serval's replicas: the same timers and the same loop costs.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def ideal(items_per_pass: int) -> float:
    return items_per_pass / (FIXED_S + PER_ITEM_S * items_per_pass)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    parser.add_argument("--check", action="store_true", help="exit 1 if the goal is missed")
    args = parser.parse_args()
    seconds, warmup = (1.0, 0.2) if args.quick else (3.0, 0.5)

    models: tuple[type[_Model], ...] = (Unbatched, Batched)
    in_process = {cls: measure_in_process(cls, seconds, warmup) for cls in models}
    serve.start(http_options={"enabled": False})  # handles only: no HTTP port to collide on
    try:
        served = {cls: measure_serval(cls, seconds, warmup) for cls in models}
    finally:
        serve.shutdown()

    ratio = served[Batched][0] / served[Unbatched][0]
    report(in_process, served, ratio, seconds)
    return 1 if args.check and ratio < GOAL_RATIO else 0


def report(
    in_process: dict[type[_Model], Figure],
    served: dict[type[_Model], Figure],
    ratio: float,
    seconds: float,
) -> None:
    print(
        f"model: {FIXED_S * 1e3:g} ms + {PER_ITEM_S * 1e3:g} ms/item per pass, one pass at a "
        f"time; {CONCURRENCY} callers; {seconds:g} s per figure; {os.cpu_count()} CPUs; "
        f"Python {sys.version.split()[0]}"
    )
    print(
        f"{'items/s':<18}{'ideal':>8}{'in-process':>12}{'serval':>9}{'serval/ideal':>14}"
        f"{'items/pass':>12}"
    )
    for cls, per_pass in ((Unbatched, 1), (Batched, MAX_BATCH_SIZE)):
        best, (local, _), (rate, mean_pass) = ideal(per_pass), in_process[cls], served[cls]
        print(
            f"{cls.__name__.lower():<18}{best:>8.0f}{local:>12.0f}{rate:>9.0f}"
            f"{rate / best:>14.2f}{mean_pass:>12.1f}"
        )
    local_ratio = in_process[Batched][0] / in_process[Unbatched][0]
    verdict = "met" if ratio >= GOAL_RATIO else "MISSED"
    print(
        f"batched / unbatched through serval: {ratio:.1f}x (goal >= {GOAL_RATIO:g}x: {verdict}; "
        f"ideal {ideal(MAX_BATCH_SIZE) / ideal(1):.1f}x, in-process {local_ratio:.1f}x)"
    )
    summary = {
        "items_per_s": {cls.__name__.lower(): served[cls][0] for cls in served},
        "in_process_items_per_s": {cls.__name__.lower(): in_process[cls][0] for cls in in_process},
        "ratio": ratio,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
