"""The Ray backend on a one-node Ray instance, used as a Ray Serve user uses Ray Serve: the
driver calls ``ray.init()`` and ``serve.run`` deploys onto Ray without being told. Replicas
are Ray actors with the resources ``ray_actor_options`` ask for; calls, composition, streams,
errors and HTTP work as on the local backend; a killed replica actor is replaced, a killed
controller actor is restarted by Ray with traffic flowing meanwhile, apps outlive the driver
that deployed them, and ``serve.shutdown`` leaves no actor behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray
import yaml  # type: ignore[import-untyped]

import serval as serve
from chaos.harness import free_port
from conftest import poll, scrape, total
from ray_clusters import CALL_TIMEOUT_S, loopback, one_node, run_driver, serval_actors
from serval._private.backends import ray_store
from serval.exceptions import RequestCancelledError

pytestmark = pytest.mark.timeout(240)

_port = [0]


@pytest.fixture(scope="module")
def ray_node() -> Iterator[None]:
    with one_node():
        _port[0] = free_port()
        serve.start(http_options={"port": _port[0]})
        yield


@pytest.fixture
def on_ray(ray_node: None) -> Iterator[str]:
    """The module's serval cluster on Ray; the apps a test deploys are deleted after it."""
    yield f"http://127.0.0.1:{_port[0]}"
    for name in list(serve.status().applications):
        serve.delete(name)


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0.5})
class Echo:
    def __call__(self, x: Any) -> Any:
        return x

    def where(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {
            "actor": ctx.get_actor_id(),
            "pid": os.getpid(),
            "resources": ctx.get_assigned_resources(),
            "env": os.environ.get("SERVAL_T_RAY"),
        }


def test_serve_run_after_ray_init_deploys_onto_ray(on_ray: str) -> None:
    handle = serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    assert handle.remote({"a": [1, 2]}).result(timeout_s=CALL_TIMEOUT_S) == {"a": [1, 2]}
    seen = {handle.where.remote().result(timeout_s=CALL_TIMEOUT_S)["actor"] for _ in range(40)}
    assert len(seen) == 2 and None not in seen  # two replicas, each a Ray actor
    names = serval_actors()
    assert ray_store.CONTROLLER_ACTOR in names
    assert sum(n.startswith("SERVAL_REPLICA:") for n in names) == 2
    assert sum(n.startswith("SERVAL_PROXY:") for n in names) == 1
    status = serve.status().applications["echo"]
    assert status.status == "RUNNING"
    assert status.deployments["Echo"].replica_states == {"RUNNING": 2}


def test_ray_actor_options_are_what_ray_gives_the_replica(on_ray: str) -> None:
    sized = Echo.options(
        num_replicas=1,
        ray_actor_options={
            "num_cpus": 2,
            "runtime_env": {"env_vars": {"SERVAL_T_RAY": "yes"}},
        },
    )
    handle = serve.run(sized.bind(), name="sized", route_prefix="/sized")
    where = handle.where.remote().result(timeout_s=CALL_TIMEOUT_S)
    assert where["resources"].get("CPU") == 2.0
    assert where["env"] == "yes"


def test_a_deployment_that_asks_for_more_than_the_cluster_has_does_not_block_others(
    on_ray: str,
) -> None:
    # Ray keeps such an actor pending (the cluster may grow): the app waits, the rest serves.
    greedy = Echo.options(name="Greedy", num_replicas=1, ray_actor_options={"num_cpus": 64})
    done = threading.Event()

    def deploy() -> None:
        try:
            serve.run(greedy.bind(), name="greedy", route_prefix="/greedy")
        except Exception:
            pass
        done.set()

    threading.Thread(target=deploy, daemon=True).start()
    poll(lambda: "greedy" in serve.status().applications, CALL_TIMEOUT_S, "greedy deploying")
    assert serve.status().applications["greedy"].status == "DEPLOYING"
    handle = serve.run(Echo.options(name="Small", num_replicas=1).bind(), name="small")
    assert handle.remote(7).result(timeout_s=CALL_TIMEOUT_S) == 7
    serve.delete("greedy")
    poll(done.is_set, CALL_TIMEOUT_S, "the greedy deploy to end")


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Child:
    def double(self, x: int) -> int:
        return 2 * x

    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    def fail(self) -> None:
        raise KeyError("no such thing")


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Parent:
    def __init__(self, child: Any) -> None:
        self.child = child

    async def __call__(self, x: int) -> int:
        return await self.child.double.remote(x) + 1


def test_composition_streams_and_errors(on_ray: str) -> None:
    parent = serve.run(Parent.bind(Child.bind()), name="family", route_prefix="/family")
    assert parent.remote(20).result(timeout_s=CALL_TIMEOUT_S) == 41
    child = serve.get_deployment_handle("Child", app_name="family")
    stream = child.options(stream=True).count.remote(5)
    assert list(stream) == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError, match="no such thing"):
        child.fail.remote().result(timeout_s=CALL_TIMEOUT_S)
    assert parent.remote(1).result(timeout_s=CALL_TIMEOUT_S) == 3  # still serving


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Hello:
    async def __call__(self, request: Any) -> dict[str, str]:
        return {"path": request.url.path, "body": (await request.body()).decode()}


def test_http_through_the_proxy(on_ray: str) -> None:
    serve.run(Hello.bind(), name="hello", route_prefix="/hello")
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    reply = httpx.post(f"{on_ray}/hello/there", content=b"hi", timeout=CALL_TIMEOUT_S)
    assert reply.status_code == 200
    assert reply.json() == {"path": "/hello/there", "body": "hi"}
    routes = httpx.get(f"{on_ray}/-/routes", timeout=CALL_TIMEOUT_S).json()
    assert routes == {"/hello": "hello", "/echo": "echo"}


def test_a_killed_replica_actor_is_replaced(on_ray: str) -> None:
    handle = serve.run(Echo.options(num_replicas=1).bind(), name="echo", route_prefix="/echo")
    first = handle.where.remote().result(timeout_s=CALL_TIMEOUT_S)["actor"]
    (name,) = [n for n in serval_actors() if n.startswith("SERVAL_REPLICA:")]
    ray.kill(ray.get_actor(name, namespace=ray_store.DEFAULT_NAMESPACE), no_restart=True)

    def replaced() -> bool:
        try:
            now = handle.where.remote().result(timeout_s=5)["actor"]
        except Exception:
            return False
        return bool(now != first)

    poll(replaced, CALL_TIMEOUT_S, "a new replica actor")
    assert serve.status().applications["echo"].deployments["Echo"].replica_states == {"RUNNING": 1}


def test_a_killed_controller_is_restarted_by_ray_and_traffic_flows(on_ray: str) -> None:
    handle = serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    failures: list[BaseException] = []
    calls = [0]
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                assert handle.remote(1).result(timeout_s=10) == 1
                calls[0] += 1
            except BaseException as exc:
                failures.append(exc)
            time.sleep(0.002)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        poll(lambda: calls[0] > 20, CALL_TIMEOUT_S, "traffic")
        controller = ray.get_actor(
            ray_store.CONTROLLER_ACTOR, namespace=ray_store.DEFAULT_NAMESPACE
        )
        old = ray_store.controller_endpoint(ray_store.DEFAULT_NAMESPACE)
        ray.kill(controller, no_restart=False)  # as a crash: Ray restarts it
        poll(
            lambda: ray_store.controller_endpoint(ray_store.DEFAULT_NAMESPACE) != old,
            CALL_TIMEOUT_S,
            "the restarted controller listening",
        )
        before = calls[0]
        # the new controller knows the app and its replicas (adopted, not restarted)
        states = serve.status().applications["echo"].deployments["Echo"].replica_states
        assert states == {"RUNNING": 2}
        poll(lambda: calls[0] > before + 20, CALL_TIMEOUT_S, "traffic after the restart")
    finally:
        stop.set()
        thread.join(15)
    assert failures == []
    assert sum(n.startswith("SERVAL_REPLICA:") for n in serval_actors()) == 2


def test_apps_outlive_the_driver_that_deployed_them(on_ray: str) -> None:
    run_driver(
        """
        import serval as serve

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        def survivor(request=None) -> str:
            return "still here"

        serve.run(survivor.bind(), name="survivor", route_prefix="/survivor")
        print("deployed")
        """
    )
    assert serve.status().applications["survivor"].status == "RUNNING"
    handle = serve.get_app_handle("survivor")
    assert handle.remote().result(timeout_s=CALL_TIMEOUT_S) == "still here"
    reply = httpx.get(f"{on_ray}/survivor", timeout=CALL_TIMEOUT_S)
    assert reply.text == "still here"


def test_another_driver_finds_the_apps_and_shuts_them_down(ray_node: None) -> None:
    serve.run(Echo.options(num_replicas=1).bind(), name="echo", route_prefix="/echo")
    out = run_driver(
        """
        import serval as serve

        print(serve.status().applications["echo"].status)
        print(serve.get_app_handle("echo").remote(3).result(timeout_s=30))
        serve.shutdown()
        """
    )
    assert out.split() == ["RUNNING", "3"]
    poll(lambda: serval_actors() == [], CALL_TIMEOUT_S, "every serval actor gone")
    # this driver's connection is to a cluster that is gone: starting again makes a new one
    serve.shutdown()
    serve.start(http_options={"port": _port[0]})
    handle = serve.run(Echo.options(num_replicas=1).bind(), name="again", route_prefix="/again")
    assert handle.remote(4).result(timeout_s=CALL_TIMEOUT_S) == 4


def test_shutdown_leaves_no_actor(ray_node: None) -> None:
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    assert serval_actors()
    serve.shutdown()
    poll(lambda: serval_actors() == [], CALL_TIMEOUT_S, "every serval actor gone")
    assert ray_store.controller_endpoint(ray_store.DEFAULT_NAMESPACE) is None
    serve.start(http_options={"port": _port[0]})  # (the module's fixture expects a cluster)


# -- calls by reference: real ray.ObjectRefs ----------------------------------------------------


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Calc:
    def add(self, a: int, b: int) -> int:
        return a + b

    def fail(self) -> None:
        raise KeyError("missing")

    def lock(self) -> Any:
        return threading.Lock()


@ray.remote(num_cpus=0)
def plus_one(x: int) -> int:
    return x + 1


def test_by_reference_calls_return_real_object_refs(on_ray: str) -> None:
    handle = serve.run(Calc.bind(), name="calc", route_prefix="/calc")
    by_ref = handle.options(_by_reference=True)
    response = by_ref.add.remote(2, 3)
    assert response.result(timeout_s=CALL_TIMEOUT_S) == 5
    ref = by_ref.add.remote(20, 3)._to_object_ref_sync()
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=CALL_TIMEOUT_S) == 23
    # a ref goes to a Ray task as any ref does, resolved by Ray; and to another call (by
    # reference or not) as its value
    assert ray.get(plus_one.remote(ref), timeout=CALL_TIMEOUT_S) == 24
    assert by_ref.add.remote(ref, 1).result(timeout_s=CALL_TIMEOUT_S) == 24
    assert handle.add.remote(ref, b=2).result(timeout_s=CALL_TIMEOUT_S) == 25
    refs = [by_ref.add.remote(i, i)._to_object_ref_sync() for i in range(5)]
    ready, _ = ray.wait(refs, num_returns=5, timeout=CALL_TIMEOUT_S)
    assert len(ready) == 5 and ray.get(refs) == [0, 2, 4, 6, 8]
    with pytest.raises(KeyError, match="missing"):
        by_ref.fail.remote().result(timeout_s=CALL_TIMEOUT_S)
    with pytest.raises(KeyError, match="missing"):
        ray.get(by_ref.fail.remote()._to_object_ref_sync(), timeout=CALL_TIMEOUT_S)
    # a result that cannot be serialized: Ray's error names the call and what failed, and
    # the replica serves on
    with pytest.raises(TypeError) as failed:
        by_ref.lock.remote().result(timeout_s=CALL_TIMEOUT_S)
    assert "serval:calc.Calc.lock" in str(failed.value)
    assert "cannot pickle '_thread.lock' object" in str(failed.value)
    assert by_ref.add.remote(1, 2).result(timeout_s=CALL_TIMEOUT_S) == 3

    async def from_a_loop() -> list[Any]:
        value = await by_ref.add.remote(1, 1)
        ref = await by_ref.add.remote(2, 2)._to_object_ref()
        return [value, await ref, isinstance(ref, ray.ObjectRef)]

    assert asyncio.run(from_a_loop()) == [2, 4, True]


def test_the_guides_handles_give_object_refs_that_ray_takes(on_ray: str) -> None:
    # The ServeHandle guide (Ray 2.0-2.6): ray.get(handle.remote(x)), ray.wait(refs).
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    handle = Echo.get_handle()
    ref = handle.remote("hello")
    assert isinstance(ref, ray.ObjectRef)
    assert ray.get(ref, timeout=CALL_TIMEOUT_S) == "hello"
    refs = [handle.remote(i) for i in range(6)]
    ready, not_ready = ray.wait(refs, num_returns=6, timeout=CALL_TIMEOUT_S)
    assert len(ready) == 6 and not_ready == []
    assert serve.get(refs, timeout=CALL_TIMEOUT_S) == list(range(6))  # serve.get takes them too
    ready, _ = serve.wait(refs, num_returns=6, timeout=CALL_TIMEOUT_S)
    assert len(ready) == 6

    async def guide_async() -> Any:
        async_handle = Echo.get_handle(sync=False)
        ref = await async_handle.remote("async hello")
        assert isinstance(ref, ray.ObjectRef)
        return await ref

    assert asyncio.run(guide_async()) == "async hello"


@serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 0})
class OneAtATime:
    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.lock = threading.Lock()

    def work(self) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.05)
        with self.lock:
            self.now -= 1
        return self.most


def test_by_reference_calls_keep_max_ongoing_requests(on_ray: str) -> None:
    handle = serve.run(OneAtATime.bind(), name="one", route_prefix="/one")
    by_ref = handle.options(_by_reference=True)
    refs = [by_ref.work.remote()._to_object_ref_sync() for _ in range(8)]
    assert max(ray.get(refs, timeout=CALL_TIMEOUT_S)) == 1


@serve.deployment(max_ongoing_requests=24, ray_actor_options={"num_cpus": 0})
class Gathering:
    """Async calls that each wait until ``n`` of them run at once (or 20 s pass)."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.all_in = asyncio.Event()
        self.cancelled = 0

    async def meet(self, n: int) -> int:
        self.running += 1
        self.most = max(self.most, self.running)
        if self.running >= n:
            self.all_in.set()
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.all_in.wait(), 20)
            return self.most
        finally:
            self.running -= 1

    async def forever(self) -> None:
        self.running += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1

    def counts(self) -> dict[str, int]:
        return {"running": self.running, "cancelled": self.cancelled}


def test_by_reference_calls_to_async_methods_run_as_many_at_once_as_the_replica_may(
    on_ray: str,
) -> None:
    # More than the threads a replica actor keeps for sync methods: an async method's calls
    # are not held to those.
    handle = serve.run(Gathering.bind(), name="gather", route_prefix="/gather")
    by_ref = handle.options(_by_reference=True)
    refs = [by_ref.meet.remote(24)._to_object_ref_sync() for _ in range(24)]
    assert ray.get(refs, timeout=CALL_TIMEOUT_S) == [24] * 24


def test_a_cancelled_by_reference_call_is_cancelled_in_the_replica(on_ray: str) -> None:
    handle = serve.run(
        Gathering.options(max_ongoing_requests=2).bind(), name="cancel", route_prefix="/cancel"
    )
    by_ref = handle.options(_by_reference=True)
    response = by_ref.forever.remote()
    ref = response._to_object_ref_sync()

    def counts() -> dict[str, int]:
        return handle.counts.remote().result(timeout_s=CALL_TIMEOUT_S)  # type: ignore[no-any-return]

    poll(lambda: counts()["running"] == 1, CALL_TIMEOUT_S, "the call running in the replica")
    response.cancel()
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(ref, timeout=CALL_TIMEOUT_S)
    with pytest.raises(RequestCancelledError):  # what a cancelled call raises on any backend
        response.result(timeout_s=CALL_TIMEOUT_S)
    poll(
        lambda: counts() == {"running": 0, "cancelled": 1},
        CALL_TIMEOUT_S,
        "its coroutine cancelled",
    )
    # both slots are free again: two calls that wait for each other meet
    refs = [by_ref.meet.remote(2)._to_object_ref_sync() for _ in range(2)]
    assert ray.get(refs, timeout=CALL_TIMEOUT_S) == [2, 2]


def test_by_reference_and_other_calls_share_max_ongoing_requests(on_ray: str) -> None:
    two_at_a_time = OneAtATime.options(max_ongoing_requests=2)
    handle = serve.run(two_at_a_time.bind(), name="two", route_prefix="/two")
    by_ref = handle.options(_by_reference=True)
    refs = [by_ref.work.remote()._to_object_ref_sync() for _ in range(8)]
    plain = [handle.work.remote() for _ in range(8)]
    most = ray.get(refs, timeout=CALL_TIMEOUT_S) + [
        r.result(timeout_s=CALL_TIMEOUT_S) for r in plain
    ]
    assert max(most) == 2


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Slow:
    def __init__(self) -> None:
        self.started = threading.Event()

    def work(self, seconds: float) -> str:
        self.started.set()
        time.sleep(seconds)
        return "finished"

    def has_started(self) -> bool:
        return self.started.is_set()


def test_a_by_reference_call_in_flight_finishes_while_its_replica_drains(on_ray: str) -> None:
    handle = serve.run(Slow.bind(), name="slow", route_prefix="/slow")
    by_ref = handle.options(_by_reference=True)
    ref = by_ref.work.remote(1.5)._to_object_ref_sync()
    poll(
        lambda: handle.has_started.remote().result(timeout_s=CALL_TIMEOUT_S),
        CALL_TIMEOUT_S,
        "the call running in the replica",
    )
    deleting = threading.Thread(target=serve.delete, args=("slow",))
    deleting.start()
    assert ray.get(ref, timeout=CALL_TIMEOUT_S) == "finished"
    deleting.join(CALL_TIMEOUT_S)
    assert not deleting.is_alive()
    assert "slow" not in serve.status().applications


def test_by_reference_calls_count_in_the_replicas_metrics(on_ray: str) -> None:
    handle = serve.run(Echo.bind(), name="counted", route_prefix="/counted")
    by_ref = handle.options(_by_reference=True)
    refs = [by_ref.remote(i)._to_object_ref_sync() for i in range(10)]
    assert ray.get(refs, timeout=CALL_TIMEOUT_S) == list(range(10))
    with pytest.raises(TypeError):
        by_ref.where.remote("unexpected").result(timeout_s=CALL_TIMEOUT_S)
    where = {"application": "counted", "deployment": "Echo"}

    def counted() -> list[tuple[str, dict[str, str], float]] | None:
        samples = scrape(on_ray, CALL_TIMEOUT_S)
        done = total(samples, "serve_deployment_request_counter_total", **where)
        return samples if done == 11 else None

    samples = poll(counted, CALL_TIMEOUT_S, "the 11 calls by reference counted")
    assert total(samples, "serve_deployment_error_counter_total", **where) == 1
    latency = total(samples, "serve_deployment_processing_latency_ms_count", **where)
    assert latency == 11


# -- the CLI, naming the Ray cluster as Ray's tools do --------------------------------------------

CLI_APP = """
import serval as serve

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Greeter:
    def __call__(self, request=None) -> str:
        return "hi from a config file"

app = Greeter.bind()
"""

CONFIG = """
applications:
  - name: greeter
    route_prefix: /greeter
    import_path: cli_ray_app:app
"""


def _serval(*args: str, cwd: Any, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("SERVAL_ADDRESS", "RAY_ADDRESS")}
    proc = subprocess.run(
        [sys.executable, "-m", "serval", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S,
        env={**clean, **(env or {})},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_cli_deploys_shows_and_shuts_down_a_cluster_on_ray(on_ray: str, tmp_path: Any) -> None:
    (tmp_path / "cli_ray_app.py").write_text(CLI_APP)
    (tmp_path / "serve.yaml").write_text(CONFIG)
    address = loopback(ray.get_runtime_context().gcs_address)
    out = _serval("deploy", "serve.yaml", "--address", address, cwd=tmp_path)
    assert "greeter" in out
    assert httpx.get(f"{on_ray}/greeter", timeout=CALL_TIMEOUT_S).text == "hi from a config file"
    # RAY_ADDRESS names the cluster too, as for Ray's own tools
    status = yaml.safe_load(
        _serval("status", "-o", "yaml", cwd=tmp_path, env={"RAY_ADDRESS": address})
    )
    assert status["applications"]["greeter"]["status"] == "RUNNING"
    config = yaml.safe_load(_serval("config", "--address", address, cwd=tmp_path))
    assert config["import_path"] == "cli_ray_app:app"
    assert serve.status().applications["greeter"].status == "RUNNING"  # (this driver sees it)
    _serval("shutdown", "-y", "--address", address, cwd=tmp_path)
    poll(lambda: serval_actors() == [], CALL_TIMEOUT_S, "every serval actor gone")
    serve.shutdown()  # (this driver's connection)
    serve.start(http_options={"port": _port[0]})  # the module's cluster, for what follows


def test_runtime_env_working_dir_is_the_replicas_directory_and_code(
    on_ray: str, tmp_path: Any
) -> None:
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "shipped_module.py").write_text("VALUE = 'from the working_dir'\n")
    env = {"working_dir": str(shipped), "env_vars": {"SERVAL_T_SHIPPED": "1"}}

    @serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": env})
    class Shipped:
        def __call__(self) -> list[Any]:
            import shipped_module  # type: ignore[import-not-found]

            return [
                shipped_module.VALUE,
                os.path.exists("shipped_module.py"),  # the working_dir is its cwd
                os.environ.get("SERVAL_T_SHIPPED"),
            ]

    handle = serve.run(Shipped.bind(), name="shipped", route_prefix="/shipped")
    assert handle.remote().result(timeout_s=CALL_TIMEOUT_S) == ["from the working_dir", True, "1"]
