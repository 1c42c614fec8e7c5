"""Small pieces both benchmarks use."""

from __future__ import annotations

import signal
import socket
from typing import Any


def free_port() -> int:
    """A TCP port nobody listens on now (8000 may be taken by another cluster here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwind through the finally blocks that clean up


def exit_cleanly_on_sigterm() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
