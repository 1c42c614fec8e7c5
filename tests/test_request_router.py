"""Custom request routers, written as Ray Serve's "custom request router" guide writes them: a
``RequestRouter`` subclass whose ``choose_replicas`` ranks the candidates, named in the
deployment's ``request_router_config`` (or, in the older spelling, ``request_router_class``);
``record_routing_stats()`` on the replicas feeds each ``RunningReplica.routing_stats``; the
replica context's ``replica_id`` is a ``ReplicaID``."""

from __future__ import annotations

import os
from typing import Any

import pytest

import serval as serve
from conftest import replica_pids
from serval.config import RequestRouterConfig
from serval.context import _get_internal_replica_context
from serval.exceptions import BackPressureError
from serval.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

pytestmark = pytest.mark.timeout(120)
DEADLINE_S = 20.0


class FirstByIdRouter(RequestRouter):
    """Always the replica whose id sorts first; remembers what it routed where."""

    routed: list[ReplicaID] = []

    def initialize_state(self, label: str = "") -> None:
        self.label = label

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        assert pending_request is not None and pending_request.metadata.call_method == "__call__"
        return [[min(candidate_replicas, key=lambda r: r.replica_id.unique_id)]]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        assert self.label == "first"  # request_router_kwargs reached initialize_state
        FirstByIdRouter.routed.append(replica_id)


@serve.deployment(
    request_router_config=RequestRouterConfig(
        request_router_class=FirstByIdRouter, request_router_kwargs={"label": "first"}
    ),
    num_replicas=3,
)
class WhoServes:
    def __init__(self) -> None:
        self.replica_id: ReplicaID = _get_internal_replica_context().replica_id

    async def __call__(self) -> ReplicaID:
        return self.replica_id


def test_a_custom_router_chooses_every_replica(apps: None) -> None:
    FirstByIdRouter.routed.clear()
    handle = serve.run(WhoServes.bind(), name="first", route_prefix=None)
    served = [handle.remote().result(timeout_s=DEADLINE_S) for _ in range(12)]
    expected = min(served, key=lambda r: r.unique_id)
    assert served == [expected] * 12
    assert expected.deployment_id == serve.config.DeploymentID("WhoServes", "first")
    assert str(expected) == (
        f"Replica(id='{expected.unique_id}', deployment='WhoServes', app='first')"
    )
    assert FirstByIdRouter.routed == [expected] * 12
    # the replicas are there: without the router, calls spread over all three
    plain = serve.run(WhoServes.options(request_router_config=None).bind(), name="plain")
    seen = {plain.remote().result(timeout_s=DEADLINE_S).unique_id for _ in range(60)}
    assert len(seen) == 3


class HighestPidRouter(RequestRouter):
    """The replica with the highest pid in its routing stats; no choice (the call waits, and
    the router is asked again) until every replica has reported its stats."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if len(candidate_replicas) < 2 or not all(
            "pid" in r.routing_stats for r in candidate_replicas
        ):
            return []
        return [[max(candidate_replicas, key=lambda r: r.routing_stats["pid"])]]


@serve.deployment(
    request_router_class="test_request_router:HighestPidRouter",
    request_routing_stats_period_s=0.2,
    request_routing_stats_timeout_s=5,
    num_replicas=2,
)
class Pids:
    def __call__(self) -> int:
        return os.getpid()

    def record_routing_stats(self) -> dict[str, Any]:
        return {"pid": os.getpid()}


def test_routing_stats_reach_the_router_and_a_call_waits_for_a_choice(apps: None) -> None:
    handle = serve.run(Pids.bind(), name="pids", route_prefix=None)
    answers = [handle.remote() for _ in range(10)]
    pids = [r.result(timeout_s=DEADLINE_S) for r in answers]
    assert len(set(pids)) == 1
    # both replicas run; the router chose the one whose reported pid is the higher
    both = replica_pids("pids", "Pids")
    assert len(both) == 2 and pids[0] == max(both.values())


class FailingRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        raise RuntimeError("this router cannot choose")


@serve.deployment(request_router_config={"request_router_class": FailingRouter})
class Anything:
    def __call__(self) -> str:
        return "served"


def test_a_router_that_raises_fails_the_call_with_its_error(apps: None) -> None:
    handle = serve.run(Anything.bind(), name="failing", route_prefix=None)
    with pytest.raises(RuntimeError, match="this router cannot choose"):
        handle.remote().result(timeout_s=DEADLINE_S)


class NeverRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        return []


def test_calls_waiting_for_a_custom_router_count_against_max_queued_requests(
    apps: None,
) -> None:
    never = Anything.options(
        request_router_config=RequestRouterConfig(request_router_class=NeverRouter),
        max_queued_requests=2,
    )
    handle = serve.run(never.bind(), name="never", route_prefix=None)
    waiting = [handle.remote(), handle.remote()]
    with pytest.raises(BackPressureError):
        handle.remote().result(timeout_s=DEADLINE_S)
    for response in waiting:
        response.cancel()


def test_request_router_config_is_checked() -> None:
    with pytest.raises(ValueError, match="request_router_class"):
        RequestRouterConfig(request_router_class="no path")
    with pytest.raises(ValueError, match="request_routing_stats_period_s"):
        RequestRouterConfig(request_routing_stats_period_s=0)
    with pytest.raises(TypeError, match="request_router_config"):
        serve.deployment(request_router_config=42)(Anything.func_or_class)
