"""When the owner dies, nothing of its cluster stays: no process for more than a few seconds
(even a replica whose event loop is blocked, or one stuck in C code holding the GIL, adopted
by a restarted controller), and no file (the runtime directory, with the checkpoint that
holds the user's pickled code, is removed). What a cluster could not remove itself is removed
by the next one this user starts, and never the directory of a live cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import serval as serve
from conftest import free_port, poll, serval_processes
from serval._private.caller import runtime

KILL_DEADLINE_S = 5.0

DRIVER = textwrap.dedent(
    """
    import os, re, sys, time
    import serval as serve
    from serval._private.caller import runtime

    markers, port, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    serve.start(http_options={"port": port}, dashboard_options={"port": int(sys.argv[4])})

    @serve.deployment
    class Blocker:
        async def sleep_in_the_loop(self):
            open(os.path.join(markers, "blocking"), "w").close()
            time.sleep(1000)  # blocks the replica's event loop

        def hold_the_gil(self):
            open(os.path.join(markers, "blocking"), "w").close()
            re.match(r"(a+)+$", "a" * 64 + "b")  # C code that keeps the GIL for ages

        def ping(self):
            return "pong"

    @serve.deployment(num_replicas=2)
    class Other:
        def __call__(self):
            return os.getpid()

    handle = serve.run(Blocker.bind(), route_prefix="/b")
    serve.run(Other.bind(), name="other", route_prefix="/o")
    assert handle.ping.remote().result(timeout_s=10) == "pong"
    if method != "none":
        getattr(handle, method).remote()
        while not os.path.exists(os.path.join(markers, "blocking")):
            time.sleep(0.01)
    print(runtime.address(), flush=True)
    sys.stdin.readline()
    """
)


class Driver:
    """A driver script owning a cluster of three replicas, a proxy and a dashboard; one replica
    blocked in ``method`` (unless ``"none"``)."""

    def __init__(self, tmp_path: Path, method: str) -> None:
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(tmp_path),
                str(free_port()),
                method,
                str(free_port()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=tmp_path,
        )
        assert self.proc.stdout is not None
        self.address = self.proc.stdout.readline().strip()
        if not self.address:
            self.proc.kill()
            pytest.fail(f"the driver did not start (exit code {self.proc.wait()})")
        self.pids = self.processes()
        roles = sorted(cmd.split("serval::", 1)[1].split()[0] for cmd in self.pids.values())
        expected = ["controller", "dashboard", "proxy", "replica", "replica", "replica"]
        assert roles == expected, roles

    def processes(self, role: str = "") -> dict[int, str]:
        return {p: c for p, c in serval_processes(self.address) if f"serval::{role}" in c}

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.processes():  # never leave a stray process, even when failing
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def driver_factory(tmp_path: Path) -> Iterator[list[Driver]]:
    drivers: list[Driver] = []
    yield drivers
    for d in drivers:
        d.cleanup()


def _answers(address: str) -> bool:
    """Whether anything accepts connections on the cluster's controller socket."""
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(os.path.join(address, "controller.sock"))
        except OSError:
            return False
    return True


def _all_gone(driver: Driver) -> float:
    """Seconds until no process of the driver's cluster is left and its directory is gone."""
    start = time.monotonic()
    poll(lambda: not driver.processes(), KILL_DEADLINE_S, "every process of the cluster to exit")
    poll(
        lambda: not os.path.exists(driver.address),
        KILL_DEADLINE_S,
        f"the runtime directory {driver.address} to be removed",
    )
    return time.monotonic() - start


def test_sigkilled_owner_takes_a_replica_blocked_in_its_event_loop(
    tmp_path: Path, driver_factory: list[Driver]
) -> None:
    driver = Driver(tmp_path, "sleep_in_the_loop")
    driver_factory.append(driver)
    assert os.path.exists(os.path.join(driver.address, "controller.ckpt"))
    driver.kill()
    assert _all_gone(driver) < KILL_DEADLINE_S


def test_an_adopted_replica_stuck_holding_the_gil_is_killed_with_its_owner(
    tmp_path: Path, driver_factory: list[Driver]
) -> None:
    driver = Driver(tmp_path, "hold_the_gil")
    driver_factory.append(driver)
    checkpoint = os.path.join(driver.address, "controller.ckpt")
    # A new controller adopts the replicas (by pid, from the checkpoint); the stuck one
    # cannot even answer it.
    (old,) = driver.processes("controller")
    restarted_at = time.time_ns()
    os.kill(old, signal.SIGKILL)
    poll(
        lambda: os.stat(checkpoint).st_mtime_ns > restarted_at,
        10,
        "the restarted controller to adopt the replicas and write its checkpoint",
    )
    (new,) = driver.processes("controller")
    assert new != old
    assert driver.processes("replica").keys() == {
        p for p, c in driver.pids.items() if "serval::replica" in c
    }
    driver.kill()
    # The stuck replica cannot act on the lifeline; the controller kills it.
    assert _all_gone(driver) < KILL_DEADLINE_S


def test_replicas_leave_on_their_own_and_the_next_start_removes_what_is_left(
    tmp_path: Path, driver_factory: list[Driver]
) -> None:
    (tmp_path / "live").mkdir()
    (tmp_path / "dying").mkdir()
    live = Driver(tmp_path / "live", "none")
    driver_factory.append(live)
    driver = Driver(tmp_path / "dying", "sleep_in_the_loop")
    driver_factory.append(driver)
    (controller,) = driver.processes("controller")
    # The controller frozen, the owner killed: the replica blocked in its loop and the proxy
    # still leave, each watching the lifeline from a thread of its own.
    os.kill(controller, signal.SIGSTOP)
    driver.kill()
    poll(
        lambda: driver.processes().keys() == {controller},
        KILL_DEADLINE_S,
        "the replicas and the proxy to exit without their controller",
    )
    os.kill(controller, signal.SIGKILL)
    # (Its main thread shows as a zombie before its other threads are gone with its sockets.)
    poll(
        lambda: not driver.processes() and not _answers(driver.address),
        5,
        "the frozen controller to die",
    )
    # Nobody was left to remove the directory, with the checkpoint (the user's code) in it.
    assert os.path.exists(os.path.join(driver.address, "controller.ckpt"))

    # Directories that are no one's leftovers, which a start must not touch.
    starting = tempfile.mkdtemp(prefix="serval-")  # a cluster being created: nothing in it yet
    unowned = tempfile.mkdtemp(prefix="serval-")  # an owner that has not recorded itself yet
    Path(unowned, "controller.sock").touch()

    serve.start(http_options={"port": free_port()})
    try:
        assert not os.path.exists(driver.address)
        assert os.path.isdir(live.address) and live.processes().keys() == live.pids.keys()
        assert os.path.isdir(starting) and os.path.isdir(unowned)
        mine = runtime.address()
        assert mine is not None and os.path.isdir(mine)
    finally:
        serve.shutdown()
        os.rmdir(starting)
        os.unlink(os.path.join(unowned, "controller.sock"))
        os.rmdir(unowned)
    assert live.proc.stdin is not None
    live.proc.stdin.write("\n")
    live.proc.stdin.close()
    assert live.proc.wait(timeout=30) == 0
    poll(lambda: not os.path.exists(live.address), 10, "the live driver's directory to go")


def test_a_sigkilled_serval_start_daemon_leaves_nothing_but_its_log() -> None:
    address = os.path.join(tempfile.mkdtemp(prefix="own-"), "c")  # short: socket paths
    serval = os.path.join(os.path.dirname(sys.executable), "serval")
    port = str(free_port())
    started = subprocess.run(
        [
            serval,
            "start",
            "--address",
            address,
            "--port",
            port,
            "--dashboard-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert started.returncode == 0, started.stderr
        processes = dict(serval_processes(address))
        (daemon,) = [p for p, c in processes.items() if "serval::daemon " in c]
        assert len(processes) == 4  # daemon, controller, proxy, dashboard
        os.kill(daemon, signal.SIGKILL)
        poll(lambda: not serval_processes(address), KILL_DEADLINE_S, "the cluster to exit")
        poll(lambda: not os.path.exists(address), KILL_DEADLINE_S, "its directory to go")
        assert os.path.exists(f"{address}.log")  # the log stays, for whoever looks for it
    finally:
        for pid, _ in serval_processes(address):
            os.kill(pid, signal.SIGKILL)
