"""The local backend's behaviours, run on both backends (as AnyIO runs its tests on each of its
backends): every test here runs once on a local cluster and once on a one-node Ray instance
(``ray.init`` by the driver, as a Ray Serve script does), and checks what a Ray Serve user would
check, with real handles and real HTTP: composition, streaming, batching, multiplexing,
autoscaling, rolling updates, ``user_config``, health checks, graceful drain, back-pressure,
errors with their types and tracebacks, ``/-/metrics`` and the seed's handles.

Each behaviour is here in its cheapest faithful form (short health-check periods, autoscaling
delays and grace periods); the local backend's own modules test each one in depth. Ray runs
last: ``serve.start`` would pick Ray by itself while a driver is connected to it.

A behaviour that fails on Ray because of a defect of the Ray backend is marked with
``ray_defect(reason)``: a strict xfail on the Ray run only, so that the defect stays visible."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import ray
from starlette.requests import Request
from starlette.responses import StreamingResponse

import serval as serve
from chaos.harness import free_port
from conftest import SCALE_TO_ZERO, BackgroundThreads, pid_alive, poll, scrape, total
from ray_clusters import one_node
from serval._private.backends import ray_store
from serval.exceptions import (
    BackPressureError,
    DeploymentFailedError,
    RemoteTraceback,
    ReplicaDiedError,
    ServalError,
)

pytestmark = pytest.mark.timeout(120)

DEADLINE_S = 20.0  # every call is bounded: a hang fails, never stalls the suite
# Every deployment asks Ray for no CPU (a replica reserves one by default, and the Ray node has
# six logical CPUs; the local backend ignores ray_actor_options); and a draining replica waits
# half a second, not two, for callers that cannot answer (the event loops of asyncio.run below
# are gone when their app is deleted).
FAST: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0}, "graceful_shutdown_wait_loop_s": 0.5}

F = TypeVar("F", bound=Callable[..., Any])


@dataclasses.dataclass
class Cluster:
    backend: str  # "local" or "ray"
    url: str  # its HTTP proxy


@pytest.fixture(scope="module", params=["local", "ray"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A serval cluster on the backend of this param, for the module's tests; its proxy on a
    free port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if request.param == "local":
        serve.start(backend="local", http_options={"port": port})
        try:
            yield Cluster("local", url)
        finally:
            serve.shutdown()
    else:
        with one_node():  # shuts serval down, then Ray
            serve.start(http_options={"port": port})  # (Ray, chosen because ray.init ran)
            yield Cluster("ray", url)


@pytest.fixture
def on(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The module's cluster; every app the test deploys is deleted after it. A test marked
    ``ray_defect`` is a strict xfail on Ray."""
    reason = getattr(request.function, "ray_defect", None)
    if reason is not None and cluster.backend == "ray":
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    yield cluster
    for name in list(serve.status().applications):
        serve.delete(name)


def ray_defect(reason: str) -> Callable[[F], F]:
    """Marks a test that fails on Ray because of a defect of the Ray backend (one line)."""

    def mark(test: F) -> F:
        test.ray_defect = reason  # type: ignore[attr-defined]
        return test

    return mark


def kill_replica(cluster: Cluster, replica_id: str, pid: int) -> None:
    """Kill a replica as a crash would: on Ray its actor (``ray.kill``), else its process."""
    if cluster.backend == "ray":
        actor = ray.get_actor(
            ray_store.replica_actor_name(replica_id), namespace=ray_store.DEFAULT_NAMESPACE
        )
        ray.kill(actor, no_restart=True)
    else:
        os.kill(pid, signal.SIGKILL)


def deployment_status(app: str, deployment: str) -> tuple[str, dict[str, int]]:
    apps = serve.status().applications
    if app not in apps or deployment not in apps[app].deployments:
        return "", {}
    dep = apps[app].deployments[deployment]
    return dep.status, dict(dep.replica_states)


def replica_states(app: str, deployment: str) -> dict[str, int]:
    return deployment_status(app, deployment)[1]


def identity() -> tuple[str, int]:
    """(replica id, pid) of the replica running the caller."""
    return serve.get_replica_context().replica_id.unique_id, os.getpid()


def mark_started(marker: str) -> None:
    """In a replica: say, in file ``marker``, that this call runs here (replica id and pid)."""
    rid, pid = identity()
    Path(marker).write_text(f"{rid} {pid}")


def started(marker: Path) -> tuple[str, int]:
    """Wait until a call has run ``mark_started(marker)``: the (replica id, pid) running it."""
    text = poll(lambda: marker.exists() and marker.read_text(), DEADLINE_S, f"{marker.name}")
    rid, pid = str(text).split()
    return rid, int(pid)


# -- composition and HTTP ------------------------------------------------------------------------


@serve.deployment(**FAST)
class Child:
    def double(self, x: int) -> int:
        return 2 * x


@serve.deployment(**FAST)
class Parent:
    def __init__(self, child: Any) -> None:
        self.child = child

    async def add_one(self, x: int) -> int:
        return await self.child.double.remote(x) + 1

    async def __call__(self, request: Request) -> dict[str, Any]:
        x = (await request.json())["x"]
        # A response passed as an argument: resolved before the child's call runs.
        doubled = await self.child.double.remote(self.child.double.remote(x))
        return {"path": request.url.path, "result": doubled}


def test_composition_over_handles_and_http(on: Cluster) -> None:
    parent = serve.run(Parent.bind(Child.bind()), name="family", route_prefix="/family")
    assert parent.add_one.remote(20).result(timeout_s=DEADLINE_S) == 41
    child = serve.get_deployment_handle("Child", app_name="family")
    assert child.double.remote(child.double.remote(3)).result(timeout_s=DEADLINE_S) == 12
    reply = httpx.post(f"{on.url}/family/deep", json={"x": 5}, timeout=DEADLINE_S)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"path": "/family/deep", "result": 20}
    assert httpx.get(f"{on.url}/-/routes", timeout=DEADLINE_S).json() == {"/family": "family"}
    assert httpx.get(f"{on.url}/-/healthz", timeout=DEADLINE_S).text == "success"


# -- streaming -----------------------------------------------------------------------------------

CHUNKS = 5
GAP_S = 0.25


@serve.deployment(**FAST)
class Streamer:
    def count(self, n: int) -> Iterator[int]:
        yield from range(n)

    async def ticks(self, n: int) -> AsyncIterator[str]:
        for i in range(n):
            yield f"tick{i}"

    async def __call__(self, request: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[str]:
            for i in range(CHUNKS):
                if i:
                    await asyncio.sleep(GAP_S)
                yield f"chunk{i}\n"

        return StreamingResponse(chunks(), media_type="text/plain")


def test_streaming_from_a_handle_and_over_http(on: Cluster) -> None:
    handle = serve.run(Streamer.bind(), name="stream", route_prefix="/stream")
    streaming = handle.options(stream=True)
    assert list(streaming.count.remote(4)) == [0, 1, 2, 3]

    async def from_a_loop() -> list[str]:
        return [tick async for tick in streaming.ticks.remote(3)]

    assert asyncio.run(asyncio.wait_for(from_a_loop(), DEADLINE_S)) == ["tick0", "tick1", "tick2"]

    with httpx.Client(timeout=DEADLINE_S) as client:
        client.get(f"{on.url}/-/healthz")  # a warm connection: its set-up is not the point
        start = time.monotonic()
        with client.stream("GET", f"{on.url}/stream") as reply:
            assert reply.status_code == 200
            arrivals = [(time.monotonic() - start, c) for c in reply.iter_raw() if c]
    assert b"".join(c for _, c in arrivals) == b"".join(
        f"chunk{i}\n".encode() for i in range(CHUNKS)
    )
    times = [t for t, _ in arrivals]
    # chunk by chunk as the replica makes them, not the whole body at the end
    assert times[-1] - times[0] > 0.7 * GAP_S * (CHUNKS - 1), times


# -- batching ------------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=16, **FAST)
class Batched:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=5)
    async def __call__(self, xs: list[int]) -> list[int]:
        self.sizes.append(len(xs))
        return [x * 10 for x in xs]

    def batch_sizes(self) -> list[int]:
        return self.sizes


def test_concurrent_calls_are_served_in_batches(on: Cluster) -> None:
    handle = serve.run(Batched.bind(), name="batched", route_prefix="/batched")

    async def eight_at_once() -> list[int]:
        return list(await asyncio.gather(*(handle.remote(i) for i in range(8))))

    start = time.monotonic()
    assert asyncio.run(asyncio.wait_for(eight_at_once(), DEADLINE_S)) == [i * 10 for i in range(8)]
    # two full batches, each sent at once (a partial one would wait out the 5 s timeout)
    assert time.monotonic() - start < 4
    assert handle.batch_sizes.remote().result(timeout_s=DEADLINE_S) == [4, 4]


# -- multiplexing --------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=20, **FAST)
class Multi:
    def __init__(self) -> None:
        self.loads: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        self.loads.append(model_id)
        await asyncio.sleep(0.1)
        return f"model-{model_id}"

    async def __call__(self, request: Request | None = None) -> dict[str, Any]:
        model_id = serve.get_multiplexed_model_id()
        load = model_id and (request is None or request.query_params.get("load") != "0")
        model = await self.get_model(model_id) if load else ""
        return {"id": model_id, "model": model, "pid": os.getpid()}

    def where(self) -> tuple[int, str]:
        """Loads nothing: where a call for a model id was routed, and the id it saw."""
        return os.getpid(), serve.get_multiplexed_model_id()

    def loaded(self) -> tuple[int, list[str]]:
        return os.getpid(), self.loads


def test_multiplexed_models_load_once_and_are_evicted_least_recently_used(on: Cluster) -> None:
    handle = serve.run(Multi.bind(), name="multi", route_prefix="/multi")

    def ask(model_id: str) -> str:
        out = handle.options(multiplexed_model_id=model_id).remote().result(timeout_s=DEADLINE_S)
        assert out["id"] == model_id
        return str(out["model"])

    # concurrent calls for one new model share its one load
    many = [handle.options(multiplexed_model_id="a").remote() for _ in range(6)]
    assert {r.result(timeout_s=DEADLINE_S)["model"] for r in many} == {"model-a"}
    assert [ask(m) for m in ("b", "a", "c", "a", "b")] == [f"model-{m}" for m in "bacab"]
    # "c" evicted "b" (least recently used); "b" evicted "c"; "a" stayed cached throughout
    assert handle.loaded.remote().result(timeout_s=DEADLINE_S)[1] == ["a", "b", "c", "b"]
    # over HTTP the model id is a header
    reply = httpx.get(
        f"{on.url}/multi", headers={"serve_multiplexed_model_id": "h"}, timeout=DEADLINE_S
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "model-h"


def test_calls_for_a_model_go_to_the_replica_holding_it(on: Cluster) -> None:
    handle = serve.run(Multi.options(num_replicas=2).bind(), name="multi", route_prefix="/multi")
    holder = handle.options(multiplexed_model_id="x").remote().result(timeout_s=DEADLINE_S)["pid"]
    routed = handle.where.options(multiplexed_model_id="x")

    def prefers_holder(call: Callable[[], int]) -> Callable[[], bool]:
        streak = [0]

        def check() -> bool:  # ten in a row (by chance alone: 1 in 1024)
            streak[0] = streak[0] + 1 if call() == holder else 0
            return streak[0] >= 10

        return check

    def by_handle() -> int:
        pid, seen = routed.remote().result(timeout_s=DEADLINE_S)
        assert seen == "x"
        return int(pid)

    def by_http() -> int:
        reply = httpx.get(
            f"{on.url}/multi",
            params={"load": 0},  # (routed for "x", loads nothing)
            headers={"serve_multiplexed_model_id": "x"},
            timeout=DEADLINE_S,
        )
        assert reply.json()["id"] == "x"
        return int(reply.json()["pid"])

    poll(prefers_holder(by_handle), DEADLINE_S, "handle calls for 'x' to go to its holder")
    poll(prefers_holder(by_http), DEADLINE_S, "HTTP requests for 'x' to go to its holder")
    loads: dict[int, list[str]] = {}
    poll(
        lambda: (
            loads.update([handle.loaded.remote().result(timeout_s=DEADLINE_S)]) or len(loads) == 2
        ),
        DEADLINE_S,
        "both replicas to say what they loaded",
    )
    assert loads.pop(holder) == ["x"] and list(loads.values()) == [[]]  # loaded once


# -- autoscaling ---------------------------------------------------------------------------------


@serve.deployment(
    max_ongoing_requests=20,
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 1,
        "metrics_interval_s": 0.2,
        "look_back_period_s": 1,
    },
    **FAST,
)
class Scaled:
    async def __call__(self, delay: float = 0.3) -> str:
        await asyncio.sleep(delay)
        return serve.get_replica_context().replica_id.unique_id


class Load(BackgroundThreads):
    """Waves of concurrent async handle calls, from a background thread, until stopped."""

    def __init__(self, handle: Any, concurrency: int = 6) -> None:
        super().__init__()
        self.handle = handle
        self.concurrency = concurrency
        self.errors: list[BaseException] = []
        self.replicas: set[str] = set()
        self.threads.append(threading.Thread(target=lambda: asyncio.run(self._run())))

    async def _run(self) -> None:
        while not self.stop.is_set():
            results = await asyncio.gather(
                *(self.handle.remote(0.3) for _ in range(self.concurrency)),
                return_exceptions=True,
            )
            for r in results:
                if isinstance(r, BaseException):
                    self.errors.append(r)
                else:
                    self.replicas.add(r)


def test_load_scales_up_within_bounds_and_back_down(on: Cluster) -> None:
    handle = serve.run(Scaled.bind(), name="scaled", route_prefix=None)
    assert replica_states("scaled", "Scaled") == {"RUNNING": 1}
    with Load(handle) as load:

        def scaled_up() -> bool:
            states = replica_states("scaled", "Scaled")
            assert sum(states.values()) <= 2, f"beyond max_replicas=2: {states}"
            return states.get("RUNNING", 0) == 2

        poll(scaled_up, DEADLINE_S, "the deployment to scale up under load")
        poll(lambda: len(load.replicas) == 2, DEADLINE_S, "both replicas to serve the load")
    assert not load.errors, load.errors[:3]
    poll(
        lambda: replica_states("scaled", "Scaled") == {"RUNNING": 1},
        DEADLINE_S,
        "the deployment to scale back down to one replica",
    )
    assert handle.remote(0.0).result(timeout_s=DEADLINE_S)


@serve.deployment(autoscaling_config=SCALE_TO_ZERO, **FAST)
class ToZero:
    async def __call__(self, request: Any = None) -> str:
        return "served by " + serve.get_replica_context().replica_id.unique_id


def test_scale_to_zero_holds_an_http_request_until_a_replica_is_up(on: Cluster) -> None:
    serve.run(ToZero.bind(), name="zero", route_prefix="/zero")
    assert replica_states("zero", "ToZero") == {}  # no replica yet; the app runs
    assert serve.status().applications["zero"].status == "RUNNING"
    reply = httpx.get(f"{on.url}/zero", timeout=DEADLINE_S)
    assert reply.status_code == 200, reply.text
    assert reply.text.startswith("served by ")
    poll(
        lambda: sum(replica_states("zero", "ToZero").values()) == 0,
        DEADLINE_S,
        "the deployment to scale back to zero when idle",
    )


# -- rolling updates and user_config -------------------------------------------------------------


@serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=2, **FAST)
class Versioned:
    def __init__(self, version: str) -> None:
        self.version = version

    def __call__(self, request: Any = None) -> str:
        return f"{self.version}:{os.getpid()}"


class Traffic(BackgroundThreads):
    """Handle calls and HTTP GETs, each from a thread of its own, until stopped."""

    def __init__(self, handle: Any, url: str) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.results: list[str] = []  # in completion order, both sources
        self.errors: list[str] = []
        self.threads.append(threading.Thread(target=self._by_handle, args=(handle,)))
        self.threads.append(threading.Thread(target=self._by_http, args=(url,)))

    def _record(self, result: str | None, error: str | None = None) -> None:
        with self.lock:
            if error is not None:
                self.errors.append(error)
            elif result is not None:
                self.results.append(result)

    def _by_handle(self, handle: Any) -> None:
        while not self.stop.is_set():
            try:
                self._record(handle.remote().result(timeout_s=DEADLINE_S))
            except Exception as exc:
                self._record(None, f"handle: {type(exc).__name__}: {exc}")

    def _by_http(self, url: str) -> None:
        with httpx.Client(timeout=DEADLINE_S) as client:
            while not self.stop.is_set():
                try:
                    r = client.get(url)
                    if r.status_code == 200:
                        self._record(r.text)
                    else:
                        self._record(None, f"http {r.status_code}: {r.text[:200]}")
                except Exception as exc:
                    self._record(None, f"http: {type(exc).__name__}: {exc}")

    def answers(self) -> list[str]:
        with self.lock:
            return list(self.results)


def test_rolling_update_under_traffic_fails_no_request(on: Cluster) -> None:
    handle = serve.run(Versioned.bind("v1"), name="roll", route_prefix="/roll")
    with Traffic(handle, f"{on.url}/roll") as traffic:
        poll(lambda: len(traffic.answers()) >= 20, DEADLINE_S, "traffic to flow")
        old_pids = {int(a.split(":")[1]) for a in traffic.answers()}
        assert len(old_pids) == 2
        serve.run(Versioned.bind("v2"), name="roll", route_prefix="/roll")
        # once serve.run returns the new code answers; the old replicas drain and exit
        poll(
            lambda: not any(pid_alive(p) for p in old_pids),
            DEADLINE_S,
            "the old replicas to exit",
        )
        done = len(traffic.answers())
        poll(lambda: len(traffic.answers()) >= done + 20, DEADLINE_S, "traffic after the update")
    assert not traffic.errors, f"{len(traffic.errors)} failed: {traffic.errors[:5]}"
    answers = traffic.answers()
    versions = [a.split(":")[0] for a in answers]
    assert "v1" in versions and "v2" in versions
    # after the old replicas exited only new code, in new processes, answered (one answer per
    # thread may have been received before and recorded after)
    late = answers[done + 2 :]
    assert {a.split(":")[0] for a in late} == {"v2"}
    new_pids = {int(a.split(":")[1]) for a in late}
    assert len(new_pids) == 2 and not new_pids & old_pids
    assert replica_states("roll", "Versioned") == {"RUNNING": 2}


@serve.deployment(user_config={"greeting": "hello"}, **FAST)
class Configurable:
    def __init__(self) -> None:
        self.configs: list[Any] = []

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.configs.append(config)

    def __call__(self) -> tuple[list[Any], str, int]:
        return (self.configs, *identity())


def test_user_config_and_num_replicas_are_applied_in_place(on: Cluster) -> None:
    handle = serve.run(Configurable.bind(), name="conf", route_prefix=None)
    configs, rid, pid = handle.remote().result(timeout_s=DEADLINE_S)
    assert configs == [{"greeting": "hello"}]  # reconfigure ran after the constructor

    changed = Configurable.options(user_config={"greeting": "bonjour"})
    serve.run(changed.bind(), name="conf", route_prefix=None)
    # when serve.run returns the replica has the new config, in the same process
    assert handle.remote().result(timeout_s=DEADLINE_S) == (
        [{"greeting": "hello"}, {"greeting": "bonjour"}],
        rid,
        pid,
    )
    serve.run(changed.options(num_replicas=2).bind(), name="conf", route_prefix=None)
    assert deployment_status("conf", "Configurable") == ("HEALTHY", {"RUNNING": 2})
    seen: dict[str, Any] = {}
    poll(
        lambda: (
            seen.update({(a := handle.remote().result(timeout_s=DEADLINE_S))[1]: a})
            or len(seen) == 2
        ),
        DEADLINE_S,
        "both replicas to answer",
    )
    assert seen[rid] == ([{"greeting": "hello"}, {"greeting": "bonjour"}], rid, pid)  # kept
    ((_, new),) = [(r, a) for r, a in seen.items() if r != rid]
    assert new[0] == [{"greeting": "bonjour"}]  # the new replica starts with the new config


# -- health checks and failures ------------------------------------------------------------------


@serve.deployment(health_check_period_s=0.5, health_check_timeout_s=1, **FAST)
class Patient:
    def __init__(self) -> None:
        self.healthy = True

    def fall_ill(self) -> None:
        self.healthy = False

    def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("unhealthy on purpose")

    def identity(self) -> tuple[str, int]:
        return identity()

    def block(self, seconds: float, marker: str) -> tuple[str, int]:
        mark_started(marker)
        time.sleep(seconds)
        return identity()


def _replaced(handle: Any, old: tuple[str, int], replicas: int = 1) -> None:
    """Wait for a new replica to answer in ``old``'s place, old's process to end and the
    deployment to be HEALTHY again."""

    def new_one() -> bool:
        try:
            return bool(handle.identity.remote().result(timeout_s=DEADLINE_S)[0] != old[0])
        except ReplicaDiedError:  # (raced with the end of the old one: ask again)
            return False

    poll(new_one, DEADLINE_S, "a replacement replica to answer")
    poll(lambda: not pid_alive(old[1]), DEADLINE_S, "the old replica's process to end")
    poll(
        lambda: deployment_status("health", "Patient") == ("HEALTHY", {"RUNNING": replicas}),
        DEADLINE_S,
        "the deployment to be HEALTHY again",
    )


def test_an_unhealthy_replica_is_replaced(on: Cluster) -> None:
    handle = serve.run(Patient.bind(), name="health", route_prefix=None)
    old = handle.identity.remote().result(timeout_s=DEADLINE_S)
    handle.fall_ill.remote().result(timeout_s=DEADLINE_S)
    start = time.monotonic()
    _replaced(handle, old)
    assert time.monotonic() - start < DEADLINE_S
    ident = handle.identity.remote().result(timeout_s=DEADLINE_S)
    assert ident[1] != old[1]  # a new process


def test_a_killed_replica_fails_calls_on_it_fast_and_queued_ones_go_elsewhere(
    on: Cluster, tmp_path: Path
) -> None:
    handle = serve.run(
        Patient.options(num_replicas=2, max_ongoing_requests=1).bind(),
        name="health",
        route_prefix=None,
    )
    victim_call = handle.block.remote(30, str(tmp_path / "victim"))
    victim = started(tmp_path / "victim")
    other_call = handle.block.remote(1.0, str(tmp_path / "other"))
    other = started(tmp_path / "other")
    assert victim != other
    # both replicas are full (max_ongoing_requests=1): these wait at the caller
    queued = [handle.block.remote(0.05, str(tmp_path / f"q{i}")) for i in range(4)]
    kill_replica(on, *victim)
    start = time.monotonic()
    with pytest.raises(ReplicaDiedError):
        victim_call.result(timeout_s=DEADLINE_S)
    assert time.monotonic() - start < 3.0, "a call on a dead replica must fail fast"
    assert other_call.result(timeout_s=DEADLINE_S) == other
    served_by = {r.result(timeout_s=DEADLINE_S) for r in queued}
    assert victim not in served_by, "no queued call may go to the dead replica"
    _replaced(handle, victim, replicas=2)


# -- graceful drain ------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=10, **FAST)
class Draining:
    async def slow(self, seconds: float, marker: str) -> tuple[str, int]:
        mark_started(marker)
        await asyncio.sleep(seconds)
        return identity()

    def quick(self) -> str:
        return "quick"


def test_delete_lets_calls_in_flight_finish_and_refuses_new_ones(
    on: Cluster, tmp_path: Path
) -> None:
    handle = serve.run(Draining.bind(), name="drain", route_prefix=None)
    calls = [handle.slow.remote(1.5, str(tmp_path / f"m{i}")) for i in range(3)]
    (where,) = {started(tmp_path / f"m{i}") for i in range(3)}
    deleter = threading.Thread(target=serve.delete, args=("drain",), daemon=True)
    start = time.monotonic()
    deleter.start()
    poll(
        lambda: (
            getattr(serve.status().applications.get("drain"), "status", None) in (None, "DELETING")
        ),
        DEADLINE_S,
        "the app to be deleting",
        interval=0.02,
    )
    refused = time.monotonic()
    with pytest.raises(ServalError):  # neither sent to the draining replica nor held
        handle.quick.remote().result(timeout_s=DEADLINE_S)
    assert time.monotonic() - refused < 2.0
    assert [c.result(timeout_s=DEADLINE_S) for c in calls] == [where] * 3
    deleter.join(DEADLINE_S)
    assert not deleter.is_alive()
    assert time.monotonic() - start < 1.5 + 5  # the calls' time, not a grace period's
    assert "drain" not in serve.status().applications
    poll(lambda: not pid_alive(where[1]), DEADLINE_S, "the drained replica's process to end")


def test_past_its_graceful_shutdown_timeout_a_replica_is_stopped_and_its_call_fails(
    on: Cluster, tmp_path: Path
) -> None:
    hasty = Draining.options(graceful_shutdown_timeout_s=0.5)
    handle = serve.run(hasty.bind(), name="drain", route_prefix=None)
    call = handle.slow.remote(30, str(tmp_path / "m"))
    _, pid = started(tmp_path / "m")
    start = time.monotonic()
    serve.delete("drain")
    assert time.monotonic() - start < 5.0, "delete must not wait for the call past 0.5 s"
    poll(lambda: not pid_alive(pid), DEADLINE_S, "the replica's process to end")
    with pytest.raises(ServalError) as info:  # a clear error, not a hang nor a timeout
        call.result(timeout_s=5.0)
    assert not isinstance(info.value, TimeoutError), info.value


# -- back-pressure -------------------------------------------------------------------------------


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1, **FAST)
class Single:
    async def hold(self, seconds: float, marker: str = "") -> str:
        if marker:
            mark_started(marker)
        await asyncio.sleep(seconds)
        return "done"

    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(0.5)
        return "slow done"


def test_max_queued_requests_rejects_with_back_pressure(on: Cluster, tmp_path: Path) -> None:
    handle = serve.run(Single.bind(), name="single", route_prefix="/single")
    busy = handle.hold.remote(1.5, str(tmp_path / "busy"))
    started(tmp_path / "busy")  # the replica's one slot is taken
    start = time.monotonic()
    queued = handle.hold.remote(0)  # waits in this caller's queue (one allowed)
    rejected = [handle.hold.remote(0) for _ in range(3)]
    for r in rejected:
        with pytest.raises(BackPressureError):
            r.result(timeout_s=DEADLINE_S)
    assert time.monotonic() - start < 1.0, "rejected at once, not after the busy call"
    assert busy.result(timeout_s=DEADLINE_S) == "done"
    assert queued.result(timeout_s=DEADLINE_S) == "done"
    assert handle.hold.remote(0).result(timeout_s=DEADLINE_S) == "done"  # accepted again

    # over HTTP the proxy is the caller: what it cannot queue is a 503
    def get(_: int) -> httpx.Response:
        return httpx.get(f"{on.url}/single", timeout=DEADLINE_S)

    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(get, range(6)))
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) == {200, 503}, statuses
    assert all("Traceback" not in r.text for r in replies)
    assert httpx.get(f"{on.url}/single", timeout=DEADLINE_S).text == "slow done"


# -- errors --------------------------------------------------------------------------------------


class CodedError(Exception):
    """A user's own exception class, with state of its own."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code


@serve.deployment(**FAST)
class Faulty:
    def bad_input(self, x: int) -> int:
        raise ValueError(f"bad input {x}")

    async def coded(self) -> None:
        await asyncio.sleep(0)
        raise CodedError("coded failure", 418)

    def ok(self) -> str:
        return "ok"

    async def __call__(self, request: Request) -> str:
        raise RuntimeError("secret detail: hunter2")


@serve.deployment(**FAST)
class Wrapper:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, x: int) -> int:
        return await self.inner.bad_input.remote(x)


def test_errors_keep_their_type_and_the_replicas_traceback(on: Cluster) -> None:
    handle = serve.run(Faulty.bind(), name="faulty", route_prefix="/faulty")
    with pytest.raises(ValueError, match="bad input 7") as info:
        handle.bad_input.remote(7).result(timeout_s=DEADLINE_S)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "bad_input" in str(info.value.__cause__)

    async def awaited() -> None:
        await handle.coded.remote()

    with pytest.raises(CodedError, match="coded failure") as coded:
        asyncio.run(asyncio.wait_for(awaited(), DEADLINE_S))
    assert type(coded.value) is CodedError and coded.value.code == 418
    assert "coded" in str(coded.value.__cause__)

    wrapped = serve.run(Wrapper.bind(Faulty.bind()), name="wrapped", route_prefix=None)
    with pytest.raises(ValueError, match="bad input 5") as through:
        wrapped.remote(5).result(timeout_s=DEADLINE_S)
    assert "bad_input" in str(through.value.__cause__)

    reply = httpx.get(f"{on.url}/faulty", timeout=DEADLINE_S)  # no traceback to HTTP clients
    assert reply.status_code == 500
    assert reply.headers.get("x-request-id")
    assert "Traceback" not in reply.text and "hunter2" not in reply.text
    assert handle.ok.remote().result(timeout_s=DEADLINE_S) == "ok"  # still serving


@serve.deployment(**FAST)
class BadInit:
    def __init__(self) -> None:
        raise RuntimeError("constructor exploded")

    def __call__(self) -> str:
        return "never"


def test_a_failing_constructor_fails_the_deploy_promptly_with_its_traceback(
    on: Cluster,
) -> None:
    start = time.monotonic()
    with pytest.raises(DeploymentFailedError) as info:
        serve.run(BadInit.bind(), name="bad", route_prefix=None)
    assert time.monotonic() - start < DEADLINE_S
    text = str(info.value)
    assert "RuntimeError" in text and "constructor exploded" in text
    assert "__init__" in text  # the replica's traceback
    assert serve.status().applications["bad"].status == "DEPLOY_FAILED"


# -- metrics -------------------------------------------------------------------------------------


@serve.deployment(**FAST)
class Scored:
    def __init__(self) -> None:
        self.calls = serve.metrics.Counter("both_calls", "Calls.", tag_keys=("kind",))

    def record(self, n: int) -> int:
        self.calls.inc(tags={"kind": "sync"})
        return n

    def fail(self) -> None:
        raise RuntimeError("no")

    async def __call__(self, request: Request) -> str:
        return "ok"


def test_replica_and_proxy_metrics_are_served_at_the_proxy(on: Cluster) -> None:
    handle = serve.run(Scored.bind(), name="scored", route_prefix="/scored")
    assert [handle.record.remote(n).result(timeout_s=DEADLINE_S) for n in (1, 2, 3)] == [1, 2, 3]
    with pytest.raises(RuntimeError):
        handle.fail.remote().result(timeout_s=DEADLINE_S)
    assert httpx.get(f"{on.url}/scored", timeout=DEADLINE_S).text == "ok"
    where = {"application": "scored", "deployment": "Scored"}

    def settled() -> list[tuple[str, dict[str, str], float]] | None:
        # (a sync call's answer leaves before the replica counts it: counts catch up)
        samples = scrape(on.url, DEADLINE_S)
        done = total(samples, "serve_deployment_request_counter_total", **where)
        return samples if done == 5 else None

    samples = poll(settled, DEADLINE_S, "the five answered requests in the scrape")
    assert total(samples, "both_calls_total", kind="sync", **where) == 3
    assert total(samples, "serve_deployment_error_counter_total", **where) == 1
    http = {"route": "/scored", "method": "GET", "status_code": "200"}
    assert total(samples, "serve_num_http_requests_total", **http) == 1


# -- the seed's handles (the ServeHandle guide) --------------------------------------------------


@serve.deployment(**FAST)
class Model:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(self, x: int) -> int:
        return x + 1

    def double(self, x: int) -> int:
        return 2 * x

    async def slow(self, seconds: float, value: int) -> int:
        await asyncio.sleep(seconds)
        return value

    def which(self) -> str:
        return self.tag


@serve.deployment(**FAST)
class Caller:
    """Uses ``Model.get_handle()`` from inside a replica: it targets the caller's app."""

    def __init__(self, model: Any) -> None:
        pass

    def sync_chain(self, x: int) -> int:
        h = Model.get_handle()
        return int(serve.get(h.double.remote(h.remote(x)), timeout=DEADLINE_S))

    async def async_which(self) -> str:
        ref = await Model.get_handle(sync=False).which.remote()
        return str(await ref)


def test_the_guides_handles_get_and_wait(on: Cluster) -> None:
    serve.run(Caller.bind(Model.bind("in-app")), name="legacy", route_prefix=None)
    handle = Model.get_handle()
    assert isinstance(handle, serve.RayServeSyncHandle)
    ref = handle.remote(1)
    # on Ray the refs are Ray's own (ray.get and ray.wait take them), else serval's
    assert isinstance(ref, ray.ObjectRef if on.backend == "ray" else serve.ObjectRef)
    assert serve.get(ref, timeout=DEADLINE_S) == 2
    assert serve.get(handle.options(method_name="double").remote(5), timeout=DEADLINE_S) == 10
    slow, fast = handle.slow.remote(2.0, 1), handle.remote(1)
    ready, not_ready = serve.wait([slow, fast], num_returns=1, timeout=DEADLINE_S)
    assert (ready, not_ready) == ([fast], [slow])
    assert serve.get([slow, fast], timeout=DEADLINE_S) == [1, 2]

    async def guide_async() -> list[int]:
        async_handle = Model.get_handle(sync=False)
        assert isinstance(async_handle, serve.RayServeHandle)
        refs = [await async_handle.double.remote(i) for i in range(4)]
        return list(await asyncio.gather(*refs))

    assert asyncio.run(asyncio.wait_for(guide_async(), DEADLINE_S)) == [0, 2, 4, 6]
    # inside a replica the guide's handle targets the caller's app
    caller = serve.get_app_handle("legacy")
    assert caller.async_which.remote().result(timeout_s=DEADLINE_S) == "in-app"


def test_a_ref_passed_to_another_call_is_resolved_first(on: Cluster) -> None:
    # The guide's composition: a ref (from the driver, or inside a replica) as an argument.
    serve.run(Caller.bind(Model.bind("in-app")), name="legacy", route_prefix=None)
    handle = Model.get_handle()
    assert serve.get(handle.remote(handle.double.remote(3)), timeout=DEADLINE_S) == 7
    assert serve.get_app_handle("legacy").sync_chain.remote(3).result(timeout_s=DEADLINE_S) == 8
