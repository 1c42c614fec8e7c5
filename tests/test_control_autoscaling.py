"""Autoscaling end to end: load scales a deployment up within its bounds and its end scales it
back down; scale to zero holds a request until a replica is up (handle and HTTP) and returns to
zero when idle; ``num_replicas="auto"`` is accepted."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import httpx

import serval as serve
from conftest import SCALE_TO_ZERO, BackgroundThreads, poll

DEPLOYMENT = "Slow"


def replica_states(app: str = "default", deployment: str = DEPLOYMENT) -> dict[str, int]:
    apps = serve.status().applications
    if app not in apps or deployment not in apps[app].deployments:
        return {}
    return dict(apps[app].deployments[deployment].replica_states)


def total(states: dict[str, int]) -> int:
    return sum(states.values())


@serve.deployment(
    name=DEPLOYMENT,
    max_ongoing_requests=20,
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 1,
        "metrics_interval_s": 0.2,
        "look_back_period_s": 1,
    },
)
class Slow:
    async def __call__(self, delay: float = 0.3) -> str:
        await asyncio.sleep(delay)
        return serve.get_replica_context().replica_id.unique_id


class Load(BackgroundThreads):
    """Waves of concurrent async handle calls from a background thread until stopped."""

    def __init__(self, handle: Any, concurrency: int = 8) -> None:
        super().__init__()
        self.handle = handle
        self.concurrency = concurrency
        self.ok = 0
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
                    self.ok += 1
                    self.replicas.add(r)


def test_load_scales_up_within_bounds_and_back_down(serve_instance: Any) -> None:
    handle = serve.run(Slow.bind())
    assert replica_states() == {"RUNNING": 1}

    peak = 0
    with Load(handle) as load:

        def scaled_up() -> bool:
            nonlocal peak
            states = replica_states()
            live = states.get("RUNNING", 0) + states.get("STARTING", 0)
            assert live <= 3, f"more replicas than max_replicas=3: {states}"
            peak = max(peak, states.get("RUNNING", 0))
            return states.get("RUNNING", 0) > 1

        poll(scaled_up, timeout=10, what="the deployment to scale up under load")
        # Requests reach the new replicas too.
        poll(lambda: len(load.replicas) > 1, timeout=5, what="a second replica to serve requests")
        for _ in range(10):  # never beyond max_replicas while the load goes on
            scaled_up()
            time.sleep(0.1)
    assert not load.errors, load.errors[:3]
    assert load.ok > 0
    assert 1 < peak <= 3

    poll(
        lambda: replica_states() == {"RUNNING": 1},
        timeout=10,
        what="the deployment to scale back down to 1 replica after the load",
    )
    assert serve.status().applications["default"].status == "RUNNING"
    assert handle.remote(0.0).result(timeout_s=10)


@serve.deployment(name=DEPLOYMENT, autoscaling_config=SCALE_TO_ZERO)
class ToZero:
    async def __call__(self, request: Any = None) -> str:
        await asyncio.sleep(0.05)
        return "served " + serve.get_replica_context().replica_id.unique_id


def test_scale_to_zero_holds_a_request_until_a_replica_is_up(serve_instance: Any) -> None:
    start = time.monotonic()
    handle = serve.run(ToZero.bind())
    assert time.monotonic() - start < 10, "serve.run should not wait for a replica at zero"
    assert total(replica_states()) == 0, replica_states()
    assert serve.status().applications["default"].status == "RUNNING"

    # A request at zero replicas is held, not rejected, and served once a replica is up.
    assert handle.remote().result(timeout_s=15).startswith("served ")
    assert replica_states().get("RUNNING", 0) >= 1

    poll(
        lambda: total(replica_states()) == 0,
        timeout=10,
        what="the deployment to scale back to zero when idle",
    )

    # And again from zero: the second cold start is served too.
    assert handle.remote().result(timeout_s=15).startswith("served ")


def test_scale_to_zero_holds_an_http_request(http_url: str) -> None:
    serve.run(ToZero.bind(), route_prefix="/zero")
    assert total(replica_states()) == 0, replica_states()
    r = httpx.get(f"{http_url}/zero", timeout=15)
    assert r.status_code == 200, r.text
    assert r.text.startswith("served ")
    poll(
        lambda: total(replica_states()) == 0,
        timeout=10,
        what="the deployment to scale back to zero when idle",
    )


@serve.deployment(num_replicas="auto")
class Auto:
    def __call__(self) -> str:
        return "auto"


def test_num_replicas_auto_is_accepted(serve_instance: Any) -> None:
    handle = serve.run(Auto.bind())
    assert handle.remote().result(timeout_s=10) == "auto"
    status = serve.status().applications["default"]
    assert status.status == "RUNNING"
    assert status.deployments["Auto"].replica_states == {"RUNNING": 1}

    # Also through .options(), overriding one of the defaults.
    handle = serve.run(
        Auto.options(num_replicas="auto", autoscaling_config={"max_replicas": 4}).bind(),
        name="other",
        route_prefix="/other",
    )
    assert handle.remote().result(timeout_s=10) == "auto"
    assert serve.status().applications["other"].deployments["Auto"].replica_states == {"RUNNING": 1}
