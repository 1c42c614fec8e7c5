"""Controller recovery: kill -9 the controller under handle and HTTP traffic; no request fails,
a new controller comes up, re-reads its checkpoint and adopts the live replicas and proxy (same
processes), and status and deploys work again within seconds."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import httpx

import serval as serve
from conftest import SCALE_TO_ZERO, BackgroundThreads, poll, replica_pids, serval_processes
from serval._private.caller import runtime

RECOVERY_DEADLINE_S = 10.0


def cluster_processes(role: str) -> dict[int, str]:
    address = runtime.address()
    assert address is not None
    return {pid: cmd for pid, cmd in serval_processes(address) if f"serval::{role} " in cmd}


def controller_pid() -> int | None:
    found = cluster_processes("controller")
    assert len(found) <= 1, found
    return next(iter(found), None)


class Traffic(BackgroundThreads):
    """Sync handle calls and HTTP GETs in a loop from background threads; every outcome is
    recorded with the time it completed."""

    def __init__(self, handle: Any, url: str) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.ok: list[tuple[float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self.threads += [
            threading.Thread(target=self._handle_loop, args=(handle,)),
            threading.Thread(target=self._http_loop, args=(url,)),
        ]

    def _record(self, kind: str, error: str | None) -> None:
        with self.lock:
            (self.errors if error else self.ok).append((time.monotonic(), error or kind))

    def _handle_loop(self, handle: Any) -> None:
        while not self.stop.is_set():
            try:
                handle.remote().result(timeout_s=10)
                self._record("handle", None)
            except Exception as exc:
                self._record("handle", f"handle: {type(exc).__name__}: {exc}")
            time.sleep(0.005)

    def _http_loop(self, url: str) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                try:
                    r = client.get(url)
                    err = None if r.status_code == 200 else f"http {r.status_code}: {r.text[:200]}"
                except Exception as exc:
                    err = f"http: {type(exc).__name__}: {exc}"
                self._record("http", err)
                time.sleep(0.005)

    def successes_after(self, t: float, kind: str) -> int:
        with self.lock:
            return sum(1 for at, k in self.ok if at > t and k == kind)

    def flowing_since(self, t: float) -> bool:
        """More than 10 handle calls and more than 10 HTTP GETs succeeded after ``t``."""
        return self.successes_after(t, "handle") > 10 and self.successes_after(t, "http") > 10


@serve.deployment(num_replicas=2)
class Pid:
    def __call__(self, request: Any = None) -> str:
        return str(os.getpid())


def _status_works() -> bool:
    try:
        status = serve.status()
    except Exception:
        return False
    app = status.applications.get("default")
    return app is not None and app.status == "RUNNING"


def test_kill_9_controller_under_traffic(http_url: str) -> None:
    handle = serve.run(Pid.bind(), route_prefix="/pid")
    replicas = replica_pids("default", "Pid")
    assert len(replicas) == 2
    proxies = cluster_processes("proxy")
    assert len(proxies) == 1
    old_controller = controller_pid()
    assert old_controller is not None

    with Traffic(handle, f"{http_url}/pid") as traffic:
        poll(
            lambda: traffic.flowing_since(0),
            timeout=10,
            what="traffic to flow",
        )
        killed_at = time.monotonic()
        os.kill(old_controller, signal.SIGKILL)

        # Traffic keeps flowing while there is no controller.
        poll(
            lambda: traffic.flowing_since(killed_at),
            timeout=5,
            what="traffic to keep flowing after the controller was killed",
        )
        new_controller = poll(
            lambda: (pid := controller_pid()) not in (None, old_controller) and pid,
            timeout=5,
            what="a new controller process",
        )
        poll(_status_works, timeout=RECOVERY_DEADLINE_S, what="serve.status() to work again")
        recovered_at = time.monotonic()
        assert recovered_at - killed_at < RECOVERY_DEADLINE_S

        # The live replicas and the proxy were adopted, not restarted.
        assert replica_pids("default", "Pid") == replicas
        assert cluster_processes("proxy").keys() == proxies.keys()
        assert serve.status().applications["default"].deployments["Pid"].replica_states == {
            "RUNNING": 2
        }

        # A deploy works again: scaling up keeps the adopted replicas and adds one.
        start = time.monotonic()
        serve.run(Pid.options(num_replicas=3).bind(), route_prefix="/pid")
        assert time.monotonic() - start < RECOVERY_DEADLINE_S
        scaled = replica_pids("default", "Pid")
        assert len(scaled) == 3
        assert {rid: scaled.get(rid) for rid in replicas} == replicas
        assert controller_pid() == new_controller

        # Traffic after the deploy reaches the new replica as well.
        deployed_at = time.monotonic()
        poll(
            lambda: traffic.flowing_since(deployed_at),
            timeout=5,
            what="traffic after the redeploy",
        )
        poll(
            lambda: (
                {handle.remote().result(timeout_s=10) for _ in range(10)}
                >= {str(p) for p in scaled.values()}
            ),
            timeout=10,
            what="every replica, the new one included, to serve requests",
        )
    assert not traffic.errors, f"{len(traffic.errors)} failed requests: {traffic.errors[:5]}"


def test_adopted_replicas_are_still_supervised(serve_instance: Any) -> None:
    """After a controller restart, an adopted replica that dies is replaced, and a deleted app's
    adopted replicas exit."""
    handle = serve.run(Pid.bind())
    replicas = replica_pids("default", "Pid")
    old_controller = controller_pid()
    assert old_controller is not None
    os.kill(old_controller, signal.SIGKILL)
    poll(
        lambda: controller_pid() not in (None, old_controller),
        timeout=5,
        what="a new controller process",
    )
    poll(_status_works, timeout=RECOVERY_DEADLINE_S, what="serve.status() to work again")
    assert replica_pids("default", "Pid") == replicas

    victim_id, victim_pid = next(iter(replicas.items()))
    os.kill(victim_pid, signal.SIGKILL)
    replaced = poll(
        lambda: (
            (p := replica_pids("default", "Pid"))
            and len(p) == 2
            and victim_id not in p
            and serve.status().applications["default"].deployments["Pid"].replica_states
            == {"RUNNING": 2}
            and p
        ),
        timeout=RECOVERY_DEADLINE_S,
        what="the killed adopted replica to be replaced",
    )
    survivors = {rid: pid for rid, pid in replicas.items() if rid != victim_id}
    assert {rid: replaced[rid] for rid in survivors} == survivors
    assert {handle.remote().result(timeout_s=10) for _ in range(30)} <= {
        str(p) for p in replaced.values()
    }

    serve.delete("default")
    assert "default" not in serve.status().applications
    poll(
        lambda: not replica_pids("default", "Pid"),
        timeout=RECOVERY_DEADLINE_S,
        what="the deleted app's replicas to exit",
    )


def test_controller_killed_twice(serve_instance: Any) -> None:
    handle = serve.run(Pid.bind())
    replicas = replica_pids("default", "Pid")
    seen = set()
    for _ in range(2):
        old = controller_pid()
        assert old is not None
        seen.add(old)
        os.kill(old, signal.SIGKILL)
        poll(
            lambda: controller_pid() not in (None, *seen),
            timeout=5,
            what="a new controller process",
        )
        poll(_status_works, timeout=RECOVERY_DEADLINE_S, what="serve.status() to work again")
        assert replica_pids("default", "Pid") == replicas
        assert handle.remote().result(timeout_s=10) in {str(p) for p in replicas.values()}


@serve.deployment(autoscaling_config=SCALE_TO_ZERO)
class ToZero:
    def __call__(self) -> str:
        return "served"


def test_scale_from_zero_after_recovery(serve_instance: Any) -> None:
    handle = serve.run(ToZero.bind())
    assert not replica_pids("default", "ToZero")
    old = controller_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    poll(lambda: controller_pid() not in (None, old), timeout=5, what="a new controller process")
    poll(_status_works, timeout=RECOVERY_DEADLINE_S, what="serve.status() to work again")
    # The restarted controller autoscales the recovered deployment: a request is held, served.
    assert handle.remote().result(timeout_s=15) == "served"
    poll(
        lambda: not replica_pids("default", "ToZero"),
        timeout=RECOVERY_DEADLINE_S,
        what="the deployment to scale back to zero",
    )


@serve.deployment(num_replicas=2)
class SlowStart:
    def __init__(self) -> None:
        time.sleep(1.5)

    def __call__(self) -> str:
        return str(os.getpid())


def test_controller_killed_while_replicas_start(serve_instance: Any) -> None:
    """Replicas still starting when the controller dies are replaced; the app comes up."""
    outcome: list[object] = []

    def deploy() -> None:
        try:
            outcome.append(serve.run(SlowStart.bind()))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=deploy, daemon=True)
    thread.start()
    poll(lambda: len(replica_pids("default", "SlowStart")) == 2, timeout=10, what="replicas")
    old = controller_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    poll(lambda: controller_pid() not in (None, old), timeout=5, what="a new controller process")
    poll(_status_works, timeout=RECOVERY_DEADLINE_S, what="the app to come up after recovery")
    thread.join(timeout=RECOVERY_DEADLINE_S)
    assert not thread.is_alive(), "serve.run hung across the controller restart"
    # serve.run rides out the restart: it returns once the app is up.
    assert len(outcome) == 1 and isinstance(outcome[0], serve.handle.DeploymentHandle), outcome
    handle = serve.get_app_handle("default")
    pids = replica_pids("default", "SlowStart")
    assert len(pids) == 2
    assert handle.remote().result(timeout_s=10) in {str(p) for p in pids.values()}
    assert serve.status().applications["default"].deployments["SlowStart"].replica_states == {
        "RUNNING": 2
    }
