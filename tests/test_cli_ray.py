"""On the Ray backend, a replica Ray cannot place yet says so in the status (and so in
``serval status`` and the progress lines): what it waits on and what it asks for."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import serval as serve
from chaos.harness import free_port
from conftest import poll
from ray_clusters import CALL_TIMEOUT_S, NODE_CPUS, one_node
from serval._private.caller import control
from serval.deployment import build
from serval.status import ReplicaStatusOverview

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def on_ray() -> Iterator[None]:
    with one_node():
        serve.start(http_options={"port": free_port()})
        yield


def test_a_replica_ray_cannot_place_is_waiting_for_its_actor(on_ray: None) -> None:
    @serve.deployment(ray_actor_options={"num_cpus": NODE_CPUS + 8})
    class Huge:
        def __call__(self) -> str:
            return "never"

    spec = build(Huge.bind(), "huge", None)
    control.call(lambda c: c.deploy_app(spec), timeout=CALL_TIMEOUT_S)
    try:

        def waiting() -> ReplicaStatusOverview | None:
            app = serve.status().applications.get("huge")
            replicas = app.deployments["Huge"].replicas if app is not None else ()
            return next((r for r in replicas if r.phase_s >= 2.0), None)

        replica = poll(waiting, 30, "a replica waiting 2 s")
        assert replica.state == "STARTING"
        assert replica.phase == (
            f"waiting for Ray to place and start its actor (it asks for num_cpus={NODE_CPUS + 8})"
        )
        assert serve.status().applications["huge"].status == "DEPLOYING"
    finally:
        serve.delete("huge")
