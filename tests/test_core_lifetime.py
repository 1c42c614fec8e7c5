"""Lifetime: shutdown and interpreter exit leave nothing behind; SIGKILL of the owner takes
the whole cluster down, its runtime directory with it; every process names its role."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import serval as serve
from conftest import free_port, poll, serval_descendants, serval_processes

KILL_DEADLINE_S = 5.0


def _alive(pids) -> list[int]:
    live = {pid for pid, _ in serval_processes()}
    return [pid for pid in pids if pid in live]


def _wait_gone(pids, timeout: float) -> float:
    start = time.monotonic()
    while _alive(pids):
        if time.monotonic() - start > timeout:
            raise AssertionError(
                f"serval processes still alive {timeout}s later: "
                f"{[(p, c) for p, c in serval_processes() if p in pids]}"
            )
        time.sleep(0.02)
    return time.monotonic() - start


def _address(procs: dict[int, str]) -> str:
    """The runtime directory the cluster's command lines name."""
    found = {m.group(1) for c in procs.values() if (m := re.search(r"--address (\S+)", c))}
    (address,) = found
    return address


def _check_roles(cmds: list[str], replicas: list[str]) -> None:
    """One controller, at most one HTTP proxy, exactly these replicas, nothing else."""
    assert sum("serval::controller " in c for c in cmds) == 1, cmds
    assert sum("serval::proxy " in c for c in cmds) <= 1, cmds
    for label in replicas:
        assert sum(f"serval::replica {label} " in c for c in cmds) == 1, (label, cmds)
    assert sum("serval::replica " in c for c in cmds) == len(replicas), cmds


@serve.deployment(num_replicas=2)
class Model:
    def __call__(self) -> int:
        return os.getpid()


@serve.deployment
class Front:
    def __init__(self, model) -> None:
        self.model = model

    async def __call__(self) -> int:
        return await self.model.remote()


def test_process_roles_in_command_lines() -> None:
    serve.start(http_options={"port": free_port()})
    try:
        serve.run(Front.bind(Model.bind()))
        cmds = sorted(serval_descendants(os.getpid()).values())
        _check_roles(cmds, ["default.Model#0", "default.Model#1", "default.Front#0"])
    finally:
        serve.shutdown()


def test_shutdown_leaves_no_process() -> None:
    serve.start(http_options={"port": free_port()})
    try:
        handle = serve.run(Front.bind(Model.bind()))
        replica_pid = handle.remote().result(timeout_s=10)
        ours = serval_descendants(os.getpid())
        assert replica_pid in ours
        _check_roles(list(ours.values()), ["default.Model#0", "default.Model#1", "default.Front#0"])
    finally:
        serve.shutdown()
    # shutdown() is blocking: nothing of the cluster remains when it returns
    assert _alive(ours) == []
    assert serval_descendants(os.getpid()) == {}
    assert serve.status().applications == {}


def test_shutdown_twice_and_restart() -> None:
    serve.shutdown()  # no cluster: a no-op
    serve.start(http_options={"port": free_port()})
    try:
        first = serval_descendants(os.getpid())
        serve.shutdown()
        serve.shutdown()
        assert _alive(first) == []
        serve.start(http_options={"port": free_port()})  # a new cluster
        handle = serve.run(Front.bind(Model.bind()))
        assert isinstance(handle.remote().result(timeout_s=10), int)
    finally:
        serve.shutdown()
    assert serval_descendants(os.getpid()) == {}


DRIVER = textwrap.dedent(
    """
    import os, sys
    import serval as serve

    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})

    @serve.deployment(num_replicas=2)
    class Model:
        def __call__(self, x):
            return (x, os.getpid())

    @serve.deployment
    def greet(name):
        return "hello " + name

    handle = serve.run(Model.bind())
    value, pid = handle.remote(1).result(timeout_s=10)
    assert value == 1 and pid != os.getpid()
    serve.run(greet.bind(), name="fn", route_prefix="/fn")
    assert serve.get_app_handle("fn").remote("x").result(timeout_s=10) == "hello x"
    print("READY", flush=True)
    sys.stdin.readline()  # the test tells us when to go
    mode = sys.argv[1]
    if mode == "raise":
        raise SystemExit("driver failing on purpose")
    if mode == "hang":
        import threading
        threading.Event().wait()
    # mode == "exit": fall off the end without calling serve.shutdown()
    """
)


def _start_driver(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], dict[int, str]]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(free_port())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"driver did not start: {line!r}\n{err}")
    procs = serval_descendants(proc.pid)
    _check_roles(list(procs.values()), ["default.Model#0", "default.Model#1", "fn.greet#0"])
    return proc, procs


@pytest.mark.parametrize("mode", ["exit", "raise"])
def test_driver_exiting_leaves_nothing_behind(tmp_path: Path, mode: str) -> None:
    proc, procs = _start_driver(tmp_path, mode)
    try:
        _, err = proc.communicate("go\n", timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == (0 if mode == "exit" else 1), err
    assert "Traceback" not in err or mode == "raise", err
    _wait_gone(procs, timeout=KILL_DEADLINE_S)
    assert not os.path.exists(_address(procs))


def test_driver_sigkill_takes_the_cluster_down(tmp_path: Path) -> None:
    proc, procs = _start_driver(tmp_path, "hang")
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        elapsed = _wait_gone(procs, timeout=KILL_DEADLINE_S)
        # The runtime directory too (sockets, and the checkpoint with the pickled code).
        poll(
            lambda: not os.path.exists(_address(procs)),
            KILL_DEADLINE_S - elapsed,
            "the runtime directory to be removed",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _alive(procs):  # never leave a stray cluster behind, even on failure
            os.kill(pid, signal.SIGKILL)
    assert elapsed < KILL_DEADLINE_S
