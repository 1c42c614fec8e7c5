"""Shared fixtures: every test that starts a cluster shuts it down, and no process leaks."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any, Self, TypeVar

import pytest

import serval as serve
from chaos.harness import free_port, wait_for
from serval._private.caller import runtime

T = TypeVar("T")

# Every cluster this test session starts lives under one directory of its own (runtime dirs are
# made in the temp dir; subprocesses inherit TMPDIR), so the leak check below counts this
# session's processes only, not those of other sessions on the machine.
SESSION_TMP = tempfile.mkdtemp(prefix="serval-tests-")
# Ray's tests stay on loopback: Ray turns 127.0.0.1 into the machine's own address wherever it
# meets it (ray.init's address, _node_ip_address), where a loopback cluster does not listen;
# with this (read when ray is imported: the test modules import it after this file) it keeps
# 127.0.0.1 as it is.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
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


def ray_processes() -> list[tuple[int, str]]:
    """(pid, command line) of the live Ray processes (GCS, raylets, monitors) of the Ray
    instances this test session started: their command lines name the session's directory."""
    marker = os.path.join(SESSION_TMP, "ray")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and pid_alive(int(entry)):
            found.append((int(entry), cmd[:200]))
    return found


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def serval_descendants(root: int) -> dict[int, str]:
    """serval processes of this session below process ``root`` (pid -> command line)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    below: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in below:
                below.add(child)
                todo.append(child)
    return {pid: cmd for pid, cmd in serval_processes() if pid in below}


def replica_pids(app: str, deployment: str) -> dict[str, int]:
    """replica id -> pid of the live replica processes of ``app.deployment`` in the running
    cluster."""
    address = runtime.address()
    assert address is not None
    out = {}
    for pid, cmd in serval_processes(address):
        if f"serval::replica {app}.{deployment}#" in cmd:
            m = re.search(r"--replica-id (\S+)", cmd)
            assert m, cmd
            out[m.group(1)] = pid
    return out


def poll(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and
    return that; raise AssertionError naming ``what`` once ``timeout`` seconds have passed."""
    return wait_for(predicate, timeout, what, interval)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(url: str, timeout: float) -> list[tuple[str, dict[str, str], float]]:
    """The samples at ``url``/-/metrics (Prometheus text): (name, labels, value)."""
    import httpx

    reply = httpx.get(f"{url}/-/metrics", timeout=timeout)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = []
    for line in reply.text.splitlines():
        if line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m is not None, f"not a sample line: {line!r}"
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.append((m.group(1), labels, float(m.group(3))))
    return out


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for n, lbl, v in samples if n == name and labels.items() <= lbl.items())


class BackgroundThreads:
    """A context for work in background threads: entering it starts ``self.threads`` (as
    daemons); leaving it sets ``self.stop`` and asserts that every thread finished within 15 s."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        for t in self.threads:
            t.daemon = True
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)
            assert not t.is_alive(), f"a {type(self).__name__} thread did not finish"


# Autoscaling that starts at zero replicas, scales up to two on demand and back to zero when idle.
SCALE_TO_ZERO: dict[str, Any] = {
    "min_replicas": 0,
    "initial_replicas": 0,
    "max_replicas": 2,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 1,
    "metrics_interval_s": 0.2,
    "look_back_period_s": 1,
}


_current_port = [0]


@pytest.fixture
def serve_instance() -> Iterator[object]:
    """A fresh local cluster for one test, its HTTP proxy on a free port; shut down after."""
    _current_port[0] = free_port()
    # (no dashboard: its own tests start clusters with one; a process less per test here)
    serve.start(http_options={"port": _current_port[0]}, dashboard_options={"port": 0})
    try:
        yield serve
    finally:
        serve.shutdown()


@pytest.fixture
def http_url(serve_instance: object) -> str:
    """Base URL of the HTTP proxy of the ``serve_instance`` cluster."""
    return f"http://127.0.0.1:{_current_port[0]}"


_cluster_port = [0]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """One local cluster for all the tests of a module that ask for it; shut down after them."""
    _cluster_port[0] = free_port()
    serve.start(http_options={"port": _cluster_port[0]}, dashboard_options={"port": 0})
    yield
    serve.shutdown()


@pytest.fixture
def cluster_url(apps: None) -> str:
    """Base URL of the HTTP proxy of the module's ``cluster`` (apps deleted after the test)."""
    return f"http://127.0.0.1:{_cluster_port[0]}"


@pytest.fixture
def apps(cluster: None) -> Iterator[None]:
    """The module's cluster; every app a test deploys is deleted after it."""
    yield
    for name in list(serve.status().applications):
        serve.delete(name)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_processes() -> Iterator[None]:
    yield
    serve.shutdown()
    leaked = serval_processes()
    assert not leaked, f"serval processes left running after the tests: {leaked}"
    ray_left = ray_processes()
    assert not ray_left, f"Ray processes left running after the tests: {ray_left}"
    # Nothing left running: this session's temporary files go too (pytest's tmp_path among
    # them); a session that leaked keeps them, to look at.
    shutil.rmtree(SESSION_TMP, ignore_errors=True)
