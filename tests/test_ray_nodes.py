"""The Ray backend on three nodes (``ray.cluster_utils.Cluster``: a head and two workers on this
machine): replicas go where their resources say, a caller on one node calls a replica on
another over authenticated TCP (the Unix socket only on the replica's own node), and a removed
node's replicas are replaced on the nodes left, with calls failing fast, never hanging."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import ray

import serval as serve
from chaos.harness import free_port
from conftest import poll
from ray_clusters import CALL_TIMEOUT_S, node_of, serval_actors, three_nodes
from serval._private.backends import ray_store
from serval._private.caller import runtime
from serval._private.wire import endpoints
from serval.exceptions import DeploymentFailedError, ReplicaDiedError

pytestmark = pytest.mark.timeout(300)


_port = [0]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with three_nodes() as c:
        _port[0] = free_port()
        serve.start(http_options={"port": _port[0]})
        yield c


@pytest.fixture
def apps(cluster: Any) -> Iterator[Any]:
    yield cluster
    for name in list(serve.status().applications):
        serve.delete(name)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Where:
    def __call__(self) -> str:
        return str(ray.get_runtime_context().get_node_id())


def _addresses(app: str, deployment: str) -> list[str]:
    """The addresses the driver's router has for the replicas of ``app.deployment``."""
    client = runtime.home_client()
    router = client.routers[(app, deployment)]
    return [slot.info.address for slot in router.slots.values()]


def test_replicas_go_where_their_resources_say(apps: Any) -> None:
    for resource in ("w1", "w2", "head"):
        placed = Where.options(
            name=f"On_{resource}",
            num_replicas=2,
            ray_actor_options={"num_cpus": 0, "resources": {resource: 1}},
        )
        handle = serve.run(placed.bind(), name=resource, route_prefix=f"/{resource}")
        seen = {handle.remote().result(timeout_s=CALL_TIMEOUT_S) for _ in range(20)}
        assert seen == {node_of(resource)}


def test_a_call_to_another_node_goes_over_tcp_and_to_this_node_over_the_socket(
    apps: Any,
) -> None:
    here = ray.get_runtime_context().get_node_id()
    assert here == node_of("head")
    remote = Where.options(name="Remote", ray_actor_options={"num_cpus": 0, "resources": {"w1": 1}})
    local = Where.options(name="Local", ray_actor_options={"num_cpus": 0, "resources": {"head": 1}})
    far = serve.run(remote.bind(), name="far", route_prefix="/far")
    near = serve.run(local.bind(), name="near", route_prefix="/near")
    assert far.remote().result(timeout_s=CALL_TIMEOUT_S) == node_of("w1")
    assert near.remote().result(timeout_s=CALL_TIMEOUT_S) == here
    (far_address,) = _addresses("far", "Remote")
    (near_address,) = _addresses("near", "Local")
    assert endpoints.choose(far_address).kind == "tcp"
    assert endpoints.choose(near_address).kind == "unix"


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Hop:
    def __init__(self, child: Any) -> None:
        self.child = child

    async def __call__(self) -> list[str]:
        mine = str(ray.get_runtime_context().get_node_id())
        return [mine, await self.child.remote()]


def test_composition_across_nodes(apps: Any) -> None:
    child = Where.options(name="Leaf", ray_actor_options={"num_cpus": 0, "resources": {"w2": 1}})
    root = Hop.options(ray_actor_options={"num_cpus": 0, "resources": {"w1": 1}})
    handle = serve.run(root.bind(child.bind()), name="hop", route_prefix="/hop")
    assert handle.remote().result(timeout_s=CALL_TIMEOUT_S) == [node_of("w1"), node_of("w2")]


def test_max_replicas_per_node_spreads_replicas_and_says_when_nodes_run_out(apps: Any) -> None:
    spread = Where.options(name="Spread", num_replicas=3, max_replicas_per_node=1)
    handle = serve.run(spread.bind(), name="spread", route_prefix="/spread")
    seen = {handle.remote().result(timeout_s=CALL_TIMEOUT_S) for _ in range(60)}
    assert len(seen) == 3  # one per node
    crowded = Where.options(name="Crowded", num_replicas=4, max_replicas_per_node=1)
    with pytest.raises(DeploymentFailedError, match="no node has room"):
        serve.run(crowded.bind(), name="crowded", route_prefix="/crowded")


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Grouped:
    def __call__(self) -> list[Any]:
        group = ray.util.get_current_placement_group()
        return [group.bundle_count, group.bundle_specs] if group is not None else []


def test_placement_group_bundles_reserve_resources_for_the_replica(apps: Any) -> None:
    bundles = [{"CPU": 0.5}, {"CPU": 0.5, "w2": 1}]
    grouped = Grouped.options(placement_group_bundles=bundles, placement_group_strategy="SPREAD")
    handle = serve.run(grouped.bind(), name="grouped", route_prefix="/grouped")
    count, specs = handle.remote().result(timeout_s=CALL_TIMEOUT_S)
    assert count == 2
    assert specs[1]["w2"] == 1
    serve.delete("grouped")
    poll(lambda: not _groups_alive(), CALL_TIMEOUT_S, "the placement group removed")


def _groups_alive() -> list[Any]:
    table = ray.util.placement_group_table()
    return [g for g in table.values() if g["state"] != "REMOVED"]


def _proxies() -> dict[str, Any]:
    """node id -> the actor of its HTTP proxy."""
    return {
        name.split(":", 1)[1]: ray.get_actor(name, namespace=ray_store.DEFAULT_NAMESPACE)
        for name in serval_actors()
        if name.startswith("SERVAL_PROXY:")
    }


def _alive_nodes() -> set[str]:
    return {str(n["NodeID"]) for n in ray.nodes() if n["Alive"]}


def _served() -> dict[str, int]:
    return {
        node: ray.get(actor.requests_served.remote(), timeout=CALL_TIMEOUT_S)
        for node, actor in _proxies().items()
    }


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Hello:
    def __call__(self, request: Any = None) -> str:
        return "hello"


def _metric(text: str, route: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("serve_num_http_requests_total{") and f'route="{route}"' in line
    )


def test_every_node_has_a_proxy_and_each_serves_http(apps: Any) -> None:
    poll(lambda: set(_proxies()) == _alive_nodes(), CALL_TIMEOUT_S, "a proxy on every node")
    serve.run(Hello.bind(), name="hello", route_prefix="/hello")
    url = f"http://127.0.0.1:{_port[0]}"
    before = _served()
    for _ in range(150):  # a connection each: the kernel spreads them over the proxies
        assert httpx.get(f"{url}/hello", timeout=CALL_TIMEOUT_S).text == "hello"
    after = _served()
    assert all(after[node] > before[node] for node in after), (before, after)
    # /-/metrics, from any proxy, counts every proxy's requests
    counted = _metric(httpx.get(f"{url}/-/metrics", timeout=CALL_TIMEOUT_S).text, "/hello")
    assert counted >= 150


def test_head_only_runs_one_proxy_on_the_head(apps: Any) -> None:
    serve.shutdown()
    try:
        serve.start(proxy_location="HeadOnly", http_options={"port": _port[0]})
        assert set(_proxies()) == {node_of("head")}
        serve.run(Hello.bind(), name="hello", route_prefix="/hello")
        url = f"http://127.0.0.1:{_port[0]}/hello"
        assert httpx.get(url, timeout=CALL_TIMEOUT_S).text == "hello"
    finally:
        serve.shutdown()
        serve.start(http_options={"port": _port[0]})  # the module's cluster, as it was


def test_a_removed_nodes_replicas_are_replaced_elsewhere(apps: Any) -> None:
    cluster = apps
    # Anywhere but the head (the driver's node): spread over the two workers by resources.
    anywhere = {"num_cpus": 0, "resources": {"spare": 1}}
    spare = cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources={"spare": 100})
    cluster.wait_for_nodes()
    try:
        handle = serve.run(
            Where.options(name="Mobile", num_replicas=2, ray_actor_options=anywhere).bind(),
            name="mobile",
            route_prefix="/mobile",
        )
        doomed = handle.remote().result(timeout_s=CALL_TIMEOUT_S)
        # a second node with the resource, for the replacements
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources={"spare": 100})
        cluster.wait_for_nodes()
        cluster.remove_node(spare)
        spare = None

        def moved() -> bool:
            try:
                seen = {handle.remote().result(timeout_s=5) for _ in range(10)}
            except Exception:
                return False
            return doomed not in seen

        poll(moved, CALL_TIMEOUT_S, "the replicas replaced on the new node")

        def states() -> dict[str, int]:
            return serve.status().applications["mobile"].deployments["Mobile"].replica_states

        poll(lambda: states() == {"RUNNING": 2}, CALL_TIMEOUT_S, "two replicas running")
    finally:
        if spare is not None:
            cluster.remove_node(spare)


@serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {"doomed": 1}})
class Sleepy:
    def __call__(self, seconds: float) -> str:
        time.sleep(seconds)
        return str(ray.get_runtime_context().get_node_id())


def test_calls_in_flight_on_a_lost_node_fail_fast_and_later_calls_go_elsewhere(apps: Any) -> None:
    cluster = apps
    nodes = [
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"doomed": 1})
        for _ in range(2)
    ]
    cluster.wait_for_nodes()
    try:
        handle = serve.run(
            Sleepy.options(num_replicas=2).bind(), name="sleepy", route_prefix="/sleepy"
        )
        homes = {handle.remote(0).result(timeout_s=CALL_TIMEOUT_S) for _ in range(30)}
        assert len(homes) == 2
        in_flight = [handle.remote(30) for _ in range(2)]  # one on each, most likely
        time.sleep(0.5)  # (they reach their replicas)
        victim = nodes.pop(0)
        cluster.remove_node(victim)
        started = time.monotonic()
        outcomes = []
        for response in in_flight:
            try:
                outcomes.append(response.result(timeout_s=CALL_TIMEOUT_S))
            except ReplicaDiedError:
                outcomes.append("died")
        assert "died" in outcomes
        assert time.monotonic() - started < 35  # the survivor's own 30 s, no hang beyond
        # a new node takes the lost replica's place; calls meanwhile go to the survivor
        nodes.append(
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", resources={"doomed": 1})
        )
        for _ in range(10):
            assert handle.remote(0).result(timeout_s=CALL_TIMEOUT_S)
    finally:
        serve.delete("sleepy")
        for node in nodes:
            cluster.remove_node(node)


def test_a_killed_controller_actor_is_restarted_with_traffic_flowing(apps: Any) -> None:
    remote = Where.options(
        name="Far", num_replicas=2, ray_actor_options={"num_cpus": 0, "resources": {"w1": 1}}
    )
    handle = serve.run(remote.bind(), name="far", route_prefix="/far")
    failures: list[BaseException] = []
    done = [0]
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                handle.remote().result(timeout_s=10)
                done[0] += 1
            except BaseException as exc:
                failures.append(exc)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        poll(lambda: done[0] > 50, CALL_TIMEOUT_S, "traffic")
        namespace = ray_store.DEFAULT_NAMESPACE
        old = ray_store.controller_endpoint(namespace)
        ray.kill(ray.get_actor(ray_store.CONTROLLER_ACTOR, namespace=namespace), no_restart=False)
        poll(
            lambda: ray_store.controller_endpoint(namespace) != old,
            CALL_TIMEOUT_S,
            "a new controller",
        )
        before = done[0]
        poll(lambda: done[0] > before + 50, CALL_TIMEOUT_S, "traffic after")
        states = serve.status().applications["far"].deployments["Far"].replica_states
        assert states == {"RUNNING": 2}
    finally:
        stop.set()
        thread.join(15)
    assert failures == []
