"""Tie a process's life to the cluster owner's, even across SIGKILL.

The owner keeps the write end of a pipe and never writes to it; every process of its cluster
inherits the read end. When the owner dies, however it dies, the kernel closes the write end and
every read end becomes readable at EOF: each process then exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

logger = logging.getLogger(__name__)


def create() -> tuple[int, int]:
    """(read_fd, write_fd); only the read end is ever passed to children."""
    read_fd, write_fd = os.pipe()
    os.set_inheritable(read_fd, False)
    os.set_inheritable(write_fd, False)
    return read_fd, write_fd


def watch(loop: asyncio.AbstractEventLoop, read_fd: int, on_owner_gone: Callable[[], None]) -> None:
    """Call ``on_owner_gone`` (once) when the owner's end closes."""

    def readable() -> None:
        try:
            data = os.read(read_fd, 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            return  # nobody writes; ignore stray bytes
        loop.remove_reader(read_fd)
        logger.info("cluster owner is gone; exiting")
        on_owner_gone()

    os.set_blocking(read_fd, False)
    loop.add_reader(read_fd, readable)
