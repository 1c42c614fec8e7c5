"""Shared fixtures: every test that starts a cluster shuts it down, and no process leaks."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

import serval as serve


def serval_processes() -> list[tuple[int, str]]:
    """(pid, command line) of every live serval process on this machine."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if "serval::" in cmd and state != "Z":
            found.append((int(entry), cmd))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_current_port = [0]


@pytest.fixture
def serve_instance() -> Iterator[object]:
    """A fresh local cluster for one test, its HTTP proxy on a free port; shut down after."""
    _current_port[0] = free_port()
    serve.start(http_options={"port": _current_port[0]})
    try:
        yield serve
    finally:
        serve.shutdown()


@pytest.fixture
def http_url(serve_instance: object) -> str:
    """Base URL of the HTTP proxy of the ``serve_instance`` cluster."""
    return f"http://127.0.0.1:{_current_port[0]}"


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes() -> Iterator[None]:
    before = {pid for pid, _ in serval_processes()}
    yield
    serve.shutdown()
    leaked = [(pid, cmd) for pid, cmd in serval_processes() if pid not in before]
    assert not leaked, f"serval processes left running after the tests: {leaked}"
