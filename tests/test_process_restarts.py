"""A component that cannot start is a clear error, never a silent hang; one that dies is
restarted with back-off.

Faults are real: a thread SIGKILLs the component's processes as soon as they appear (as a
crash at start-up would end them). A proxy that never gets ready makes ``serve.start()`` raise
``ServalError`` naming it, how it ended and where its log is; a proxy that dies after it has
served, and a controller that keeps dying, are restarted less and less often, while handle
calls keep flowing."""

from __future__ import annotations

import itertools
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Self

import httpx
import pytest

import serval as serve
from conftest import free_port, poll, serval_processes
from serval._private.caller import runtime
from serval.exceptions import ServalError


class Killer(threading.Thread):
    """SIGKILLs each serval process whose command line ``matches`` as soon as it appears, up
    to ``limit`` of them; ``seen`` holds (time it was found, pid, command line)."""

    def __init__(self, matches: Callable[[str], bool], limit: int = 1_000) -> None:
        super().__init__(daemon=True)
        self.matches = matches
        self.limit = limit
        self.seen: list[tuple[float, int, str]] = []
        self.done = threading.Event()

    def run(self) -> None:
        killed: set[int] = set()
        while not self.done.is_set() and len(killed) < self.limit:
            for pid, cmd in serval_processes():
                if pid not in killed and self.matches(cmd):
                    self.seen.append((time.monotonic(), pid, cmd))
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
            time.sleep(0.003)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join(timeout=5)

    def gaps(self) -> list[float]:
        times = [t for t, _, _ in self.seen]
        return [b - a for a, b in itertools.pairwise(times)]


def _with_port(role: str, port: int) -> Callable[[str], bool]:
    pattern = re.compile(rf"serval::{role} .*\"port\": {port}\b")
    return lambda cmd: bool(pattern.search(cmd))


def _address_of(cmd: str) -> str:
    m = re.search(r"--address (\S+)", cmd)
    assert m, cmd
    return m.group(1)


@serve.deployment
class Hello:
    def __call__(self, request: Any = None) -> str:
        return "hello"


def test_a_proxy_that_cannot_start_fails_serve_start(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    with Killer(_with_port("proxy", port)) as killer:
        started = time.monotonic()
        with pytest.raises(ServalError) as info:
            serve.start(http_options={"port": port})
        elapsed = time.monotonic() - started
    message = str(info.value)
    assert "the HTTP proxy could not start: it exited 3 times in a row before it was ready" in (
        message
    ), message
    assert "killed by SIGKILL" in message and "its log is in" in message, message
    assert len(killer.seen) == 3
    gaps = killer.gaps()  # restarts after 0.5 s, then 1 s
    assert gaps[0] >= 0.5 and gaps[1] >= 1.0, gaps
    assert elapsed < 20

    # The cluster that could not start is gone, and the next start is a fresh one.
    assert runtime.address() is None
    address = _address_of(killer.seen[0][2])
    poll(lambda: not serval_processes(address), 10, "the failed cluster's processes to exit")
    assert not os.path.exists(address)
    serve.start(http_options={"port": port})
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=10).status_code == 200
    finally:
        serve.shutdown()


def test_a_proxy_that_dies_after_serving_is_restarted_with_backoff(http_url: str) -> None:
    serve.run(Hello.bind(), route_prefix="/hello")
    address = runtime.address()
    assert address is not None

    def proxies() -> list[int]:
        return [p for p, c in serval_processes(address) if "serval::proxy " in c]

    def serving() -> bool:
        try:
            return httpx.get(f"{http_url}/hello", timeout=2).text == "hello"
        except httpx.HTTPError:
            return False

    downtimes = []
    for _ in range(3):
        (pid,) = proxies()
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        poll(lambda p=pid: proxies() not in ([], [p]) and serving(), 20, "a restarted proxy")
        downtimes.append(time.monotonic() - killed_at)
    # Back-off: restarted after 0.5 s, 1 s, 2 s (each had served, so none is a failure).
    assert downtimes[1] >= 1.0 and downtimes[2] >= 2.0, downtimes
    assert serve.status().applications["default"].status == "RUNNING"


def test_a_controller_that_keeps_dying_is_restarted_with_backoff(
    serve_instance: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="serval._private.process.cluster")
    handle = serve.run(Hello.bind())
    address = runtime.address()
    assert address is not None
    assert handle.remote().result(timeout_s=10) == "hello"
    outcomes: list[tuple[float, str | None]] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                handle.remote().result(timeout_s=5)
                outcomes.append((time.monotonic(), None))
            except Exception as exc:
                outcomes.append((time.monotonic(), f"{type(exc).__name__}: {exc}"))
            time.sleep(0.005)

    caller = threading.Thread(target=traffic, daemon=True)
    caller.start()
    try:
        # The controller and three restarts of it die as soon as they appear.
        with Killer(lambda c: "serval::controller " in c and f" {address} " in c, 4) as killer:
            poll(lambda: len(killer.seen) == 4, 30, "four controllers to die")
        # A fourth death in a row: the owner says so, and waits 1.6 s before the next try.
        with pytest.raises(ServalError, match="keeps dying"):
            serve.status()
        restarted = poll(
            lambda: [p for p, c in serval_processes(address) if "serval::controller " in c],
            10,
            "the fifth controller",
        )
        restart_seen = time.monotonic()
        poll(lambda: _status_works(), 10, "serve.status() to work again")
    finally:
        stop.set()
        caller.join(timeout=10)
    gaps = killer.gaps()  # restarts after 0.2 s, 0.4 s, 0.8 s (and 1.6 s for the fifth)
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8, gaps
    assert restart_seen - killer.seen[-1][0] >= 1.6
    assert restarted[0] not in [pid for _, pid, _ in killer.seen]
    text = caplog.text
    assert "the serval controller died (killed by SIGKILL); restarting it in 0.2s" in text
    assert "keeps dying (3 times in a row, last killed by SIGKILL); its log is in" in text

    # Handle calls flowed all along, the controller down or not.
    errors = [e for _, e in outcomes if e]
    assert errors == []
    during = [t for t, _ in outcomes if killer.seen[0][0] < t < killer.seen[-1][0]]
    assert len(during) > 10


def _status_works() -> bool:
    try:
        return serve.status().applications["default"].status == "RUNNING"
    except ServalError:
        return False


def test_a_controller_that_dies_at_start_up_is_an_error_naming_its_log() -> None:
    port = free_port()
    with Killer(_with_port("controller", port)), pytest.raises(ServalError) as info:
        serve.start(http_options={"port": port})
    message = str(info.value)
    assert "the serval controller exited at start-up (killed by SIGKILL)" in message, message
    assert "its log is in" in message
    assert runtime.address() is None


def test_a_proxy_that_can_no_longer_start_fails_serve_run(http_url: str) -> None:
    handle = serve.run(Hello.bind(), name="first", route_prefix="/first")
    port = int(http_url.rsplit(":", 1)[1])
    # The proxy that served dies, and each restart of it dies before it is ready.
    with Killer(_with_port("proxy", port)) as killer:
        poll(lambda: len(killer.seen) == 4, 30, "the proxy and three restarts of it to die")
        with pytest.raises(ServalError, match="the HTTP proxy could not start: it exited 3 times"):
            serve.run(Hello.bind(), name="second", route_prefix="/second")
    # Handles do not need the proxy.
    assert handle.remote().result(timeout_s=10) == "hello"
    assert killer.gaps()[2] >= 2.0  # restarts after 0.5 s, 1 s, 2 s
