"""Custom autoscaling policies (Ray Serve's advanced autoscaling guide, "Custom autoscaling
policies"): ``autoscaling_config={"policy": AutoscalingPolicy(policy_function=...)}``, custom
metrics from ``record_autoscaling_stats()``, class-based policies with ``policy_kwargs``, and
application-level policies from a config file; the built-in policy stays the default.

The policy runs in a replica, never in the controller (``replica/autoscaling.py`` says why).
Tested at three levels: the pure decision (factors, bounds, delays) on plain floats; the
controller on the in-memory backend and a fake clock, whose replicas run the policy with the
real runner in-process; and end to end, on a real cluster, with the guide's examples.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.requests import Request

import serval as serve
from conftest import poll
from serval._private.caller import runtime
from serval._private.controller.autoscaling import AutoscalingPolicy as Decider
from serval._private.replica.autoscaling import PolicyRunner
from serval.autoscaling_policy import replica_queue_length_autoscaling_policy
from serval.config import (
    AutoscalingConfig,
    AutoscalingContext,
    AutoscalingPolicy,
    DeploymentID,
    ReplicaID,
    TimeStampedValue,
)
from test_controller_memory import APP, World, app_spec, deployment
from test_controller_memory import run as run_world

# -- policies the tests steer (module level: they pickle by reference, run in-process) ------------

WISH: dict[str, Any] = {}
SEEN: list[AutoscalingContext] = []
SEEN_APP: list[dict[DeploymentID, AutoscalingContext]] = []


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    WISH.clear()
    WISH.update(n=1, fail=None)
    SEEN.clear()
    SEEN_APP.clear()
    yield


def wish_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Wants WISH["n"] replicas (or raises WISH["fail"])."""
    SEEN.append(ctx)
    if WISH["fail"]:
        raise ValueError(WISH["fail"])
    return WISH["n"], {}


def counting_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """Keeps the target, counting its decisions in its policy_state."""
    SEEN.append(ctx)
    return ctx.target_num_replicas, {"ticks": ctx.policy_state.get("ticks", 0) + 1}


def coordinated_policy(
    contexts: dict[DeploymentID, AutoscalingContext],
) -> tuple[dict[DeploymentID, int], dict[DeploymentID, dict[str, Any]]]:
    """The guide's application-level shape: the model follows the preprocessor."""
    SEEN_APP.append(contexts)
    pre = next(d for d in contexts if d.name == "Preprocessor")
    model = next(d for d in contexts if d.name == "Model")
    states = {
        d: {"scale_count": ctx.policy_state.get("scale_count", 0) + 1}
        for d, ctx in contexts.items()
    }
    return {pre: WISH["n"], model: WISH["n"] * 2}, states


FAST = {
    "upscale_delay_s": 0.0,
    "downscale_delay_s": 0.0,
    "metrics_interval_s": 1.0,
    "look_back_period_s": 0.5,  # each decision sees the latest sample only
}


def custom(policy: Any, **config: Any) -> AutoscalingConfig:
    base: dict[str, Any] = {"min_replicas": 1, "max_replicas": 5, **FAST}
    base.update(config)
    return AutoscalingConfig(**base, policy=AutoscalingPolicy(policy_function=policy))


def use_runner(w: World) -> None:
    """Every replica of the world runs policies with the real runner (inline: on virtual time)."""
    w.backend.script.autoscale = PolicyRunner(inline=True).run


# -- the pure decision: the config applied to a custom policy's wish ------------------------------


def decider(**config: Any) -> Decider:
    base: dict[str, Any] = {"min_replicas": 0, "max_replicas": 10, "metrics_interval_s": 1.0}
    base.update(config)
    return Decider(AutoscalingConfig(**base), now=0.0)


def test_a_wish_waits_for_its_delay_and_a_reversal_restarts_it() -> None:
    d = decider(upscale_delay_s=5.0, downscale_delay_s=20.0)
    assert [d.decide_custom(t, 2, 6) for t in (1, 3, 5)] == [2, 2, 2]
    assert d.decide_custom(6, 2, 6) == 6  # wanted since 1: 5 s
    assert d.decide_custom(7, 6, 1) == 6
    assert d.decide_custom(8, 6, 9) == 6  # up again: the down timer is gone
    assert d.decide_custom(12, 6, 9) == 6
    assert d.decide_custom(13, 6, 9) == 9
    assert d.decide_custom(14, 9, 9) == 9


def test_a_wish_is_rounded_up_scaled_by_the_factors_and_bounded() -> None:
    d = decider(upscale_delay_s=0, downscale_delay_s=0, min_replicas=1, max_replicas=8)
    assert d.decide_custom(1, 2, 2.1) == 3
    assert d.decide_custom(2, 3, 50) == 8
    assert d.decide_custom(3, 8, 0) == 1
    f = decider(
        upscale_delay_s=0, downscale_delay_s=0, upscaling_factor=0.5, downscaling_factor=0.5
    )
    assert f.decide_custom(1, 2, 10) == 6  # 2 + 0.5 * 8
    assert f.decide_custom(2, 6, 2) == 4  # 6 - 0.5 * 4
    assert f.decide_custom(3, 4, 3) == 3  # at least one step


def test_down_to_zero_goes_through_one_and_waits_downscale_to_zero_delay_s() -> None:
    d = decider(upscale_delay_s=0, downscale_delay_s=2.0, downscale_to_zero_delay_s=30.0)
    assert d.decide_custom(1, 4, 0) == 4
    assert d.decide_custom(3, 4, 0) == 1  # 2 s: down, to one first
    assert d.decide_custom(4, 1, 0) == 1  # zero wanted from here
    assert d.decide_custom(33, 1, 0) == 1
    assert d.decide_custom(34, 1, 0) == 0  # for 30 s
    without = decider(upscale_delay_s=0, downscale_delay_s=2.0)
    assert without.decide_custom(1, 1, 0) == 1
    assert without.decide_custom(3, 1, 0) == 0  # downscale_delay_s when not set


def test_cold_start_brings_up_ceil_upscaling_factor_replicas() -> None:
    assert decider().cold_start(0) == 1
    assert decider(upscaling_factor=2.5).cold_start(0) == 3
    assert decider(upscaling_factor=0.2).cold_start(0) == 1
    assert decider(upscaling_factor=9, max_replicas=4).cold_start(0) == 4


def test_the_built_in_policy_waits_downscale_to_zero_delay_s_for_zero_load() -> None:
    d = decider(min_replicas=0, target_ongoing_requests=1, downscale_delay_s=5.0,
                downscale_to_zero_delay_s=50.0)  # fmt: skip
    d.record(0.0, 0.0)
    assert d.decide(1.0, 1) == 1
    assert d.decide(10.0, 1) == 1  # zero load for 10 s: downscale_delay_s, not enough
    assert d.decide(52.0, 1) == 0


def test_the_default_policy_function_is_requests_over_target() -> None:
    config = AutoscalingConfig(min_replicas=0, max_replicas=10, target_ongoing_requests=4)

    def ctx(current: int, target: int, requests: float) -> AutoscalingContext:
        did = DeploymentID("D", "app")
        return AutoscalingContext(did, "D", "app", current, target, [], requests, 0.0, None,
                                  None, 0, 10, {}, None, None, 0.0, config)  # fmt: skip

    assert replica_queue_length_autoscaling_policy(ctx(2, 2, 10)) == (2.5, {})
    assert replica_queue_length_autoscaling_policy(ctx(0, 0, 3)) == (1, {})  # cold start
    assert replica_queue_length_autoscaling_policy(ctx(0, 0, 0)) == (0, {})


# -- the types ------------------------------------------------------------------------------------


def test_a_policy_given_as_an_object_becomes_its_path_and_opaque_bytes() -> None:
    policy = AutoscalingPolicy(policy_function=wish_policy)
    assert policy.policy_function == "test_autoscaling_custom:wish_policy"
    assert policy.get_policy() is wish_policy
    assert not policy.is_default_policy_function()
    assert AutoscalingPolicy().is_default_policy_function()
    assert AutoscalingPolicy(policy_function=wish_policy) == policy
    # every form Ray's config takes, and the bare function
    for given in ({"policy_function": wish_policy}, policy, wish_policy):
        assert AutoscalingConfig(policy=given).policy == policy  # type: ignore[arg-type]
    assert AutoscalingConfig(policy={"policy_function": "m.n:f"}).policy.policy_function == "m.n:f"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"policy_function": "no_colon_or_dot"}, ValueError),
        ({"policy_function": 3}, ValueError),
        ({"policy_function": "m:f", "policy_kwargs": {"x": object()}}, ValueError),
        ({"policy_function": "m:f", "unknown": 1}, TypeError),
    ],
)
def test_bad_policies_are_refused(fields: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        AutoscalingPolicy(**fields)


def test_the_controller_reads_a_config_with_a_policy_without_the_users_code(
    tmp_path: Path,
) -> None:
    """What the controller receives unpickles where the policy's module cannot be imported,
    and still names it: nothing of the user's is loaded to read it."""
    (tmp_path / "users_policy.py").write_text("def policy(ctx):\n    return 3, {}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import users_policy  # type: ignore[import-not-found]

        config = AutoscalingConfig(policy={"policy_function": users_policy.policy})
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("users_policy", None)
    script = (
        "import pickle, sys\n"
        "config = pickle.loads(sys.stdin.buffer.read())\n"
        "assert 'users_policy' not in sys.modules\n"
        "print(config.policy.policy_function)\n"
    )
    done = subprocess.run(
        [sys.executable, "-P", "-c", script],
        input=pickle.dumps(config),
        capture_output=True,
        cwd="/",
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "users_policy:policy"


# -- the runner, as a replica runs it --------------------------------------------------------------


def context(name: str = "D", app: str = "app", **values: Any) -> AutoscalingContext:
    did = DeploymentID(name, app)
    fields: dict[str, Any] = dict(
        deployment_id=did, deployment_name=name, app_name=app, current_num_replicas=1,
        target_num_replicas=1, running_replicas=[ReplicaID("r1", did)], total_num_requests=0.0,
        total_queued_requests=0.0, aggregated_metrics={}, raw_metrics={},
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=5, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=0.0,
        config=AutoscalingConfig(max_replicas=5),
    )  # fmt: skip
    fields.update(values)
    return AutoscalingContext(**fields)


class FileBasedAutoscalingPolicy:
    """The guide's class-based policy: a target read from a JSON file by a background task."""

    def __init__(self, file_path: str, poll_interval_s: float = 5.0):
        self._file_path = Path(file_path)
        self._poll_interval_s = poll_interval_s
        self._desired_replicas: int = 1
        self._task: asyncio.Task[None] | None = None
        self._started: bool = False
        self.loop: asyncio.AbstractEventLoop | None = None

    def _ensure_started(self) -> None:
        if self._started:
            return
        self._started = True
        self.loop = asyncio.get_running_loop()
        self._task = self.loop.create_task(self._poll_file())

    async def _poll_file(self) -> None:
        while True:
            try:
                data = json.loads(self._file_path.read_text())
                self._desired_replicas = int(data["replicas"])
            except Exception:
                pass  # keep the last known value on failure
            await asyncio.sleep(self._poll_interval_s)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        self._ensure_started()
        return self._desired_replicas, {"last_polled_value": self._desired_replicas}


def test_a_class_based_policy_is_made_once_and_runs_on_a_loop_of_its_own(tmp_path: Path) -> None:
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"replicas": 4}))
    policy = AutoscalingPolicy(
        policy_function=FileBasedAutoscalingPolicy,
        policy_kwargs={"file_path": str(target), "poll_interval_s": 0.01},
    )
    runner = PolicyRunner()

    async def main() -> list[Any]:
        answers = []
        for replicas in (4, 2):
            target.write_text(json.dumps({"replicas": replicas}))
            for _ in range(200):  # until its background task has read the file
                wishes, state = await runner.run(policy, [context()], b"", False)
                if wishes == [float(replicas)]:
                    break
                await asyncio.sleep(0.01)
            answers.append((wishes, pickle.loads(state)))
        return answers

    assert asyncio.run(main()) == [
        ([4.0], {"last_polled_value": 4}),
        ([2.0], {"last_polled_value": 2}),
    ]
    (instance,) = runner._policies.values()  # one instance for every decision
    assert isinstance(instance, FileBasedAutoscalingPolicy)
    assert instance.loop is not None and instance.loop is runner._loop  # not the caller's


def test_the_runner_returns_state_to_the_policy_and_checks_its_answers() -> None:
    runner = PolicyRunner()

    def answer(fn: Any, state: bytes = b"") -> tuple[list[float | None], bytes]:
        return asyncio.run(
            runner.run(AutoscalingPolicy(policy_function=fn), [context()], state, False)
        )

    wishes, state = answer(counting_policy)
    assert wishes == [1.0] and pickle.loads(state) == {"ticks": 1}
    assert pickle.loads(answer(counting_policy, state)[1]) == {"ticks": 2}

    async def async_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
        await asyncio.sleep(0)
        return 2.5, {"async": True}

    assert answer(async_policy)[0] == [2.5]
    bad = [
        (lambda ctx: 3, TypeError, "must return \\(target_replicas, policy_state\\)"),
        (lambda ctx: ("3", {}), TypeError, "not a number"),
        (lambda ctx: (float("inf"), {}), ValueError, "inf"),
        (lambda ctx: (1, ["state"]), TypeError, "policy_state must be a dict"),
        (lambda ctx: (1, {"lock": __import__("threading").Lock()}), TypeError, "does not pickle"),
    ]
    for fn, error, message in bad:
        with pytest.raises(error, match=message):
            answer(fn)
    assert answer(lambda ctx: (-2, None))[0] == [0.0]


def test_an_application_policy_gets_every_context_and_its_own_state_each() -> None:
    runner = PolicyRunner()
    pre, model, other = context("Preprocessor"), context("Model"), context("Other")
    policy = AutoscalingPolicy(policy_function=coordinated_policy)
    WISH["n"] = 2
    wishes, state = asyncio.run(runner.run(policy, [pre, model, other], b"", True))
    assert wishes == [2.0, 4.0, None]  # it decided nothing for Other
    saved = pickle.loads(state)
    assert saved[pre.deployment_id] == {"scale_count": 1}
    wishes, state = asyncio.run(
        runner.run(policy, [context("Preprocessor"), context("Model")], state, True)
    )
    assert SEEN_APP[-1][pre.deployment_id].policy_state == {"scale_count": 1}
    assert pickle.loads(state)[pre.deployment_id] == {"scale_count": 2}

    def stranger(contexts: dict[DeploymentID, AutoscalingContext]) -> Any:
        return {DeploymentID("Nope", "app"): 1}, {}

    with pytest.raises(ValueError, match="unknown"):
        asyncio.run(runner.run(AutoscalingPolicy(policy_function=stranger), [pre], b"", True))


def test_a_policy_given_by_path_is_imported_where_it_runs(tmp_path: Path) -> None:
    (tmp_path / "path_policy.py").write_text("def policy(ctx):\n    return 7, {'by': 'path'}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        policy = AutoscalingPolicy(policy_function="path_policy:policy")
        assert policy._serialized_policy_def == b""  # nothing imported to make it
        assert "path_policy" not in sys.modules
        wishes, state = asyncio.run(PolicyRunner().run(policy, [context()], b"", False))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("path_policy", None)
    assert wishes == [7.0] and pickle.loads(state) == {"by": "path"}


# -- the controller, on the in-memory backend and a fake clock ------------------------------------


def test_a_custom_policy_decides_the_target_within_the_configs_delays_and_bounds() -> None:
    async def body(w: World) -> None:
        use_runner(w)
        config = custom(wish_policy, upscale_delay_s=2.0, downscale_delay_s=5.0)
        await w.deploy(deployment(autoscaling_config=config))
        assert await w.wait_app() == ("RUNNING", "")
        WISH["n"] = 3
        took = await w.advance_until(lambda: len(w.backend.live()) == 3, 10, "up to 3")
        assert 2.0 <= took <= 2.0 + 2 * config.metrics_interval_s, took
        WISH["n"] = 40  # beyond max_replicas
        await w.advance_until(lambda: len(w.backend.live()) == 5, 10, "up to the max")
        assert await w.wait_app() == ("RUNNING", "")
        WISH["n"] = 0  # below min_replicas
        took = await w.advance_until(lambda: len(w.backend.live()) == 1, 20, "down to the min")
        assert 5.0 <= took <= 5.0 + 2 * config.metrics_interval_s + 1.0, took
        await w.clock.advance(10)
        assert await w.status() == ("RUNNING", "HEALTHY", {"RUNNING": 1})

    run_world(body)


def test_the_policy_sees_the_deployment_in_its_context() -> None:
    async def body(w: World) -> None:
        use_runner(w)
        w.backend.script.ongoing = 4
        w.backend.script.autoscaling_stats = {"cpu_usage": 85.0}
        config = custom(wish_policy, min_replicas=1, max_replicas=3)
        await w.deploy(deployment(autoscaling_config=config))
        assert await w.wait_app() == ("RUNNING", "")
        await w.calls.record_queued({(APP, "D"): 3})
        await w.advance_until(lambda: SEEN, 5, "a decision")
        ctx = SEEN[-1]
        (replica,) = w.backend.replicas
        did = DeploymentID("D", APP)
        assert ctx.deployment_id == did and ctx.deployment_name == "D" and ctx.app_name == APP
        assert (ctx.current_num_replicas, ctx.target_num_replicas) == (1, 1)
        assert ctx.running_replicas == [ReplicaID(replica.replica_id, did)]
        assert (ctx.total_num_requests, ctx.total_queued_requests) == (7.0, 3.0)  # 4 + 3 waiting
        assert ctx.total_running_requests == 4.0
        assert ctx.aggregated_metrics == {"cpu_usage": {ReplicaID(replica.replica_id, did): 85.0}}
        (sample,) = ctx.raw_metrics["cpu_usage"][ReplicaID(replica.replica_id, did)]
        assert isinstance(sample, TimeStampedValue) and sample.value == 85.0
        assert abs(sample.timestamp - w.clock.time()) <= config.metrics_interval_s
        assert (ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas) == (1, 3)
        assert ctx.config == config and ctx.policy_state == {}
        assert abs(ctx.current_time - w.clock.time()) <= config.metrics_interval_s  # type: ignore[operator]
        assert ctx.last_scale_up_time is None and ctx.last_scale_down_time is None
        WISH["n"] = 2
        await w.advance_until(lambda: SEEN[-1].target_num_replicas == 2, 5, "the new target")
        assert SEEN[-1].last_scale_up_time is not None
        assert SEEN[-1].last_scale_up_time <= w.clock.time()

    run_world(body)


def test_one_replica_runs_the_policy_its_state_is_kept_and_another_takes_over() -> None:
    async def body(w: World) -> None:
        use_runner(w)
        config = custom(counting_policy, min_replicas=2, max_replicas=2)
        await w.deploy(deployment(autoscaling_config=config))
        assert await w.wait_app() == ("RUNNING", "")
        await w.advance_until(lambda: len(SEEN) >= 3, 10, "three decisions")
        assert [ctx.policy_state.get("ticks", 0) for ctx in SEEN[:3]] == [0, 1, 2]
        runners = [r for r in w.backend.replicas if "autoscale" in r.calls]
        assert len(runners) == 1  # the same one each time
        runners[0].crash()
        seen = len(SEEN)
        await w.advance_until(lambda: len(SEEN) >= seen + 2, 20, "decisions by another")
        assert [r for r in w.backend.replicas if "autoscale" in r.calls][1:] != []
        ticks = [ctx.policy_state.get("ticks", 0) for ctx in SEEN]
        assert ticks == list(range(len(ticks)))  # its state went on, none lost or repeated

    run_world(body)


def test_a_failing_policy_changes_nothing_and_is_logged_until_it_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(w: World) -> None:
        use_runner(w)
        await w.deploy(deployment(autoscaling_config=custom(wish_policy)))
        assert await w.wait_app() == ("RUNNING", "")
        WISH.update(n=4, fail="no metrics today")
        with caplog.at_level(logging.WARNING, "serval._private.controller.custom_autoscaling"):
            await w.clock.advance(5)
        assert len(SEEN) >= 4 and len(w.backend.live()) == 1
        failures = [r for r in caplog.records if "no metrics today" in r.getMessage()]
        assert len(failures) == 1, "logged once, not on every tick"
        assert "wish_policy" in failures[0].getMessage()
        WISH["fail"] = None
        await w.advance_until(lambda: len(w.backend.live()) == 4, 5, "the policy decides again")

    run_world(body)


def test_at_zero_replicas_waiting_requests_start_replicas_without_the_policy() -> None:
    async def body(w: World) -> None:
        use_runner(w)
        config = custom(wish_policy, min_replicas=0, initial_replicas=0, upscaling_factor=2.0)
        await w.deploy(deployment(autoscaling_config=config))
        assert await w.wait_app() == ("RUNNING", "")
        await w.clock.advance(5)
        assert w.backend.replicas == [] and SEEN == []  # nothing runs it, nothing changes
        await w.calls.record_queued({(APP, "D"): 3})
        await w.clock.settle()
        assert len(w.backend.replicas) == 2  # ceil(upscaling_factor), at once
        WISH["n"] = 1
        await w.advance_until(lambda: SEEN, 5, "the policy, once a replica runs")

    run_world(body)


def test_an_application_policy_decides_for_each_autoscaling_deployment(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body(w: World) -> None:
        use_runner(w)
        fixed = deployment("Driver")
        pre = deployment("Preprocessor", autoscaling_config=custom(wish_policy))
        model = deployment("Model", autoscaling_config=AutoscalingConfig(max_replicas=6, **FAST))
        spec = app_spec(fixed, pre, model)
        spec = dataclasses.replace(
            spec, autoscaling_policy=AutoscalingPolicy(policy_function=coordinated_policy)
        )
        with caplog.at_level(logging.WARNING, "serval._private.controller.custom_autoscaling"):
            await w.calls.deploy_app(spec)
            assert await w.wait_app() == ("RUNNING", "")
            WISH["n"] = 2
            await w.advance_until(
                lambda: (
                    [len(w.serving(d)) for d in ("Driver", "Preprocessor", "Model")] == [1, 2, 4]
                ),
                10,
                "both scaled",
            )
        assert SEEN == []  # the deployment's own policy does not decide
        assert any("the application's decides" in r.getMessage() for r in caplog.records)
        contexts = SEEN_APP[-1]
        assert sorted(d.name for d in contexts) == ["Model", "Preprocessor"]  # not Driver
        counts = [
            c[DeploymentID("Model", APP)].policy_state.get("scale_count", 0) for c in SEEN_APP
        ]
        assert counts == list(range(len(SEEN_APP)))
        assert len(SEEN_APP) <= w.clock.monotonic()  # once per tick of one deployment

    run_world(body)


def test_without_a_policy_the_built_in_one_decides_and_no_replica_is_asked() -> None:
    async def body(w: World) -> None:
        use_runner(w)
        config = AutoscalingConfig(
            min_replicas=1, max_replicas=4, target_ongoing_requests=2, **FAST
        )
        await w.deploy(deployment(autoscaling_config=config))
        assert await w.wait_app() == ("RUNNING", "")
        w.backend.replicas[0].script.ongoing = 8
        await w.advance_until(lambda: len(w.backend.live()) == 4, 10, "built-in upscale")
        assert all(
            "autoscale" not in r.calls and "autoscaling_stats" not in r.calls
            for r in w.backend.replicas
        )

    run_world(body)


# -- end to end, on a real cluster, as the guide writes it -----------------------------------------

E2E = {
    "metrics_interval_s": 0.2,
    "look_back_period_s": 0.5,
    "upscale_delay_s": 0.0,
    "downscale_delay_s": 0.0,
}
TIMEOUT_S = 60.0


def running(app: str, deployment: str) -> int:
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return -1
    return status.deployments[deployment].replica_states.get("RUNNING", 0)


def wait_running(app: str, deployment: str, n: int) -> None:
    poll(lambda: running(app, deployment) == n, TIMEOUT_S, f"{n} running replicas of {deployment}")


@pytest.fixture
def code_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory of the user's modules on the driver's path (replicas get it, the
    controller does not)."""
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))


SCHEDULED_POLICY = """
from typing import Any, Dict
from serval.config import AutoscalingContext


def scheduled_batch_processing_policy(ctx: AutoscalingContext) -> tuple[int, Dict[str, Any]]:
    # (the guide's reads the hour; here it is always business hours)
    return 2, {"reason": "Business hours"}
"""


def test_the_guides_policy_by_import_path_from_a_module_next_to_the_app(
    apps: None, cluster_url: str, code_dir: Path
) -> None:
    import httpx

    (code_dir / "autoscaling_policy.py").write_text(SCHEDULED_POLICY)

    @serve.deployment(
        autoscaling_config=AutoscalingConfig(
            min_replicas=1,
            max_replicas=12,
            policy=AutoscalingPolicy(
                policy_function="autoscaling_policy:scheduled_batch_processing_policy"
            ),
            **E2E,
        ),
        max_ongoing_requests=3,
    )
    class BatchProcessingDeployment:
        async def __call__(self, request: Request) -> str:
            return "Hello, world!"

    serve.run(BatchProcessingDeployment.bind(), name="scheduled", route_prefix="/scheduled")
    wait_running("scheduled", "BatchProcessingDeployment", 2)
    assert httpx.get(f"{cluster_url}/scheduled", timeout=TIMEOUT_S).text == "Hello, world!"


def custom_metrics_autoscaling_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """The guide's custom metrics policy, as it is written there."""
    cpu_usage_metric = ctx.aggregated_metrics.get("cpu_usage", {})
    memory_usage_metric = ctx.aggregated_metrics.get("memory_usage", {})
    max_cpu_usage = list(cpu_usage_metric.values())[-1] if cpu_usage_metric else 0
    max_memory_usage = list(memory_usage_metric.values())[-1] if memory_usage_metric else 0

    if max_cpu_usage > 80 or max_memory_usage > 85:
        return min(ctx.capacity_adjusted_max_replicas, ctx.current_num_replicas + 1), {}
    elif max_cpu_usage < 30 and max_memory_usage < 40:
        return max(ctx.capacity_adjusted_min_replicas, ctx.current_num_replicas - 1), {}
    else:
        return ctx.current_num_replicas, {}


@serve.deployment(
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 3,
        "policy": {"policy_function": custom_metrics_autoscaling_policy},
        **E2E,
    }
)
class CustomMetricsDeployment:
    def __init__(self, cpu_file: str) -> None:
        self.cpu_file = Path(cpu_file)

    def __call__(self) -> str:
        return "ok"

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {"cpu_usage": float(self.cpu_file.read_text()), "memory_usage": 20.0}


def test_the_guides_custom_metrics_policy_scales_on_record_autoscaling_stats(
    apps: None, tmp_path: Path
) -> None:
    cpu = tmp_path / "cpu"
    cpu.write_text("50")  # neither up nor down
    serve.run(CustomMetricsDeployment.bind(str(cpu)), name="metrics", route_prefix=None)
    wait_running("metrics", "CustomMetricsDeployment", 1)
    cpu.write_text("90")
    wait_running("metrics", "CustomMetricsDeployment", 3)
    cpu.write_text("10")
    wait_running("metrics", "CustomMetricsDeployment", 1)


def test_the_guides_class_based_policy_with_policy_kwargs(apps: None, tmp_path: Path) -> None:
    target = tmp_path / "target.json"
    target.write_text(json.dumps({"replicas": 1}))

    @serve.deployment(
        autoscaling_config=AutoscalingConfig(
            min_replicas=1,
            max_replicas=3,
            policy=AutoscalingPolicy(
                policy_function=FileBasedAutoscalingPolicy,
                policy_kwargs={"file_path": str(target), "poll_interval_s": 0.1},
            ),
            **E2E,
        )
    )
    class FileScaled:
        def __call__(self) -> str:
            return "ok"

    serve.run(FileScaled.bind(), name="file_scaled", route_prefix=None)
    wait_running("file_scaled", "FileScaled", 1)
    target.write_text(json.dumps({"replicas": 3}))
    wait_running("file_scaled", "FileScaled", 3)
    target.write_text(json.dumps({"replicas": 2}))
    wait_running("file_scaled", "FileScaled", 2)


APP_MODULE = """
import time
import serval as serve


@serve.deployment
class Preprocessor:
    def __call__(self, input_data: str) -> str:
        time.sleep(0.05)
        return f"preprocessed_{input_data}"


@serve.deployment
class Model:
    def __call__(self, preprocessed_data: str) -> str:
        time.sleep(0.1)
        return f"result_{preprocessed_data}"


@serve.deployment
class Driver:
    def __init__(self, preprocessor, model):
        self._preprocessor = preprocessor
        self._model = model

    async def __call__(self, input_data: str) -> str:
        preprocessed = await self._preprocessor.remote(input_data)
        return await self._model.remote(preprocessed)


app = Driver.bind(Preprocessor.bind(), Model.bind())
"""

APP_POLICY = '''
from pathlib import Path
from typing import Dict, Tuple
from serval.config import AutoscalingContext, DeploymentID

TARGET = Path({target!r})


def coordinated_scaling_policy(
    contexts: Dict[DeploymentID, AutoscalingContext]
) -> Tuple[Dict[DeploymentID, int], Dict]:
    """Scale deployments in step: the model follows the preprocessor."""
    decisions = {{}}
    preprocessing_id = [d for d in contexts if d.name == "Preprocessor"][0]
    preprocessing_ctx = contexts[preprocessing_id]
    preprocessing_replicas = max(
        preprocessing_ctx.capacity_adjusted_min_replicas,
        min(preprocessing_ctx.capacity_adjusted_max_replicas, int(TARGET.read_text())),
    )
    decisions[preprocessing_id] = preprocessing_replicas
    model_id = [d for d in contexts if d.name == "Model"][0]
    model_ctx = contexts[model_id]
    decisions[model_id] = max(
        model_ctx.capacity_adjusted_min_replicas,
        min(model_ctx.capacity_adjusted_max_replicas, preprocessing_replicas),
    )
    return decisions, {{}}
'''

APP_CONFIG = """
applications:
  - name: MyApp
    route_prefix: /myapp
    import_path: application_level_autoscaling:app
    autoscaling_policy:
      policy_function: autoscaling_policy_app:coordinated_scaling_policy
    deployments:
      - name: Preprocessor
        autoscaling_config: {{min_replicas: 1, max_replicas: 2, {fast}}}
      - name: Model
        autoscaling_config: {{min_replicas: 1, max_replicas: 2, {fast}}}
"""


def test_an_application_level_policy_from_a_config_file(apps: None, tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("1")
    (tmp_path / "application_level_autoscaling.py").write_text(APP_MODULE)
    (tmp_path / "autoscaling_policy_app.py").write_text(APP_POLICY.format(target=str(target)))
    fast = ", ".join(f"{k}: {v}" for k, v in E2E.items())
    (tmp_path / "serve.yaml").write_text(APP_CONFIG.format(fast=fast))
    address = runtime.address()
    assert address is not None
    deployed = subprocess.run(
        [sys.executable, "-m", "serval", "deploy", "serve.yaml", "--address", address],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert deployed.returncode == 0, deployed.stderr
    poll(lambda: serve.status().applications.get("MyApp") is not None, TIMEOUT_S, "MyApp")
    wait_running("MyApp", "Preprocessor", 1)
    wait_running("MyApp", "Model", 1)
    handle = serve.get_app_handle("MyApp")
    assert handle.remote("x").result(timeout_s=TIMEOUT_S) == "result_preprocessed_x"
    target.write_text("2")
    wait_running("MyApp", "Preprocessor", 2)
    wait_running("MyApp", "Model", 2)
    assert running("MyApp", "Driver") == 1  # no autoscaling_config: not the policy's
    assert serve.status().applications["MyApp"].status == "RUNNING"
