"""What one thread hop costs on this machine: an event loop hands a no-op to a worker thread and
waits for the result, the way a replica runs a ``def`` method and the way a sync handle's
``.result()`` goes through the background loop.

    python benchmarks/thread_hop.py

Prints the round trip (two wake-ups) with the threads free to run on any CPU, as serval's
are, and with both pinned to one CPU, where a wake-up is a local context switch. On a VM whose
idle CPUs halt, the first is several times the second: waking a thread on an idle CPU costs
an interrupt across CPUs. This is the cost the sync paths pay on top of the async ones (see
docs/performance.md); it is not serval code, which is why it is measured apart.
"""

from __future__ import annotations

import asyncio
import os
import queue
import statistics
import sys
import threading
import time
from typing import Any

import uvloop

N = 20_000


def _worker(jobs: queue.SimpleQueue[Any], loop: asyncio.AbstractEventLoop) -> None:
    while True:
        fut = jobs.get()
        if fut is None:
            return
        loop.call_soon_threadsafe(fut.set_result, None)


async def _round_trips(n: int) -> list[float]:
    loop = asyncio.get_running_loop()
    jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
    thread = threading.Thread(target=_worker, args=(jobs, loop), daemon=True)
    thread.start()
    clock = time.perf_counter
    out = []
    try:
        for i in range(n + 1000):
            t = clock()
            fut = loop.create_future()
            jobs.put(fut)
            await fut
            if i >= 1000:  # the first thousand warm up
                out.append(clock() - t)
    finally:
        jobs.put(None)
    return out


def measure(cpus: set[int] | None) -> list[float]:
    mine = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)  # threads started after this inherit it
    try:
        return sorted(uvloop.run(_round_trips(N)))
    finally:
        os.sched_setaffinity(0, mine)


def main() -> int:
    cpus = sorted(os.sched_getaffinity(0))
    print(
        f"thread hop round trip (loop -> worker thread -> loop), {N:,} times, "
        f"Python {sys.version.split()[0]}, {len(cpus)} CPUs"
    )
    for label, placement in (("any CPU (as serval runs)", None), ("one CPU", {cpus[0]})):
        lat = measure(placement)
        p50 = statistics.median(lat) * 1e6
        p99 = lat[int(len(lat) * 0.99)] * 1e6
        print(f"  {label:<26} p50 {p50:6.1f} µs   p99 {p99:6.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
