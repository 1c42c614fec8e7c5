"""``serve.run(app, _local_testing_mode=True)``, as Ray Serve's unit tests use it: the app runs
and every feature reachable through handles works as without the flag (serval runs a real local
cluster for it: nothing about the app changes). Composition with a response nested in an
argument, ``@serve.batch(batch_size_fn=)`` with the multiplexed model id inside the batch, the
legacy handle API, a custom request router and a custom autoscaling policy."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import serval as serve
from conftest import poll
from serval.config import AutoscalingContext, RequestRouterConfig
from serval.request_router import PendingRequest, RequestRouter, RunningReplica

pytestmark = pytest.mark.timeout(120)
DEADLINE_S = 20.0


@serve.deployment
class Doubler:
    def __call__(self, x: int) -> int:
        return 2 * x


@serve.deployment
class Words:
    @serve.batch(
        max_batch_size=4, batch_wait_timeout_s=0.2, batch_size_fn=lambda items: sum(map(len, items))
    )
    async def count(self, items: list[str]) -> list[str]:
        model = serve.get_multiplexed_model_id()
        return [f"{model}:{len(items)}:{item}" for item in items]

    async def __call__(self, item: str) -> str:
        return await self.count(item)


class LastRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        return [[max(candidate_replicas, key=lambda r: r.replica_id.unique_id)]]


def keep_two(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    return 2, {}


@serve.deployment(
    num_replicas=2,
    request_router_config=RequestRouterConfig(request_router_class=LastRouter),
)
class Routed:
    def __call__(self) -> str:
        return serve.get_replica_context().replica_id.unique_id


@serve.deployment
class Ingress:
    def __init__(self, doubler: Any, words: Any, routed: Any) -> None:
        self.doubler = doubler
        self.words = words
        self.routed = routed

    async def nested(self, n: int) -> int:
        parts = [self.doubler.remote(i) for i in range(n)]
        return sum(await asyncio.gather(*parts))

    async def batched(self, item: str) -> str:
        return await self.words.options(multiplexed_model_id="m1").remote(item)

    async def routed_by(self) -> list[str]:
        return [await self.routed.remote() for _ in range(6)]


def test_every_handle_feature_works_in_local_testing_mode(serve_instance: Any) -> None:
    app = Ingress.bind(Doubler.bind(), Words.bind(), Routed.bind())
    handle = serve.run(app, name="ltm", route_prefix=None, _local_testing_mode=True)
    assert handle.nested.remote(4).result(timeout_s=DEADLINE_S) == 12
    got = [handle.batched.remote(w) for w in ("ab", "cd", "ef")]
    texts = [r.result(timeout_s=DEADLINE_S) for r in got]
    assert all(
        t.startswith("m1:") and t.endswith(w)
        for t, w in zip(texts, ("ab", "cd", "ef"), strict=True)
    )
    routed = handle.routed_by.remote().result(timeout_s=DEADLINE_S)
    assert len(set(routed)) == 1  # the custom router chose one replica of the two
    # the legacy handle API (Ray 2.0-2.6) and a custom autoscaling policy
    doubler = serve.get_deployment_handle("Doubler", app_name="ltm")
    legacy = doubler.options(use_new_handle_api=False)

    async def old_style() -> int:
        ref = await legacy.remote(21)
        return int(await ref)

    assert asyncio.run(old_style()) == 42
    scaled = Doubler.options(
        name="Scaled",
        autoscaling_config={
            "min_replicas": 1,
            "max_replicas": 3,
            "upscale_delay_s": 0.0,
            "metrics_interval_s": 0.5,
            "policy": {"policy_function": keep_two},
        },
    )
    scaled_handle = serve.run(
        scaled.bind(), name="scaled", route_prefix=None, _local_testing_mode=True
    )
    assert scaled_handle.remote(5).result(timeout_s=DEADLINE_S) == 10

    def two_running() -> bool:
        states = serve.status().applications["scaled"].deployments["Scaled"].replica_states
        return states == {"RUNNING": 2}

    poll(two_running, DEADLINE_S, "the policy's two replicas")
