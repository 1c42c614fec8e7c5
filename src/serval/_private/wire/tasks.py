"""Background tasks with an owner.

Every task serval starts in the background belongs to an object that outlives it — a client,
a peer, a replica, the proxy — through one ``TaskOwner``: the owner's ``close`` cancels every
task still running and waits for them to finish, so nothing runs on after its owner (and no
task is garbage-collected while pending). A task that fails is logged, never silently lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["TaskOwner"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class TaskOwner:
    """The tasks of one owner (``what`` names it in logs)."""

    __slots__ = ("_closed", "_tasks", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def spawn(
        self, coro: Coroutine[Any, Any, T], loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.Task[T]:
        """Run ``coro`` as a task of this owner's (on ``loop``, default the running one)."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.what} is closed: no new tasks")
        task = (loop or asyncio.get_running_loop()).create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("a task of %s failed", self.what, exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    def cancel(self) -> list[asyncio.Task[Any]]:
        """Cancel every task (from the owner's loop); the ones cancelled, to await."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks

    async def close(self) -> None:
        """Cancel every task and wait until each has finished."""
        tasks = self.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
