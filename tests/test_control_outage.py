"""The data plane does not wait for the controller: while it is stopped, killed, or restarting
slowly, handle calls and HTTP requests keep completing on the last replica table; only
changes (deploys, status) wait for it to come back."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import serval as serve
from conftest import poll, serval_processes
from serval._private.caller import runtime

OUTAGE_S = 2.0


@serve.deployment(num_replicas=2)
class Echo:
    def __call__(self, request: Any = None) -> str:
        return "ok"


def _controller_pids() -> set[int]:
    address = runtime.address()
    assert address is not None
    return {pid for pid, cmd in serval_processes(address) if "serval::controller " in cmd}


@pytest.fixture
def stopped() -> Iterator[set[int]]:
    """Pids this test SIGSTOPped; all of them get SIGCONT at the end, whatever happens."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def _traffic_for(seconds: float, handle: Any, url: str) -> tuple[int, int, float]:
    """Alternate handle calls and HTTP GETs for ``seconds``: (handle ok, http ok, longest
    wait for one answer). Any failure fails the test."""
    ok_handle = ok_http = 0
    longest = 0.0
    end = time.monotonic() + seconds
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < end:
            t0 = time.monotonic()
            assert handle.remote().result(timeout_s=10) == "ok"
            t1 = time.monotonic()
            r = client.get(url)
            assert r.status_code == 200, r.text
            t2 = time.monotonic()
            ok_handle, ok_http = ok_handle + 1, ok_http + 1
            longest = max(longest, t1 - t0, t2 - t1)
    return ok_handle, ok_http, longest


def _assert_flowed(figures: tuple[int, int, float]) -> None:
    ok_handle, ok_http, longest = figures
    # A call that waited for the controller would wait the whole outage.
    assert longest < OUTAGE_S / 2, f"a call waited {longest:.3f}s during the outage"
    assert ok_handle > 20 and ok_http > 20, figures


def test_calls_flow_while_the_controller_is_stopped(
    serve_instance: Any, http_url: str, stopped: set[int]
) -> None:
    handle = serve.run(Echo.bind())
    (pid,) = _controller_pids()
    os.kill(pid, signal.SIGSTOP)
    stopped.add(pid)
    _assert_flowed(_traffic_for(OUTAGE_S, handle, http_url))
    os.kill(pid, signal.SIGCONT)
    assert serve.status().applications["default"].status == "RUNNING"


def test_calls_flow_while_a_killed_controller_restarts_slowly(
    serve_instance: Any, http_url: str, stopped: set[int]
) -> None:
    handle = serve.run(Echo.bind())
    (old,) = _controller_pids()
    os.kill(old, signal.SIGKILL)

    def successor() -> int | None:
        fresh = _controller_pids() - {old}
        return next(iter(fresh), None)

    # The owner starts a new controller; stop it at once, as if its start-up were slow.
    new = poll(successor, 10, "the owner to start a new controller", interval=0.002)
    os.kill(new, signal.SIGSTOP)
    stopped.add(new)
    _assert_flowed(_traffic_for(OUTAGE_S, handle, http_url))
    # Changes wait for the controller, and go through once it is back.
    os.kill(new, signal.SIGCONT)
    serve.run(Echo.options(num_replicas=1).bind())

    def scaled_down() -> bool:
        echo = serve.status().applications["default"].deployments["Echo"]
        return echo.replica_states == {"RUNNING": 1}

    poll(scaled_down, 30, "the scale-down to finish")
    assert handle.remote().result(timeout_s=10) == "ok"
