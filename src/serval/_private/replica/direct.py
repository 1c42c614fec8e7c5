"""Calls that reach a replica on a thread of their own instead of through its sockets: a call by
reference is a Ray actor call, executed on one of Ray's threads for the replica's actor.

A sync method runs right there, on Ray's thread, as a bare Ray actor's method would: handing it
to the replica's loop and back costs two thread switches, which on Ray's scale is most of a
call. An async method runs on the replica's loop, Ray's thread waiting for it. Either way the
call takes one of the replica's ``max_ongoing_requests`` slots first (waiting here while none is
free), and it counts in the replica's metrics and its drain like any call.

The slots are shared with the replica's loop, so both sides count under one lock (``lock``):
the loop's admissions (``Replica._take_slot``) and these.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
import time
from collections.abc import Callable, Sized
from typing import Any, Protocol

from serval._private.replica.methods import Kind, check_stream, sync_with_context, with_context
from serval._private.telemetry import metrics
from serval.config import DeploymentConfig
from serval.exceptions import DeploymentUnavailableError, RequestCancelledError

__all__ = ["DirectCalls", "SlotOwner"]


class SlotOwner(Protocol):
    """What ``DirectCalls`` needs of its replica (``server.Replica``)."""

    replica_id: str
    deployment: str
    config: DeploymentConfig
    loop: asyncio.AbstractEventLoop
    ongoing: int  # the loop's calls running (changed under ``DirectCalls.lock``)
    draining: bool

    @property
    def backlog(self) -> Sized:
        """The loop's calls waiting for a slot (changed under ``DirectCalls.lock`` too)."""

    def method(self, name: str) -> tuple[Callable[..., Any], Kind]: ...

    def slot_freed(self) -> None:
        """(On the loop) a slot is free: start what waits there; a drain may be over."""


_CANCEL_POLL_S = 0.1  # how often a thread waiting for an async method asks if it is cancelled


class DirectCalls:
    """The calls a replica serves on other threads than its loop's: their slots, counts and
    latency (merged into the replica's metrics)."""

    def __init__(self, replica: SlotOwner) -> None:
        self._replica = replica
        self.lock = threading.Lock()
        self._freed = threading.Condition(self.lock)
        self.ready = threading.Event()  # the user object is made: calls may run
        self.closed = False  # drained: nothing more runs
        self.ongoing = 0
        self.waiting = 0  # calls waiting here for a slot: the replica's queue, as its backlog
        self.finished = 0
        self.failed = 0
        self.latency = metrics.HistogramSeries(metrics.LATENCY_BOUNDARIES_MS)

    def serve(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        meta: Any,
        cancelled: Callable[[], bool] | None = None,
    ) -> Any:
        """On the calling thread: the value of ``method(*args, **kwargs)``, or its error.
        ``cancelled`` tells whether the caller has given up (polled while an async method
        runs on the loop; a sync method cannot be interrupted, on any backend)."""
        self.ready.wait()
        replica = self._replica
        fn, kind = replica.method(method)
        check_stream(kind, False, replica.deployment, fn)
        self._take_slot()
        started = time.perf_counter()
        failed = True
        try:
            if kind is Kind.SYNC:
                # A context of its own: what user code sets in it ends with the call.
                value = contextvars.Context().run(sync_with_context, meta, fn, args, kwargs)
            else:
                value = self._on_loop(with_context(meta, fn, args, kwargs), cancelled)
            failed = False
            return value
        except RequestCancelledError:
            failed = False  # (a cancellation is no failure)
            raise
        finally:
            self._give_slot(started, failed)

    def _on_loop(self, coro: Any, cancelled: Callable[[], bool] | None) -> Any:
        running = asyncio.run_coroutine_threadsafe(coro, self._replica.loop)
        while True:
            try:
                return running.result(_CANCEL_POLL_S if cancelled is not None else None)
            except concurrent.futures.TimeoutError:
                if cancelled is not None and cancelled():
                    running.cancel()  # (its coroutine too; the next result() raises)
            except concurrent.futures.CancelledError:  # the caller's, or the loop shut down
                raise RequestCancelledError(
                    f"{self._replica.deployment} call was cancelled"
                ) from None

    def _take_slot(self) -> None:
        replica = self._replica
        with self.lock:
            while True:
                if self.closed:
                    raise DeploymentUnavailableError(
                        f"replica {replica.replica_id} has stopped; call again"
                    )
                if self.has_room():
                    break
                self.waiting += 1
                try:
                    self._freed.wait()
                finally:
                    self.waiting -= 1
            self.ongoing += 1

    def _give_slot(self, started: float, failed: bool) -> None:
        replica = self._replica
        with self.lock:
            self.ongoing -= 1
            self.finished += 1
            self.failed += failed
            self.latency.observe((time.perf_counter() - started) * 1e3)
            if self.waiting:
                self._freed.notify()
            # The loop has calls queued for this slot, or waits for the last call to drain.
            wake_loop = bool(replica.backlog) or replica.draining
        if wake_loop:
            replica.loop.call_soon_threadsafe(replica.slot_freed)

    def has_room(self) -> bool:
        """(``lock`` held) a slot of ``max_ongoing_requests`` is free: the loop's calls and
        these together are fewer."""
        replica = self._replica
        return replica.ongoing + self.ongoing < replica.config.max_ongoing_requests

    def slot_freed_on_loop(self) -> None:
        """(Under ``lock``, from the loop) a slot was freed there: one waiter here may take it."""
        if self.waiting:
            self._freed.notify()

    def close_if_idle(self) -> bool:
        """Close, if no call runs or waits here (the replica's drain is then over)."""
        with self.lock:
            if self.ongoing or self.waiting:
                return False
            self.closed = True
            return True

    def close(self) -> None:
        """The drain is over (or its time is up): calls that come now are refused, and those
        waiting for a slot too."""
        with self.lock:
            self.closed = True
            self._freed.notify_all()
