"""Declaring and running deployments: classes, functions, bound graphs, options, status,
delete, handle lookup and the replica context. Real processes throughout."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import serval as serve
from conftest import poll, serval_processes


@serve.deployment
class Echo:
    def __call__(self, x):
        return x

    def whoami(self):
        ctx = serve.get_replica_context()
        return ctx.app_name, ctx.deployment, ctx.replica_id


@serve.deployment
class Adder:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, x: int) -> int:
        return x + self.n


@serve.deployment
class Multiplier:
    def __init__(self, k: int) -> None:
        self.k = k

    async def __call__(self, x: int) -> int:
        return x * self.k


@serve.deployment
class Pipeline:
    def __init__(self, first, second) -> None:
        # bound deployments arrive as handles
        assert isinstance(first, serve.DeploymentHandle), type(first)
        assert isinstance(second, serve.DeploymentHandle), type(second)
        self.first = first
        self.second = second

    async def __call__(self, x: int) -> int:
        y = await self.first.remote(x)
        return await self.second.remote(y)


@serve.deployment
def greet(name: str) -> str:
    return f"hello {name}"


@serve.deployment
async def agreet(name: str) -> str:
    await asyncio.sleep(0)
    return f"hi {name}"


def test_class_deployment_run_returns_ingress_handle(apps: None) -> None:
    handle = serve.run(Echo.bind())
    assert isinstance(handle, serve.DeploymentHandle)
    assert handle.remote({"a": [1, 2]}).result(timeout_s=10) == {"a": [1, 2]}
    assert handle.remote("x").result() == "x"


def test_function_deployments(apps: None) -> None:
    h = serve.run(greet.bind())
    assert h.remote("bob").result(timeout_s=10) == "hello bob"
    h2 = serve.run(agreet.bind(), name="async_fn", route_prefix="/afn")
    assert h2.remote("amy").result(timeout_s=10) == "hi amy"


def test_bound_graph_composes_through_handles(apps: None) -> None:
    h = serve.run(Pipeline.bind(Adder.bind(1), Multiplier.bind(10)))
    assert h.remote(2).result(timeout_s=10) == 30
    app = serve.status().applications["default"]
    assert set(app.deployments) == {"Pipeline", "Adder", "Multiplier"}


def test_same_class_bound_twice_is_two_deployments(apps: None) -> None:
    h = serve.run(Pipeline.bind(Adder.bind(1), Adder.bind(100)))
    assert h.remote(0).result(timeout_s=10) == 101
    deployments = serve.status().applications["default"].deployments
    assert set(deployments) == {"Pipeline", "Adder", "Adder_1"}
    assert serve.get_deployment_handle("Adder", app_name="default").remote(0).result() == 1
    assert serve.get_deployment_handle("Adder_1", app_name="default").remote(0).result() == 100


def test_same_bound_node_used_twice_is_one_deployment(apps: None) -> None:
    add = Adder.bind(5)
    h = serve.run(Pipeline.bind(add, add))
    assert h.remote(0).result(timeout_s=10) == 10
    assert set(serve.status().applications["default"].deployments) == {"Pipeline", "Adder"}


def test_options_rename_and_scale(apps: None) -> None:
    d = Echo.options(name="Renamed", num_replicas=2, max_ongoing_requests=3, max_queued_requests=4)
    assert d.name == "Renamed"
    assert d.num_replicas == 2
    assert d.max_ongoing_requests == 3
    assert Echo.name == "Echo"  # the original is untouched
    assert Echo.max_ongoing_requests == 5  # Ray Serve's default
    h = serve.run(d.bind())
    dep = serve.status().applications["default"].deployments["Renamed"]
    assert dep.replica_states == {"RUNNING": 2}
    app_name, deployment, _ = h.whoami.remote().result(timeout_s=10)
    assert (app_name, deployment) == ("default", "Renamed")


def test_deployment_defined_inside_a_test_is_shipped_by_value(apps: None) -> None:
    secret = "closure-value"

    def helper(x: str) -> str:
        return f"{x}:{secret}"

    @serve.deployment
    class Local:
        def __init__(self, prefix: str) -> None:
            self.prefix = prefix

        def __call__(self, x: str) -> str:
            return self.prefix + helper(x)

    @serve.deployment
    def local_fn(x: int) -> int:
        return x * 3

    h = serve.run(Local.bind(">"))
    assert h.remote("v").result(timeout_s=10) == ">v:closure-value"
    h2 = serve.run(local_fn.bind(), name="fn", route_prefix="/fn")
    assert h2.remote(7).result(timeout_s=10) == 21


def test_run_waits_until_every_replica_is_running(apps: None) -> None:
    serve.run(Echo.options(num_replicas=2).bind())
    status = serve.status()
    app = status.applications["default"]
    assert app.status == "RUNNING"
    assert app.deployments["Echo"].replica_states == {"RUNNING": 2}


def test_status_of_multi_deployment_app(apps: None) -> None:
    serve.run(Pipeline.bind(Adder.options(num_replicas=2).bind(1), Multiplier.bind(2)))
    app = serve.status().applications["default"]
    assert app.status == "RUNNING"
    assert app.deployments["Pipeline"].replica_states == {"RUNNING": 1}
    assert app.deployments["Adder"].replica_states == {"RUNNING": 2}
    assert app.deployments["Multiplier"].replica_states == {"RUNNING": 1}


def test_get_app_handle_and_get_deployment_handle(apps: None) -> None:
    serve.run(Pipeline.bind(Adder.bind(1), Multiplier.bind(2)), name="math", route_prefix="/math")
    serve.run(Echo.bind(), name="other", route_prefix="/other")
    assert set(serve.status().applications) == {"math", "other"}

    app_handle = serve.get_app_handle("math")
    assert isinstance(app_handle, serve.DeploymentHandle)
    assert app_handle.remote(3).result(timeout_s=10) == 8
    assert serve.get_app_handle("other").remote("o").result(timeout_s=10) == "o"

    mult = serve.get_deployment_handle("Multiplier", app_name="math")
    assert isinstance(mult, serve.DeploymentHandle)
    assert mult.remote(4).result(timeout_s=10) == 8
    adder = serve.get_deployment_handle("Adder", app_name="math")
    assert adder.remote(4).result(timeout_s=10) == 5


def test_delete_removes_app_and_its_processes(apps: None) -> None:
    serve.run(Echo.options(num_replicas=2).bind(), name="doomed", route_prefix="/doomed")
    keep = serve.run(Adder.bind(1), name="keep", route_prefix="/keep")
    marker = "serval::replica doomed.Echo#"
    assert len([p for p in serval_processes() if marker in p[1]]) == 2

    serve.delete("doomed")
    assert "doomed" not in serve.status().applications
    poll(
        lambda: not [p for p in serval_processes() if marker in p[1]],
        timeout=5.0,
        what="the deleted app's replicas to exit",
        interval=0.02,
    )
    with pytest.raises(serve.exceptions.ApplicationNotFoundError):
        serve.get_app_handle("doomed")
    # the other app is untouched
    assert keep.remote(1).result(timeout_s=10) == 2
    assert serve.status().applications["keep"].status == "RUNNING"


def _delete_while_threads_call() -> list[str]:
    """Four threads call the default app while it is deleted; what each call ended with."""
    h = serve.run(Echo.options(num_replicas=2, max_ongoing_requests=2).bind())
    stop = threading.Event()
    outcomes: list[str] = []

    def caller() -> None:
        while not stop.is_set():
            try:
                outcomes.append(str(h.remote(1).result(timeout_s=5)))
            except TimeoutError:  # before ServalError: GetTimeoutError is both
                outcomes.append("hung")
                return
            except serve.exceptions.ServalError as exc:
                outcomes.append(type(exc).__name__)
                time.sleep(0.005)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    poll(lambda: len(outcomes) > 200, timeout=10.0, what="calls to flow", interval=0.01)
    serve.delete("default")
    poll(
        lambda: outcomes.count("DeploymentNotFoundError") >= 20 or "hung" in outcomes,
        timeout=10.0,
        what="the callers to meet the deleted app",
        interval=0.01,
    )
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    return outcomes


def test_calls_racing_a_delete_end_promptly(apps: None) -> None:
    # Each call must end, with its value or a serval error, never wait forever (a call its
    # draining replica refused once waited in the deleted deployment's queue).
    for _ in range(3):
        outcomes = _delete_while_threads_call()
        assert "hung" not in outcomes
        assert "1" in outcomes and "DeploymentNotFoundError" in outcomes


def test_delete_then_redeploy_same_name(apps: None) -> None:
    serve.run(Adder.bind(1))
    serve.delete("default")
    h = serve.run(Adder.bind(2))
    assert h.remote(1).result(timeout_s=10) == 3


def test_redeploy_same_app_name_updates_code(apps: None) -> None:
    first = serve.run(Adder.bind(1))
    assert first.remote(1).result(timeout_s=10) == 2
    second = serve.run(Adder.bind(2))
    assert second.remote(1).result(timeout_s=10) == 3
    # the old handle now reaches the new version too, and the old replica goes away
    assert first.remote(1).result(timeout_s=10) == 3
    poll(
        lambda: (
            serve.status().applications["default"].deployments["Adder"].replica_states
            == {"RUNNING": 1}
        ),
        timeout=5.0,
        what="the old replica to stop",
        interval=0.02,
    )


@serve.deployment
class Lookup:
    def __init__(self, other) -> None:
        pass

    def call_by_name(self, x: int) -> int:
        # no app_name: the caller's own application
        return serve.get_deployment_handle("Adder").remote(x).result(timeout_s=10)


def test_get_deployment_handle_inside_replica_defaults_to_own_app(apps: None) -> None:
    serve.run(Adder.bind(1000), name="elsewhere", route_prefix="/elsewhere")
    h = serve.run(Lookup.bind(Adder.bind(1)), name="mine", route_prefix="/mine")
    assert h.call_by_name.remote(1).result(timeout_s=10) == 2


def test_replica_context_inside_replica(apps: None) -> None:
    h = serve.run(Echo.options(num_replicas=2).bind(), name="ctxapp", route_prefix="/ctx")
    app_name, deployment, replica_id = h.whoami.remote().result(timeout_s=10)
    assert app_name == "ctxapp"
    assert deployment == "Echo"
    # a ReplicaID, as in Ray Serve 2.10+: its deployment's and its own id
    assert replica_id.deployment_id == serve.config.DeploymentID("Echo", "ctxapp")
    assert isinstance(replica_id.unique_id, str) and replica_id.unique_id
    assert replica_id.to_full_id_str() == f"ctxapp#Echo#{replica_id.unique_id}"


def test_replica_context_outside_replica_raises() -> None:
    with pytest.raises(serve.exceptions.RayServeException):
        serve.get_replica_context()


def test_replica_runs_in_its_own_process(apps: None) -> None:
    @serve.deployment
    def pid() -> int:
        return os.getpid()

    h = serve.run(pid.bind())
    assert h.remote().result(timeout_s=10) != os.getpid()
