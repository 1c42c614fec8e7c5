"""What the controller's status says of each replica (its phase, for how long; the reason a
health check failed), and the progress lines ``serve.run`` logs from it: on the real controller
over the in-memory backend on virtual time, and one real ``serve.run``."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from serval._private.backends.memory import Script
from serval._progress import Progress
from serval.status import (
    ApplicationStatusOverview,
    DeploymentStatusOverview,
    ReplicaStatusOverview,
    ServeStatus,
)
from test_controller_memory import APP, World, deployment, run


async def _deployment_status(w: World) -> DeploymentStatusOverview:
    return (await w.calls.status()).applications[APP].deployments["D"]


def test_status_names_each_replicas_phase_and_how_long_it_has_been_in_it() -> None:
    async def body(w: World) -> None:
        w.backend.script = Script(boot_s=2.0, init_s=5.0)
        await w.deploy(deployment(num_replicas=2))
        await w.clock.advance(1.5)
        dep = await _deployment_status(w)
        assert dep.target_replicas == 2
        assert [(r.state, r.phase, r.phase_s) for r in dep.replicas] == [
            ("STARTING", "starting its process", 1.5)
        ] * 2
        await w.clock.advance(3.5)  # registered at 2 s: 3 s into its constructor
        dep = await _deployment_status(w)
        assert [(r.phase, r.phase_s) for r in dep.replicas] == [
            ("running its constructor", 3.0)
        ] * 2
        await w.clock.advance(2.0)
        dep = await _deployment_status(w)
        assert [(r.state, r.phase) for r in dep.replicas] == [("RUNNING", "")] * 2
        assert dep.replica_states == {"RUNNING": 2} and dep.message == ""

    run(body)


def test_a_failed_health_check_is_the_deployments_message_until_one_passes() -> None:
    async def body(w: World) -> None:
        config = {"num_replicas": 2, "health_check_period_s": 2.0, "health_check_timeout_s": 1.0}
        await w.deploy(deployment(**config))
        assert await w.wait_app() == ("RUNNING", "")
        sick, _ = w.backend.replicas
        sick.script.health = "fail"
        await w.clock.advance(2.0)
        dep = await _deployment_status(w)
        assert dep.message.startswith(f"replica {sick.replica_id} failed its health check (")
        assert "is unhealthy (scripted)" in dep.message
        await w.clock.advance(1.0)  # the other replica passed its check too: still said
        assert (await _deployment_status(w)).message.startswith(f"replica {sick.replica_id} ")
        await w.clock.advance(1.5)  # the replacement passes its first
        assert (await _deployment_status(w)).message == ""

    run(body)


def _status(running: int, starting: int, *replicas: ReplicaStatusOverview) -> ServeStatus:
    states = {k: v for k, v in {"RUNNING": running, "STARTING": starting}.items() if v}
    dep = DeploymentStatusOverview("UPDATING", states, "", 2, replicas)
    return ServeStatus({"default": ApplicationStatusOverview("DEPLOYING", deployments={"M": dep})})


def test_progress_lines_come_on_change_only_and_name_a_slow_replica() -> None:
    progress = Progress(["default"], slow_s=3.0, every_s=10.0)
    booting = ReplicaStatusOverview("r1", "STARTING", "starting its process", 0.5)
    assert progress.update(_status(0, 2, booting)) == [
        "deployment 'M': 0/2 replicas running, 2 starting"
    ]
    assert progress.update(_status(0, 2, booting)) == []
    slow = ReplicaStatusOverview("r1", "STARTING", "running its constructor", 3.2)
    assert progress.update(_status(1, 1, slow)) == [
        "deployment 'M': 1/2 replicas running, 1 starting",
        "replica r1 of 'M' is running its constructor (for 3 s)",
    ]
    still = ReplicaStatusOverview("r1", "STARTING", "running its constructor", 9.0)
    assert progress.update(_status(1, 1, still)) == []  # the same, not 10 s further yet
    later = ReplicaStatusOverview("r1", "STARTING", "running its constructor", 13.5)
    assert progress.update(_status(1, 1, later)) == [
        "replica r1 of 'M' is running its constructor (for 14 s)"
    ]
    assert progress.update(_status(2, 0)) == ["deployment 'M': 2/2 replicas running"]


@pytest.mark.timeout(60)
def test_serve_run_logs_progress_through_the_serval_logger(
    serve_instance: Any, caplog: pytest.LogCaptureFixture
) -> None:
    serve = serve_instance

    @serve.deployment(num_replicas=2)
    class Slow:
        def __init__(self) -> None:
            time.sleep(3.5)

        def __call__(self) -> str:
            return "ok"

    with caplog.at_level(logging.INFO, logger="serval"):
        serve.run(Slow.bind(), name="slow", route_prefix=None)
    lines = [r.getMessage() for r in caplog.records if r.name == "serval.progress"]
    assert lines[0] == "deployment 'Slow' (application 'slow'): 0/2 replicas running, 2 starting"
    assert lines[-1] == "deployment 'Slow' (application 'slow'): 2/2 replicas running"
    assert any(
        " of 'Slow' (application 'slow') is running its constructor (for " in x for x in lines
    )


def test_serve_run_asks_nothing_for_progress_when_info_is_off(serve_instance: Any) -> None:
    serve = serve_instance
    assert not logging.getLogger("serval.progress").isEnabledFor(logging.INFO)

    @serve.deployment
    def hello() -> str:
        return "hi"

    calls: list[str] = []
    from serval._private.wire import control

    original = control.ControllerCalls.status

    async def counted(self: control.ControllerCalls) -> ServeStatus:
        calls.append("status")
        return await original(self)

    control.ControllerCalls.status = counted  # type: ignore[method-assign]
    try:
        serve.run(hello.bind(), name="quiet", route_prefix=None)
    finally:
        control.ControllerCalls.status = original  # type: ignore[method-assign]
    assert calls == []
