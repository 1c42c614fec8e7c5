"""Graceful shutdown: on delete, redeploy and shutdown a replica stops taking new requests and
lets in-flight ones finish, up to graceful_shutdown_timeout_s; past it, the replica is stopped
and the request fails with a clear error, never hangs."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import serval as serve
from conftest import pid_alive, poll
from serval.exceptions import ServalError

DEADLINE_S = 10.0
SLOW_S = 1.0


@serve.deployment(max_ongoing_requests=10)
class Slow:
    def __init__(self, version: int = 1) -> None:
        self.version = version

    def slow_sync(self, seconds: float, marker: str) -> dict[str, Any]:
        Path(marker).write_text(str(os.getpid()))
        time.sleep(seconds)
        return {"version": self.version, "pid": os.getpid()}

    async def slow_async(self, seconds: float, marker: str) -> dict[str, Any]:
        Path(marker).write_text(str(os.getpid()))  # noqa: ASYNC240 - tiny marker file
        await asyncio.sleep(seconds)
        return {"version": self.version, "pid": os.getpid()}

    def quick(self) -> dict[str, Any]:
        return {"version": self.version, "pid": os.getpid()}


METHODS = ["slow_sync", "slow_async"]


def _start_slow(handle: Any, method: str, seconds: float, marker: Path) -> tuple[Any, int]:
    """Send a slow request; return its response and the pid of the replica running it."""
    response = getattr(handle, method).remote(seconds, str(marker))
    poll(marker.exists, timeout=DEADLINE_S, what="the slow request to start", interval=0.02)
    poll(
        marker.read_text,
        timeout=DEADLINE_S,
        what="the marker file to hold the replica's pid",
        interval=0.02,
    )
    return response, int(marker.read_text())


@pytest.mark.parametrize("method", METHODS)
def test_delete_lets_in_flight_requests_finish(
    serve_instance: Any, tmp_path: Path, method: str
) -> None:
    handle = serve.run(Slow.bind())
    responses, pid = [], 0
    for i in range(3):
        r, pid = _start_slow(handle, method, SLOW_S, tmp_path / f"m{i}")
        responses.append(r)
    start = time.monotonic()
    serve.delete("default")  # blocks until the replicas are gone
    elapsed = time.monotonic() - start
    assert elapsed < SLOW_S + 3, f"delete took {elapsed:.1f}s"
    for r in responses:
        assert r.result(timeout_s=DEADLINE_S) == {"version": 1, "pid": pid}
    assert "default" not in serve.status().applications
    poll(lambda: not pid_alive(pid), timeout=DEADLINE_S, what="the replica to exit", interval=0.02)


def test_no_new_requests_while_deleting(serve_instance: Any, tmp_path: Path) -> None:
    """While the app drains, a new request is refused at once (it neither reaches the
    draining replica nor hangs); the in-flight one still finishes."""
    handle = serve.run(Slow.bind())
    in_flight, pid = _start_slow(handle, "slow_async", 2.0, tmp_path / "m")
    deleter = threading.Thread(target=serve.delete, args=("default",))
    deleter.start()
    try:
        poll(
            lambda: (
                serve.status().applications.get("default") is None
                or serve.status().applications["default"].status == "DELETING"
            ),
            timeout=DEADLINE_S,
            what="the app to be deleting",
            interval=0.02,
        )
        start = time.monotonic()
        with pytest.raises(ServalError):
            handle.quick.remote().result(timeout_s=DEADLINE_S)
        assert time.monotonic() - start < 2.0
        assert in_flight.result(timeout_s=DEADLINE_S) == {"version": 1, "pid": pid}
    finally:
        deleter.join(DEADLINE_S)
    assert not deleter.is_alive()


@pytest.mark.parametrize("method", METHODS)
def test_redeploy_lets_in_flight_requests_finish(
    serve_instance: Any, tmp_path: Path, method: str
) -> None:
    handle = serve.run(Slow.bind(1))
    in_flight, old_pid = _start_slow(handle, method, SLOW_S + 1, tmp_path / "m")

    handle = serve.run(Slow.bind(2))  # new code: a new replica replaces the old one
    # While the old replica drains, new requests go to the new one.
    fresh = handle.quick.remote().result(timeout_s=DEADLINE_S)
    assert fresh["version"] == 2 and fresh["pid"] != old_pid

    assert in_flight.result(timeout_s=DEADLINE_S) == {"version": 1, "pid": old_pid}
    poll(
        lambda: not pid_alive(old_pid),
        timeout=DEADLINE_S,
        what="the old replica to exit",
        interval=0.02,
    )
    for _ in range(5):
        assert handle.quick.remote().result(timeout_s=DEADLINE_S)["version"] == 2


@pytest.mark.parametrize("method", METHODS)
def test_graceful_shutdown_timeout_stops_the_replica_and_fails_the_request(
    serve_instance: Any, tmp_path: Path, method: str
) -> None:
    handle = serve.run(Slow.options(graceful_shutdown_timeout_s=0.5).bind())
    in_flight, pid = _start_slow(handle, method, 5.0, tmp_path / "m")
    start = time.monotonic()
    serve.delete("default")
    deleted_after = time.monotonic() - start
    assert deleted_after < 3.0, f"delete waited {deleted_after:.1f}s for a 0.5s grace period"
    assert not pid_alive(pid) or poll(
        lambda: not pid_alive(pid), timeout=2.0, what="the replica to exit", interval=0.02
    )

    with pytest.raises(ServalError) as info:
        in_flight.result(timeout_s=3.0)  # a clear error, not a hang (nor a GetTimeoutError)
    assert not isinstance(info.value, TimeoutError), info.value
    assert time.monotonic() - start < 4.0


def test_graceful_shutdown_timeout_on_redeploy(serve_instance: Any, tmp_path: Path) -> None:
    handle = serve.run(Slow.options(graceful_shutdown_timeout_s=0.5).bind(1))
    in_flight, old_pid = _start_slow(handle, "slow_async", 5.0, tmp_path / "m")
    start = time.monotonic()
    handle = serve.run(Slow.options(graceful_shutdown_timeout_s=0.5).bind(2))
    with pytest.raises(ServalError) as info:
        in_flight.result(timeout_s=4.0)
    assert not isinstance(info.value, TimeoutError), info.value
    assert time.monotonic() - start < 4.0
    poll(lambda: not pid_alive(old_pid), timeout=3.0, what="the old replica to exit", interval=0.02)
    assert handle.quick.remote().result(timeout_s=DEADLINE_S)["version"] == 2


@pytest.mark.parametrize("method", METHODS)
def test_shutdown_with_in_flight_work_finishes_it_and_returns_promptly(
    serve_instance: Any, tmp_path: Path, method: str
) -> None:
    handle = serve.run(Slow.bind())
    in_flight, pid = _start_slow(handle, method, SLOW_S, tmp_path / "m")
    start = time.monotonic()
    serve.shutdown()
    elapsed = time.monotonic() - start
    assert elapsed < SLOW_S + 3, f"shutdown took {elapsed:.1f}s"
    assert not pid_alive(pid)
    assert in_flight.result(timeout_s=1.0) == {"version": 1, "pid": pid}


def test_shutdown_past_the_grace_period_does_not_hang(serve_instance: Any, tmp_path: Path) -> None:
    handle = serve.run(Slow.options(graceful_shutdown_timeout_s=0.5).bind())
    in_flight, pid = _start_slow(handle, "slow_sync", 30.0, tmp_path / "m")
    start = time.monotonic()
    serve.shutdown()
    elapsed = time.monotonic() - start
    assert elapsed < 4.0, f"shutdown took {elapsed:.1f}s with a 0.5s grace period"
    assert not pid_alive(pid)
    with pytest.raises(ServalError) as info:
        in_flight.result(timeout_s=2.0)
    assert not isinstance(info.value, TimeoutError), info.value
