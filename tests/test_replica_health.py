"""Health and recovery: a replica whose check_health() raises or hangs, or that is SIGKILLed, is
replaced; requests in flight on a dead replica fail fast with ReplicaDiedError; requests waiting
at the caller go to another replica; the deployment returns to HEALTHY."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import serval as serve
from conftest import pid_alive, poll
from serval.exceptions import ReplicaDiedError

PERIOD_S = 0.5
TIMEOUT_S = 1.0
# A failing replica is replaced within one period + the timeout + this much (process start).
REPLACE_SLACK_S = 5.0
DEADLINE_S = 10.0


def deployment_status(name: str, app: str = "default") -> tuple[str, dict[str, int]]:
    dep = serve.status().applications[app].deployments[name]
    return dep.status, dep.replica_states


@serve.deployment(health_check_period_s=PERIOD_S, health_check_timeout_s=TIMEOUT_S)
class Patient:
    def __init__(self) -> None:
        self.mode = "ok"

    def set_mode(self, mode: str) -> None:
        self.mode = mode

    def check_health(self) -> None:
        if self.mode == "raise":
            raise RuntimeError("unhealthy on purpose")
        if self.mode == "hang_sync":
            time.sleep(3600)

    def identity(self) -> tuple[str, int]:
        return serve.get_replica_context().replica_id, os.getpid()

    def block(self, seconds: float, marker: str = "") -> tuple[str, int]:
        if marker:
            Path(marker).write_text(str(os.getpid()))
        time.sleep(seconds)
        return serve.get_replica_context().replica_id, os.getpid()


@serve.deployment(health_check_period_s=PERIOD_S, health_check_timeout_s=TIMEOUT_S)
class AsyncPatient:
    def __init__(self) -> None:
        self.mode = "ok"

    async def set_mode(self, mode: str) -> None:
        self.mode = mode

    async def check_health(self) -> None:
        if self.mode == "raise":
            raise RuntimeError("unhealthy on purpose")
        if self.mode == "hang_async":
            await asyncio.Event().wait()

    async def identity(self) -> tuple[str, int]:
        return serve.get_replica_context().replica_id, os.getpid()


def _replaced_within(handle: Any, old: tuple[str, int], limit: float) -> tuple[str, int]:
    start = time.monotonic()

    def new_identity() -> tuple[str, int] | None:
        try:
            ident = handle.identity.remote().result(timeout_s=DEADLINE_S)
        except ReplicaDiedError:
            return None  # raced with the kill: fine, ask again
        return ident if ident[0] != old[0] else None

    new = poll(new_identity, timeout=limit, what="a replacement replica")
    assert new[1] != old[1], "the replacement must be a new process"
    elapsed = time.monotonic() - start
    assert elapsed < limit, elapsed
    poll(lambda: not pid_alive(old[1]), timeout=DEADLINE_S, what="the old replica to exit")
    poll(
        lambda: deployment_status(handle.deployment_name) == ("HEALTHY", {"RUNNING": 1}),
        timeout=DEADLINE_S,
        what="the deployment to be HEALTHY again",
    )
    return new


@pytest.mark.parametrize(
    "dep,mode",
    [
        (Patient, "raise"),
        (AsyncPatient, "raise"),
        (Patient, "hang_sync"),
        (AsyncPatient, "hang_async"),
    ],
    ids=["sync-raise", "async-raise", "sync-hang", "async-hang"],
)
def test_unhealthy_replica_is_replaced(serve_instance: Any, dep: Any, mode: str) -> None:
    handle = serve.run(dep.bind())
    old = handle.identity.remote().result(timeout_s=DEADLINE_S)
    # Healthy for a few periods: not replaced.
    poll(
        lambda: serve.status().applications["default"].status == "RUNNING",
        timeout=DEADLINE_S,
        what="the app to be RUNNING",
    )
    assert handle.identity.remote().result(timeout_s=DEADLINE_S) == old

    handle.set_mode.remote(mode).result(timeout_s=DEADLINE_S)
    new = _replaced_within(handle, old, PERIOD_S + TIMEOUT_S + REPLACE_SLACK_S)
    # The replacement is healthy: it stays.
    assert handle.identity.remote().result(timeout_s=DEADLINE_S) == new


def test_healthy_replica_is_kept(serve_instance: Any) -> None:
    handle = serve.run(Patient.bind())
    old = handle.identity.remote().result(timeout_s=DEADLINE_S)
    deadline = time.monotonic() + 5 * PERIOD_S
    while time.monotonic() < deadline:  # several health checks pass meanwhile
        assert handle.identity.remote().result(timeout_s=DEADLINE_S) == old
        time.sleep(0.1)


@serve.deployment(
    max_ongoing_requests=1, health_check_period_s=PERIOD_S, health_check_timeout_s=TIMEOUT_S
)
class BusySync:
    def check_health(self) -> None:
        pass  # a sync health check: must not wait behind the user's sync requests

    def identity(self) -> tuple[str, int]:
        return serve.get_replica_context().replica_id, os.getpid()

    def block(self, seconds: float) -> tuple[str, int]:
        time.sleep(seconds)
        return serve.get_replica_context().replica_id, os.getpid()


def test_busy_replica_with_sync_check_health_stays_healthy(serve_instance: Any) -> None:
    """A replica whose every slot runs a slow sync request is busy, not unhealthy: its sync
    check_health must still answer within the timeout (DESIGN §6: sync methods run in a thread
    pool so they never block health checks)."""
    handle = serve.run(BusySync.bind())
    old = handle.identity.remote().result(timeout_s=DEADLINE_S)
    slow = PERIOD_S + TIMEOUT_S + 1.5  # several health checks come due meanwhile
    assert handle.block.remote(slow).result(timeout_s=DEADLINE_S) == old
    assert handle.identity.remote().result(timeout_s=DEADLINE_S) == old


def test_sigkilled_replica_fails_in_flight_request_fast_and_is_replaced(
    serve_instance: Any, tmp_path: Path
) -> None:
    handle = serve.run(Patient.bind())
    old = handle.identity.remote().result(timeout_s=DEADLINE_S)
    marker = tmp_path / "started"
    in_flight = handle.block.remote(30, str(marker))
    poll(marker.exists, timeout=DEADLINE_S, what="the slow request to start")

    os.kill(old[1], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(ReplicaDiedError):
        in_flight.result(timeout_s=DEADLINE_S)
    assert time.monotonic() - start < 2.0, "an in-flight request on a dead replica must fail fast"

    _replaced_within(handle, old, REPLACE_SLACK_S + 2)


def test_sigkilled_replica_async_caller_fails_fast(serve_instance: Any, tmp_path: Path) -> None:
    handle = serve.run(Patient.bind())
    old = handle.identity.remote().result(timeout_s=DEADLINE_S)
    marker = tmp_path / "started"

    async def main() -> float:
        response = handle.block.remote(30, str(marker))
        while not marker.exists():  # noqa: ASYNC110 - a file written by another process
            await asyncio.sleep(0.02)
        os.kill(old[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ReplicaDiedError):
            await response
        return time.monotonic() - start

    elapsed = asyncio.run(asyncio.wait_for(main(), DEADLINE_S))
    assert elapsed < 2.0
    _replaced_within(handle, old, REPLACE_SLACK_S + 2)


def test_requests_queued_at_the_caller_go_to_another_replica(
    serve_instance: Any, tmp_path: Path
) -> None:
    handle = serve.run(Patient.options(num_replicas=2, max_ongoing_requests=1).bind())
    victim_marker = tmp_path / "victim"
    other_marker = tmp_path / "other"
    victim_call = handle.block.remote(30, str(victim_marker))
    poll(victim_marker.exists, timeout=DEADLINE_S, what="the first request to start")
    other_call = handle.block.remote(1.0, str(other_marker))
    poll(other_marker.exists, timeout=DEADLINE_S, what="the second request to start")
    victim_pid = int(victim_marker.read_text())
    other_pid = int(other_marker.read_text())
    assert victim_pid != other_pid

    # Both replicas are full (max_ongoing_requests=1): these wait at the caller.
    queued = [handle.block.remote(0.05) for _ in range(4)]
    os.kill(victim_pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(ReplicaDiedError):
        victim_call.result(timeout_s=DEADLINE_S)
    assert time.monotonic() - start < 2.0

    assert other_call.result(timeout_s=DEADLINE_S)[1] == other_pid
    served_by = [r.result(timeout_s=DEADLINE_S)[1] for r in queued]
    assert victim_pid not in served_by, "no queued request may be sent to the dead replica"
    poll(
        lambda: deployment_status("Patient") == ("HEALTHY", {"RUNNING": 2}),
        timeout=DEADLINE_S,
        what="the deployment to be HEALTHY again",
    )


def test_no_call_hangs_while_the_only_replica_is_replaced(
    serve_instance: Any, tmp_path: Path
) -> None:
    """Calls made just after the kill either fail with ReplicaDiedError or succeed on the
    replacement, and all of them finish."""
    handle = serve.run(Patient.bind())
    old = handle.identity.remote().result(timeout_s=DEADLINE_S)
    os.kill(old[1], signal.SIGKILL)
    calls = [handle.identity.remote() for _ in range(10)]
    outcomes = []
    for c in calls:
        try:
            outcomes.append(c.result(timeout_s=DEADLINE_S))
        except ReplicaDiedError:
            outcomes.append("died")
    assert all(o == "died" or o[0] != old[0] for o in outcomes), outcomes
    _replaced_within(handle, old, REPLACE_SLACK_S + 2)
