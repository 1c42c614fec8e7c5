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


UNSUPPORTED = [
    ("placement_group_bundles", {"placement_group_bundles": [{"CPU": 1}]}),
    ("placement_group_strategy", {"placement_group_strategy": "PACK"}),
    ("max_replicas_per_node", {"max_replicas_per_node": 1}),
]


@pytest.mark.parametrize("name,options", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_option_rejected_at_decoration(name: str, options: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        serve.deployment(**options)(Plain)
    assert name in str(info.value)
    assert "not supported" in str(info.value)


@pytest.mark.parametrize("name,options", UNSUPPORTED, ids=[u[0] for u in UNSUPPORTED])
def test_unsupported_option_rejected_by_options(name: str, options: dict[str, Any]) -> None:
    dep = serve.deployment(Plain)
    with pytest.raises((ValueError, TypeError)) as info:
        dep.options(**options)
    assert name in str(info.value)


@pytest.mark.parametrize(
    "runtime_env,field",
    [
        ({"pip": ["requests"]}, "pip"),
        ({"conda": {"dependencies": ["numpy"]}}, "conda"),
        ({"working_dir": "."}, "working_dir"),
        ({"env_vars": {"A": "1"}, "py_modules": ["x"]}, "py_modules"),
    ],
)
def test_unsupported_runtime_env_fields_rejected(runtime_env: dict[str, Any], field: str) -> None:
    opts = {"ray_actor_options": {"runtime_env": runtime_env}}
    with pytest.raises(ValueError) as info:
        serve.deployment(**opts)(Plain)
    assert field in str(info.value)
    with pytest.raises(ValueError) as info:
        serve.deployment(Plain).options(**opts)
    assert field in str(info.value)


def test_unsupported_ray_actor_option_rejected() -> None:
    with pytest.raises(ValueError) as info:
        serve.deployment(ray_actor_options={"accelerator_type": "A100"})(Plain)
    assert "accelerator_type" in str(info.value)


def test_unknown_option_rejected_by_name() -> None:
    with pytest.raises(TypeError) as info:
        serve.deployment(num_replica=2)(Plain)  # a typo of num_replicas
    assert "num_replica" in str(info.value)
    with pytest.raises(TypeError) as info:
        serve.deployment(Plain).options(frobnicate=True)
    assert "frobnicate" in str(info.value)


def test_max_concurrent_queries_gives_the_rename_hint() -> None:
    with pytest.raises(TypeError) as info:
        serve.deployment(max_concurrent_queries=3)(Plain)
    text = str(info.value)
    assert "max_concurrent_queries" in text and "max_ongoing_requests" in text
    with pytest.raises(TypeError) as info:
        serve.deployment(Plain).options(max_concurrent_queries=3)
    assert "max_ongoing_requests" in str(info.value)


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
