"""Worker threads for a replica's sync user code.

Like ``loop.run_in_executor`` with a thread pool, with less work per call: a request goes to an
idle worker through a ``SimpleQueue``; a worker is added only when none is idle (up to a
limit); results come back to the loop in batches, one wake-up for all the calls that finished
since the loop last looked, instead of one per call.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

_Then = Callable[[asyncio.Future[Any]], None]
_Job = tuple[
    asyncio.Future[Any], contextvars.Context, Callable[..., Any], tuple[Any, ...], _Then | None
]
_Finished = tuple[asyncio.Future[Any], Any, BaseException | None, _Then | None]

logger = logging.getLogger(__name__)


class RaisedStopIteration(RuntimeError):
    """Carries a ``StopIteration`` that user code raised: a future cannot hold one (asyncio
    refuses it), yet the caller is owed an answer. ``raised`` is the original."""

    def __init__(self, raised: StopIteration) -> None:
        super().__init__(f"user code raised StopIteration({raised})")
        self.raised = raised


def unwrap(error: BaseException) -> BaseException:
    """The exception user code raised, from what a future of this runner holds."""
    return error.raised if type(error) is RaisedStopIteration else error


class SyncRunner:
    def __init__(self, loop: asyncio.AbstractEventLoop, max_threads: int, name: str) -> None:
        self._loop = loop
        self._max_threads = max_threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._finished: list[_Finished] = []
        self._wake_scheduled = False

    def run(
        self, fn: Callable[..., Any], *args: Any, then: _Then | None = None
    ) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in a worker thread, in a copy of the caller's context.

        ``then(future)`` is called on the loop when ``fn`` has returned, in the same callback
        that completes the future (a done-callback would wait for another loop iteration),
        and also if the future was cancelled meanwhile: only once the thread is free again.
        """
        fut: asyncio.Future[Any] = self._loop.create_future()
        with self._lock:
            need_thread = self._idle == 0 and len(self._threads) < self._max_threads
            if not need_thread and self._idle:
                self._idle -= 1  # this job takes that idle worker
        if need_thread:
            self._add_thread()
        self._jobs.put((fut, contextvars.copy_context(), fn, args, then))
        return fut

    def _add_thread(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, ctx, fn, args, then = job
            value: Any = None
            error: BaseException | None = None
            if not fut.cancelled():
                try:
                    value = ctx.run(fn, *args)
                except BaseException as exc:  # delivered to the caller, never lost here
                    error = exc
            self._deliver((fut, value, error, then))
            del job, fut, ctx, fn, args, value, error, then
            with self._lock:
                self._idle += 1

    def _deliver(self, finished: _Finished) -> None:
        with self._lock:
            self._finished.append(finished)
            if self._wake_scheduled:
                return
            self._wake_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._complete)
        except RuntimeError:  # the loop is closed: the process is exiting
            pass

    def _complete(self) -> None:
        with self._lock:
            finished, self._finished = self._finished, []
            self._wake_scheduled = False
        for fut, value, error, then in finished:
            if not fut.cancelled():
                if error is None:
                    fut.set_result(value)
                elif isinstance(error, StopIteration):
                    fut.set_exception(RaisedStopIteration(error))
                else:
                    fut.set_exception(error)
            if then is not None:
                try:
                    then(fut)
                except Exception:  # the rest of the batch still gets its answers
                    logger.exception("completing a sync call failed")

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
