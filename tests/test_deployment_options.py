"""Deployment options from Ray Serve's list are honoured or rejected with a clear error naming
the option, at decoration / ``.options()`` time — never silently ignored."""

from __future__ import annotations

import os
from typing import Any

import pytest

import serval as serve

DEADLINE_S = 10.0


@serve.deployment(ray_actor_options={"runtime_env": {"env_vars": {"X": "1", "SERVAL_T_N": 7}}})
class EnvReader:
    def __init__(self) -> None:
        self.at_init = os.environ.get("X")

    def __call__(self, name: str) -> str | None:
        return os.environ.get(name)

    def init_value(self) -> str | None:
        return self.at_init


def test_runtime_env_vars_are_set_in_the_replica(serve_instance: Any) -> None:
    assert "X" not in os.environ or os.environ["X"] != "1"
    handle = serve.run(EnvReader.bind())
    assert handle.remote("X").result(timeout_s=DEADLINE_S) == "1"
    assert handle.remote("SERVAL_T_N").result(timeout_s=DEADLINE_S) == "7"  # str(), as Ray does
    assert handle.init_value.remote().result(timeout_s=DEADLINE_S) == "1"  # before __init__


def test_runtime_env_vars_via_options_and_redeploy(serve_instance: Any) -> None:
    handle = serve.run(
        EnvReader.options(ray_actor_options={"runtime_env": {"env_vars": {"X": "2"}}}).bind()
    )
    assert handle.remote("X").result(timeout_s=DEADLINE_S) == "2"
    # Changing env vars needs new replicas: the redeploy must start them.
    handle = serve.run(
        EnvReader.options(ray_actor_options={"runtime_env": {"env_vars": {"X": "3"}}}).bind()
    )
    assert handle.remote("X").result(timeout_s=DEADLINE_S) == "3"


@serve.deployment(ray_actor_options={"num_cpus": 0.5, "num_gpus": 0, "memory": 10**8})
def scheduled() -> str:
    return "ok"


def test_scheduling_hints_are_accepted(serve_instance: Any) -> None:
    handle = serve.run(scheduled.bind())
    assert handle.remote().result(timeout_s=DEADLINE_S) == "ok"


class Plain:
    def __call__(self) -> str:
        return "plain"


RAY_ONLY = [
    ("placement_group_bundles", {"placement_group_bundles": [{"CPU": 1}]}),
    ("max_replicas_per_node", {"max_replicas_per_node": 1}),
    ("runtime_env pip", {"ray_actor_options": {"runtime_env": {"pip": ["requests"]}}}),
    ("runtime_env working_dir", {"ray_actor_options": {"runtime_env": {"working_dir": "."}}}),
    ("runtime_env conda", {"ray_actor_options": {"runtime_env": {"conda": {"x": 1}}}}),
]


@pytest.mark.parametrize("what,options", RAY_ONLY, ids=[u[0] for u in RAY_ONLY])
def test_ray_only_options_are_refused_at_deploy_on_the_local_backend(
    serve_instance: Any, what: str, options: dict[str, Any]
) -> None:
    # Accepted where Ray Serve accepts them (the decorator, .options()): whether they can be
    # honoured depends on the backend, which says so when the app is deployed.
    serve.deployment(**options)(Plain)
    dep = serve.deployment(Plain).options(**options)
    with pytest.raises(ValueError, match="needs the Ray backend") as info:
        serve.run(dep.bind(), name="rayonly", route_prefix="/rayonly")
    assert what.split()[-1] in str(info.value)
    assert "rayonly" not in serve.status().applications
    ok = serve.run(serve.deployment(Plain).bind(), name="fine", route_prefix="/fine")
    assert ok.remote().result(timeout_s=DEADLINE_S) == "plain"


@pytest.mark.parametrize(
    "options,message",
    [
        ({"placement_group_bundles": []}, "placement_group_bundles"),
        ({"placement_group_bundles": [{"CPU": "one"}]}, "placement_group_bundles"),
        ({"placement_group_strategy": "SOMEWHERE"}, "placement_group_strategy"),
        ({"max_replicas_per_node": 0}, "max_replicas_per_node"),
        ({"ray_actor_options": {"runtime_env": {"nonsense": 1}}}, "nonsense"),
        ({"ray_actor_options": {"num_cpu": 1}}, "num_cpu"),
    ],
)
def test_bad_placement_options_are_rejected_at_decoration(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        serve.deployment(**options)(Plain)
    with pytest.raises(ValueError, match=message):
        serve.deployment(Plain).options(**options)


def test_unknown_option_rejected_by_name() -> None:
    with pytest.raises(TypeError) as info:
        serve.deployment(num_replica=2)(Plain)  # a typo of num_replicas
    assert "num_replica" in str(info.value)
    with pytest.raises(TypeError) as info:
        serve.deployment(Plain).options(frobnicate=True)
    assert "frobnicate" in str(info.value)


def test_deprecated_names_are_taken_with_a_warning() -> None:
    # As Ray Serve still takes them: max_concurrent_queries, and the autoscaling names.
    with pytest.warns(DeprecationWarning, match="max_concurrent_queries is deprecated"):
        dep = serve.deployment(max_concurrent_queries=3)(Plain)
    assert dep.max_ongoing_requests == 3
    with pytest.warns(DeprecationWarning, match="use max_ongoing_requests"):
        assert serve.deployment(Plain).options(max_concurrent_queries=7).max_ongoing_requests == 7
    old_names = {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_num_ongoing_requests_per_replica": 3,
        "smoothing_factor": 2.0,
    }
    with pytest.warns(DeprecationWarning) as warned:
        config = serve.deployment(autoscaling_config=old_names)(Plain).config
    said = " ".join(str(w.message) for w in warned)
    assert "target_num_ongoing_requests_per_replica" in said and "smoothing_factor" in said
    auto = config.autoscaling_config
    assert auto is not None
    assert (auto.target_ongoing_requests, auto.upscaling_factor, auto.downscaling_factor) == (
        3,
        2.0,
        2.0,
    )
    with pytest.warns(DeprecationWarning, match="upscale_smoothing_factor"):
        direct = serve.AutoscalingConfig(max_replicas=2, upscale_smoothing_factor=1.5)
    assert direct.upscaling_factor == 1.5 and direct.downscaling_factor is None


@pytest.mark.parametrize(
    "options",
    [
        {"num_replicas": -1},
        {"max_ongoing_requests": 0},
        {"health_check_period_s": 0},
        {"graceful_shutdown_timeout_s": -1},
        {"ray_actor_options": "num_cpus=1"},
    ],
    ids=lambda o: next(iter(o)),
)
def test_invalid_values_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        serve.deployment(**options)(Plain)
    assert next(iter(options)) in str(info.value)


def test_supported_options_are_accepted_and_kept() -> None:
    dep = serve.deployment(
        num_replicas=2,
        max_ongoing_requests=7,
        max_queued_requests=3,
        user_config={"k": 1},
        health_check_period_s=1.5,
        health_check_timeout_s=2.5,
        graceful_shutdown_timeout_s=3.5,
        graceful_shutdown_wait_loop_s=0.5,
        ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": {"A": "b"}}},
    )(Plain)
    c = dep.config
    assert (c.num_replicas, c.max_ongoing_requests, c.max_queued_requests) == (2, 7, 3)
    assert c.user_config == {"k": 1}
    assert (c.health_check_period_s, c.health_check_timeout_s) == (1.5, 2.5)
    assert c.graceful_shutdown_timeout_s == 3.5
    assert c.ray_actor_options["runtime_env"] == {"env_vars": {"A": "b"}}
    again = dep.options(num_replicas=1)
    assert again.config.max_ongoing_requests == 7 and again.config.num_replicas == 1


def test_user_config_must_be_json_serializable() -> None:
    # As in Ray Serve; the controller, which keeps it, has none of the user's code to read
    # an object of the user's class with (a deploy used to wait for ever on one).
    class Settings:
        pass

    with pytest.raises(ValueError, match="user_config must be JSON-serializable"):

        @serve.deployment(user_config=Settings())
        class Configured:
            def reconfigure(self, config: Any) -> None:
                pass

    @serve.deployment
    class Later:
        def reconfigure(self, config: Any) -> None:
            pass

    with pytest.raises(ValueError, match="user_config must be JSON-serializable"):
        Later.options(user_config={"threshold": {1, 2}})
    assert Later.options(user_config={"threshold": [1, 2], "on": True}).user_config == {
        "threshold": [1, 2],
        "on": True,
    }
