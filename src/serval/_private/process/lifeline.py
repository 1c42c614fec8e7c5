"""Tie a process's life to the cluster owner's, even across SIGKILL.

The owner keeps the write end of a pipe and never writes to it; every process of its cluster
inherits the read end. When the owner dies, however it dies, the kernel closes the write end and
every read end becomes readable at EOF: each process then exits.

The read end is watched from a thread of its own, blocked in ``poll``, not from the event loop:
a replica whose loop is blocked by user code (``time.sleep`` in an ``async def``) must still
leave with its owner.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable


def create() -> tuple[int, int]:
    """(read_fd, write_fd); only the read end is ever passed to children."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, False)
    os.set_inheritable(write_fd, False)
    return read_fd, write_fd


def watch(read_fd: int, on_owner_gone: Callable[[], None]) -> threading.Thread:
    """Call ``on_owner_gone`` (once, from a daemon thread) when the owner's end closes.

    It should not log or take locks user code may hold: it is the way out of a process whose
    other threads may be stuck anywhere (a replica's ``os._exit`` straight away)."""
    thread = threading.Thread(
        target=_wait_for_eof, args=(read_fd, on_owner_gone), name="serval-lifeline", daemon=True
    )
    thread.start()
    return thread


def _wait_for_eof(read_fd: int, on_owner_gone: Callable[[], None]) -> None:
    # Every process of the cluster shares this pipe's open file description, so whether its
    # reads block is not this process's to decide: poll first, and take EAGAIN as "not yet".
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    while True:
        poller.poll()
        try:
            if os.read(read_fd, 1) == b"":
                break  # EOF: the owner's end is closed
        except BlockingIOError:
            continue
        except OSError:
            break
        # a byte: nobody writes to the lifeline, so ignore it
    on_owner_gone()
