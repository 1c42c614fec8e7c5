"""Redeploying applications: changed code rolls replicas over under continuous handle and HTTP
load without a failed request; a changed num_replicas or user_config is applied in place
(existing replica processes kept); several apps live side by side and deleting one leaves the
others serving."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import httpx
import pytest

import serval as serve
from conftest import BackgroundThreads, pid_alive, poll, replica_pids
from serval.exceptions import ApplicationNotFoundError, RequestCancelledError


def replica_states(app: str, deployment: str) -> dict[str, int]:
    return dict(serve.status().applications[app].deployments[deployment].replica_states)


class Traffic(BackgroundThreads):
    """Continuous traffic from background threads: sync handle calls and/or HTTP GETs."""

    def __init__(self, handle: Any = None, url: str | None = None) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.results: list[str] = []  # in completion order, both sources
        self.errors: list[str] = []
        if handle is not None:
            self.threads.append(threading.Thread(target=self._handle_loop, args=(handle,)))
        if url is not None:
            self.threads.append(threading.Thread(target=self._http_loop, args=(url,)))

    def _record(self, result: str | None, error: str | None) -> None:
        with self.lock:
            if error is not None:
                self.errors.append(error)
            else:
                assert result is not None
                self.results.append(result)

    def _handle_loop(self, handle: Any) -> None:
        while not self.stop.is_set():
            try:
                self._record(handle.remote().result(timeout_s=10), None)
            except Exception as exc:
                self._record(None, f"handle: {type(exc).__name__}: {exc}")

    def _http_loop(self, url: str) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    r = client.get(url)
                    if r.status_code == 200:
                        self._record(r.text, None)
                    else:
                        self._record(None, f"http {r.status_code}: {r.text[:200]}")
                except Exception as exc:
                    self._record(None, f"http: {type(exc).__name__}: {exc}")

    def count(self) -> int:
        with self.lock:
            return len(self.results) + len(self.errors)

    def snapshot(self) -> list[str]:
        with self.lock:
            return list(self.results)


@serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=2)
class Echo:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(self, request: Any = None) -> str:
        time.sleep(0.005)
        return f"{self.tag}:{os.getpid()}"


@serve.deployment(name="Echo", num_replicas=2, graceful_shutdown_timeout_s=2)
class EchoRewritten:
    """The same deployment with different code."""

    def __call__(self, request: Any = None) -> str:
        return f"rewritten:{os.getpid()}"


def _roll_over(
    http_url: str | None, old_app: Any, new_app: Any, old_tag: str, new_tag: str
) -> None:
    handle = serve.run(old_app, route_prefix="/echo")
    old = replica_pids("default", "Echo")
    assert len(old) == 2
    url = f"{http_url}/echo" if http_url else None
    with Traffic(handle, url) as traffic:
        poll(lambda: traffic.count() >= 20, timeout=10, what="traffic to flow")
        before = len(traffic.snapshot())
        serve.run(new_app, route_prefix="/echo")
        mark = len(traffic.snapshot())
        assert mark > before, "no request completed while the update rolled out"
        # Once serve.run returns, the new code answers; the old replicas drain and exit.
        poll(
            lambda: not any(pid_alive(pid) for pid in old.values()),
            timeout=15,
            what=f"the old replica processes {sorted(old.values())} to exit",
        )
        exited = len(traffic.snapshot())
        poll(lambda: len(traffic.snapshot()) >= exited + 20, timeout=10, what="more traffic")
    assert not traffic.errors, f"{len(traffic.errors)} failed requests: {traffic.errors[:5]}"
    results = traffic.snapshot()
    tags = [r.split(":")[0] for r in results]
    assert old_tag in tags and new_tag in tags, set(tags)
    # Every response after the old replicas exited came from the new code (skip one response
    # per thread: it may have been received just before and recorded just after).
    assert all(t == new_tag for t in tags[exited + 2 :]), tags[mark:]
    # ...from new processes
    new = replica_pids("default", "Echo")
    assert len(new) == 2 and not set(new.values()) & set(old.values())
    assert {int(r.split(":")[1]) for r in results[-10:]} <= set(new.values())
    assert replica_states("default", "Echo") == {"RUNNING": 2}


def test_rolling_update_of_a_bound_argument_under_load(http_url: str) -> None:
    _roll_over(http_url, Echo.bind("v1"), Echo.bind("v2"), "v1", "v2")


def test_rolling_update_of_the_code_under_load(serve_instance: Any) -> None:
    _roll_over(None, Echo.bind("v1"), EchoRewritten.bind(), "v1", "rewritten")


def test_changed_num_replicas_is_applied_in_place(serve_instance: Any) -> None:
    handle = serve.run(Echo.bind("same"))
    before = replica_pids("default", "Echo")
    assert len(before) == 2

    serve.run(Echo.options(num_replicas=3).bind("same"))
    after_up = replica_pids("default", "Echo")
    assert len(after_up) == 3, after_up
    for rid, pid in before.items():
        assert after_up.get(rid) == pid, "an existing replica was replaced by a scale up"
    assert replica_states("default", "Echo") == {"RUNNING": 3}

    serve.run(Echo.options(num_replicas=1).bind("same"))

    def scaled_down() -> dict[str, int] | None:
        # (both: the controller reaps an exited replica a moment after it is gone)
        pids = replica_pids("default", "Echo")
        done = len(pids) == 1 and replica_states("default", "Echo") == {"RUNNING": 1}
        return pids if done else None

    after_down = poll(scaled_down, timeout=10, what="the scaled-down replicas to exit")
    ((rid, pid),) = after_down.items()
    assert after_up.get(rid) == pid, "scaling down should keep one of the existing replicas"
    assert handle.remote().result(timeout_s=10) == f"same:{pid}"


@serve.deployment(num_replicas=2, user_config={"greeting": "hello"})
class Configurable:
    def __init__(self) -> None:
        self.greeting = None
        self.reconfigured = 0

    def reconfigure(self, config: dict) -> None:
        self.greeting = config["greeting"]
        self.reconfigured += 1

    def __call__(self) -> tuple[str, str, int, int]:
        ctx = serve.get_replica_context()
        return self.greeting, ctx.replica_id.unique_id, os.getpid(), self.reconfigured


def _answers(handle: Any, n: int = 40) -> list[tuple[str, str, int, int]]:
    return [handle.remote().result(timeout_s=10) for _ in range(n)]


def test_changed_user_config_is_applied_in_place(serve_instance: Any) -> None:
    handle = serve.run(Configurable.bind())
    before = replica_pids("default", "Configurable")
    assert len(before) == 2
    assert {a[0] for a in _answers(handle)} == {"hello"}

    serve.run(Configurable.options(user_config={"greeting": "bonjour"}).bind())
    # When serve.run returns, every replica has the new config; none was restarted.
    answers = _answers(handle)
    assert {a[0] for a in answers} == {"bonjour"}
    assert {a[3] for a in answers} == {2}  # reconfigured in place: once at start, once now
    assert replica_pids("default", "Configurable") == before
    assert {(a[1], a[2]) for a in answers} <= set(before.items())
    assert replica_states("default", "Configurable") == {"RUNNING": 2}


@serve.deployment
class Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, request: Any = None) -> str:
        return self.name


def test_several_apps_side_by_side_and_deleting_one(http_url: str) -> None:
    handles = {
        name: serve.run(Named.bind(name), name=name, route_prefix=f"/{name}")
        for name in ("alpha", "beta", "gamma")
    }
    apps = serve.status().applications
    assert {n: apps[n].status for n in handles} == dict.fromkeys(handles, "RUNNING")
    for name, handle in handles.items():
        assert handle.remote().result(timeout_s=10) == name
        assert serve.get_app_handle(name).remote().result(timeout_s=10) == name
        r = httpx.get(f"{http_url}/{name}", timeout=10)
        assert (r.status_code, r.text) == (200, name)

    beta_pids = replica_pids("beta", "Named")
    assert len(beta_pids) == 1
    others = {n: replica_pids(n, "Named") for n in ("alpha", "gamma")}

    serve.delete("beta")
    assert "beta" not in serve.status().applications
    poll(
        lambda: not any(pid_alive(p) for p in beta_pids.values()),
        timeout=10,
        what="beta's replica to exit",
    )
    assert httpx.get(f"{http_url}/beta", timeout=10).status_code == 404
    with pytest.raises(ApplicationNotFoundError):
        serve.get_app_handle("beta")

    for name in ("alpha", "gamma"):
        assert handles[name].remote().result(timeout_s=10) == name
        r = httpx.get(f"{http_url}/{name}", timeout=10)
        assert (r.status_code, r.text) == (200, name)
        assert replica_pids(name, "Named") == others[name]  # untouched
    apps = serve.status().applications
    assert set(apps) == {"alpha", "gamma"}
    assert all(a.status == "RUNNING" for a in apps.values())

    # The freed route prefix can be reused by a new app.
    serve.run(Named.bind("delta"), name="delta", route_prefix="/beta")
    r = httpx.get(f"{http_url}/beta", timeout=10)
    assert (r.status_code, r.text) == (200, "delta")


def test_cancelling_a_call_on_a_replica_being_replaced_reaches_it(
    serve_instance: Any, tmp_path: Any
) -> None:
    # A rolling update takes the old replica out of the callers' table while it still serves
    # the calls sent before; cancelling one of those must still reach it (it then drains at
    # once, instead of waiting out its graceful shutdown).
    started, cancelled = tmp_path / "started", tmp_path / "cancelled"

    def make(version: str) -> Any:
        @serve.deployment(name="Waits", graceful_shutdown_timeout_s=30)
        class Waits:
            async def __call__(self) -> str:
                if version != "v1":
                    return version
                started.touch()
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    cancelled.touch()
                    raise
                return version

        return Waits

    handle = serve.run(make("v1").bind())
    (old_pid,) = replica_pids("default", "Waits").values()
    response = handle.remote()
    poll(started.exists, 10, "the call to start")
    serve.run(make("v2").bind())  # returns once the new replica runs; the old one drains
    response.cancel()
    poll(cancelled.exists, 10, "the old replica to see the cancellation")
    poll(lambda: not pid_alive(old_pid), 10, "the old replica to finish draining")
    with pytest.raises(RequestCancelledError):
        response.result(timeout_s=10)
    assert handle.remote().result(timeout_s=10) == "v2"
