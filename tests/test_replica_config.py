"""user_config and reconfigure(): called right after the constructor, and again, in place (same
replica process), when the application is redeployed with a new user_config; a deployment with a
user_config and no reconfigure() fails to deploy with a clear error."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

import serval as serve
from conftest import poll
from serval.exceptions import DeploymentFailedError

DEADLINE_S = 10.0


@serve.deployment(user_config={"threshold": 1})
class SyncConfigured:
    def __init__(self) -> None:
        self.events: list[Any] = ["init"]
        self.config: Any = None

    def reconfigure(self, config: Any) -> None:
        self.events.append(("reconfigure", config))
        self.config = config

    def __call__(self) -> dict[str, Any]:
        return {
            "events": list(self.events),
            "config": self.config,
            "pid": os.getpid(),
            "replica_id": serve.get_replica_context().replica_id,
        }


@serve.deployment(user_config={"threshold": 1})
class AsyncConfigured:
    async def __init__(self) -> None:
        self.events: list[Any] = ["init"]
        self.config: Any = None

    async def reconfigure(self, config: Any) -> None:
        await asyncio.sleep(0.05)
        self.events.append(("reconfigure", config))
        self.config = config

    async def __call__(self) -> dict[str, Any]:
        return {
            "events": list(self.events),
            "config": self.config,
            "pid": os.getpid(),
            "replica_id": serve.get_replica_context().replica_id,
        }


DEPLOYMENTS = [SyncConfigured, AsyncConfigured]


def _get(handle: Any) -> dict[str, Any]:
    return handle.remote().result(timeout_s=DEADLINE_S)


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=["sync", "async"])
def test_reconfigure_is_called_after_the_constructor(serve_instance: Any, dep: Any) -> None:
    handle = serve.run(dep.bind())
    out = _get(handle)
    assert out["events"] == ["init", ("reconfigure", {"threshold": 1})]
    assert out["config"] == {"threshold": 1}


@pytest.mark.parametrize("dep", DEPLOYMENTS, ids=["sync", "async"])
def test_new_user_config_is_applied_in_place(serve_instance: Any, dep: Any) -> None:
    handle = serve.run(dep.bind())
    before = _get(handle)

    handle = serve.run(dep.options(user_config={"threshold": 2}).bind())
    # serve.run returns once the new config is applied: visible at once.
    after = _get(handle)
    assert after["config"] == {"threshold": 2}
    assert after["pid"] == before["pid"], "reconfigure must not restart the replica process"
    assert after["replica_id"] == before["replica_id"]
    assert after["events"] == [
        "init",
        ("reconfigure", {"threshold": 1}),
        ("reconfigure", {"threshold": 2}),
    ]
    status = serve.status().applications["default"]
    assert status.status == "RUNNING"
    assert status.deployments[dep.name].status == "HEALTHY"


def test_same_user_config_redeploy_does_not_reconfigure(serve_instance: Any) -> None:
    handle = serve.run(SyncConfigured.bind())
    before = _get(handle)
    handle = serve.run(SyncConfigured.options(user_config={"threshold": 1}).bind())
    after = _get(handle)
    assert after["replica_id"] == before["replica_id"]
    assert after["events"] == ["init", ("reconfigure", {"threshold": 1})]


def test_every_replica_is_reconfigured_in_place(serve_instance: Any) -> None:
    handle = serve.run(SyncConfigured.options(num_replicas=2).bind())
    seen: dict[str, dict[str, Any]] = {}
    poll(
        lambda: seen.update({(o := _get(handle))["replica_id"]: o}) or len(seen) == 2,
        timeout=DEADLINE_S,
        what="both replicas to answer",
    )
    handle = serve.run(SyncConfigured.options(num_replicas=2, user_config={"v": 3}).bind())
    after: dict[str, dict[str, Any]] = {}
    poll(
        lambda: after.update({(o := _get(handle))["replica_id"]: o}) or len(after) == 2,
        timeout=DEADLINE_S,
        what="both replicas to answer after the redeploy",
    )
    assert set(after) == set(seen), "the same replicas must serve after a config change"
    for rid, out in after.items():
        assert out["config"] == {"v": 3}
        assert out["pid"] == seen[rid]["pid"]


def test_user_config_set_only_on_redeploy(serve_instance: Any) -> None:
    """A deployment first run without user_config gets reconfigure() once one is given."""
    plain = SyncConfigured.options(user_config=None)
    handle = serve.run(plain.bind())
    before = _get(handle)
    assert before["events"] == ["init"]
    handle = serve.run(plain.options(user_config={"late": True}).bind())
    after = _get(handle)
    assert after["config"] == {"late": True}
    assert after["replica_id"] == before["replica_id"]


@serve.deployment(user_config={"a": 1})
class NoReconfigure:
    def __call__(self) -> str:
        return "unreachable"


def test_user_config_without_reconfigure_fails_to_deploy(serve_instance: Any) -> None:
    start = time.monotonic()
    with pytest.raises(DeploymentFailedError) as info:
        serve.run(NoReconfigure.bind())
    assert time.monotonic() - start < DEADLINE_S
    text = str(info.value)
    assert "reconfigure" in text
    assert "user_config" in text
    assert serve.status().applications["default"].status == "DEPLOY_FAILED"


@serve.deployment(user_config={"ok": False})
class BadReconfigure:
    def reconfigure(self, config: dict[str, Any]) -> None:
        if not config["ok"]:
            raise ValueError("config rejected by reconfigure")
        self.config = config

    def __call__(self) -> Any:
        return self.config


def test_reconfigure_that_raises_fails_the_deploy(serve_instance: Any) -> None:
    start = time.monotonic()
    with pytest.raises(DeploymentFailedError, match="config rejected by reconfigure"):
        serve.run(BadReconfigure.bind())
    assert time.monotonic() - start < DEADLINE_S


def test_reconfigure_that_raises_on_redeploy_is_reported(serve_instance: Any) -> None:
    handle = serve.run(BadReconfigure.options(user_config={"ok": True}).bind())
    assert _get(handle) == {"ok": True}
    start = time.monotonic()
    with pytest.raises(DeploymentFailedError, match="config rejected by reconfigure"):
        serve.run(BadReconfigure.options(user_config={"ok": False}).bind())
    assert time.monotonic() - start < DEADLINE_S


class ConfigRejected(Exception):
    """A user's own exception class: importable by replicas (this module is on the driver's
    path), not by the controller, which has none of the user's code on its path."""


@serve.deployment(user_config={"ok": False})
class RejectsWithOwnError:
    def reconfigure(self, config: dict[str, Any]) -> None:
        if not config["ok"]:
            raise ConfigRejected("rejected with a class of the user's")
        self.config = config

    def __call__(self) -> Any:
        return self.config


def test_reconfigure_raising_a_users_exception_class_is_reported(serve_instance: Any) -> None:
    # The replica's reply carried the exception itself; the controller could not unpickle it
    # and the deploy waited for ever.
    handle = serve.run(RejectsWithOwnError.options(user_config={"ok": True}).bind())
    assert _get(handle) == {"ok": True}
    start = time.monotonic()
    with pytest.raises(DeploymentFailedError, match="ConfigRejected: rejected with a class"):
        serve.run(RejectsWithOwnError.options(user_config={"ok": False}).bind())
    assert time.monotonic() - start < DEADLINE_S
