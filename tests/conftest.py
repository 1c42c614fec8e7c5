"""Shared fixtures: every test that starts a cluster shuts it down, and no process leaks."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

import serval as serve

# Every cluster this test session starts lives under one directory of its own (runtime dirs are
# made in the temp dir; subprocesses inherit TMPDIR), so the leak check below counts this
# session's processes only, not those of other sessions on the machine.
SESSION_TMP = tempfile.mkdtemp(prefix="serval-tests-")
os.environ["TMPDIR"] = SESSION_TMP
tempfile.tempdir = SESSION_TMP


def serval_processes(marker: str = SESSION_TMP) -> list[tuple[int, str]]:
    """(pid, command line) of every live serval process whose command line holds ``marker``
    (by default: every process of a cluster this test session started)."""
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
        if "serval::" in cmd and marker in cmd and state != "Z":
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
    yield
    serve.shutdown()
    leaked = serval_processes()
    assert not leaked, f"serval processes left running after the tests: {leaked}"
