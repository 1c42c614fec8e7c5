"""The controller's clock: the time it reads, its sleeps and its timeouts.

Every timer of the controller's (health checks every ``health_check_period_s``, autoscaling
every ``metrics_interval_s``, graceful-stop timeouts, the proxy's restart back-off) goes
through one ``Clock``, so that a test can run the real controller on virtual time:

- ``RealClock``: ``time.monotonic``, ``time.time``, ``asyncio.sleep``, ``asyncio.wait_for``
  (what the controller of a cluster uses; the default);
- ``FakeClock``: virtual time that moves only when the test calls :meth:`FakeClock.advance`
  (in the spirit of Trio's ``MockClock``). Advancing fires the due timers in the order of
  their deadlines, and after each lets every task run until all are blocked again, so what
  happens is the same on every run: no real sleep, no race with a real timer.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable
from typing import Any, TypeVar

__all__ = ["Clock", "FakeClock", "RealClock"]

T = TypeVar("T")


class Clock(ABC):
    @abstractmethod
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for intervals and deadlines)."""

    @abstractmethod
    def time(self) -> float:
        """Wall-clock seconds since the epoch (for what users read as a date)."""

    @abstractmethod
    async def sleep(self, seconds: float) -> None:
        """Return after ``seconds`` (at once, after one turn of the loop, if <= 0)."""

    @abstractmethod
    async def wait_for(self, aw: Awaitable[T], seconds: float | None) -> T:
        """``aw``'s result; if it takes longer than ``seconds`` (None: no limit), cancel it
        and raise ``TimeoutError`` (as ``asyncio.wait_for``)."""


class RealClock(Clock):
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, aw: Awaitable[T], seconds: float | None) -> T:
        return await asyncio.wait_for(aw, seconds)


# More turns of the loop than this without every task blocked: something spins (a loop of
# ``sleep(0)``, say), and virtual time could never be advanced past it.
_MAX_SETTLE_TURNS = 100_000


class FakeClock(Clock):
    """Virtual time, advanced by the test. Needs asyncio's own event loop (it reads whether
    the loop has callbacks ready to run, which uvloop does not tell)."""

    def __init__(self, start: float = 1000.0, epoch: float = 1_700_000_000.0) -> None:
        # (not 0: a real monotonic clock is never 0, and code may test a time for truth)
        self._now = start
        self._wall_offset = epoch - start
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        await self._timer(seconds)

    async def wait_for(self, aw: Awaitable[T], seconds: float | None) -> T:
        task = asyncio.ensure_future(aw)
        if seconds is None:
            return await task
        timer = self._timer(seconds) if seconds > 0 else None
        try:
            if timer is not None:
                await asyncio.wait((task, timer), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            if timer is not None:
                timer.cancel()
            task.cancel()
            await asyncio.wait((task,))
            raise
        if task.done():
            if timer is not None:
                timer.cancel()
            return task.result()
        task.cancel()
        await asyncio.wait((task,))  # its clean-up runs before the timeout is reported
        raise TimeoutError

    # -- what the test drives --------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Timers waiting for virtual time (sleeps and timeouts not cancelled)."""
        return sum(1 for _, _, fut in self._timers if not fut.done())

    def next_deadline(self) -> float | None:
        """When the next timer fires, if any."""
        live = [deadline for deadline, _, fut in self._timers if not fut.done()]
        return min(live) if live else None

    async def advance(self, seconds: float) -> None:
        """Move virtual time ``seconds`` on: fire each timer due by then at its own deadline
        (the earliest first), and let the tasks run until all are blocked after each."""
        if seconds < 0:
            raise ValueError("time does not go back")
        target = self._now + seconds
        await self.settle()
        while self._timers and self._timers[0][0] <= target:
            deadline = self._timers[0][0]
            self._now = max(self._now, deadline)
            while self._timers and self._timers[0][0] == deadline:
                _, _, fut = heapq.heappop(self._timers)
                if not fut.done():
                    fut.set_result(None)
            await self.settle()
        self._now = target
        await self.settle()

    async def settle(self) -> None:
        """Let every task run until all are blocked (on a timer, or on each other)."""
        loop = asyncio.get_running_loop()
        ready: Any = getattr(loop, "_ready", None)
        if ready is None:
            raise TypeError("FakeClock needs asyncio's own event loop (not uvloop's)")
        for _ in range(_MAX_SETTLE_TURNS):
            await asyncio.sleep(0)
            if not ready:
                return
        raise RuntimeError(f"the loop never settled in {_MAX_SETTLE_TURNS} turns: a task spins")

    def _timer(self, seconds: float) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self._now + seconds, next(self._order), fut))
        return fut
