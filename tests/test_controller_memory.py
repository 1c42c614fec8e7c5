"""The real controller, in-process, on virtual time: replicas are hosts of the in-memory backend
(``backends/memory.py``) that register, report ready and answer the controller's calls as
replica processes do, scripted by the test; every timer of the controller's (health checks,
autoscaling ticks, graceful-stop timeouts, the proxy's back-off) runs on a ``FakeClock`` that
moves only when the test advances it. What a user would check is checked through the control
calls a user's code makes (``ControllerCalls``: deploy, wait, status, delete, the tables pushed
to a subscribed caller), and the hosts' lives (started, drained, killed). Deterministic: no
real sleep anywhere."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from serval._private.backends import base
from serval._private.backends.memory import MemoryBackend, MemoryReplica, ProxyScript, Script
from serval._private.controller import checkpoint
from serval._private.controller import controller as controller_module
from serval._private.controller.clock import FakeClock, RealClock
from serval._private.controller.controller import Controller
from serval._private.wire.control import ControllerCalls, ReplicaCalls
from serval._private.wire.types import AppSpec, DeploymentInfo, DeploymentSpec
from serval.config import AutoscalingConfig, DeploymentConfig, HTTPOptions
from serval.exceptions import ServalError

APP = "app"
KILL_AFTER_S = controller_module._KILL_AFTER_S  # a drain's extra time before the kill


def deployment(name: str = "D", version: str = "v1", **config: Any) -> DeploymentSpec:
    """A deployment whose code is opaque bytes naming its version (hosts see it in ``init``)."""
    return DeploymentSpec(name, version.encode(), DeploymentConfig(**config), version, False)


def app_spec(
    *deployments: DeploymentSpec, name: str = APP, route_prefix: str | None = None
) -> AppSpec:
    return AppSpec(name, route_prefix, deployments[0].name, tuple(deployments), (), "/")


class World:
    """A controller on a FakeClock, its in-memory backend, and a subscribed caller."""

    def __init__(
        self,
        address: str | None = None,
        http: HTTPOptions | None = None,
        places: list[str] | None = None,
        proxy_scripts: list[ProxyScript] | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.backend = MemoryBackend(self.clock)
        self.backend.proxy_scripts.extend(proxy_scripts or [])
        if places is not None:  # proxies at several places, which may change
            self.backend.proxy_places = places
            self.backend.proxy_nodes_change = True
        self.address = address
        self.http = http
        self.tables: list[tuple[float, dict[tuple[str, str], DeploymentInfo]]] = []
        self.controller = self._new_controller(recover=False)

    def _new_controller(self, recover: bool) -> Controller:
        controller = Controller(self.backend, self.http, self.address, self.clock)
        self.backend.attach(controller)
        controller.start(recover=recover)
        self.client = self.backend.client(self._on_push)
        self.calls = ControllerCalls(self.client.call)
        return controller

    async def restart_controller(self, while_down: Callable[[], None] = lambda: None) -> None:
        """The controller dies (its tasks end, its connections break; ``while_down`` runs
        then) and a new one starts from the checkpoint."""
        await self.clock.settle()  # (its last checkpoint written)
        await self.controller.close()
        self.backend.detach()
        while_down()
        self.controller = self._new_controller(recover=True)
        await self.subscribe()

    def _on_push(self, topic: str, value: Any) -> None:
        if topic == "table":
            self.tables.append((self.clock.monotonic(), value[1]))

    async def subscribe(self) -> None:
        _, table, _ = await self.calls.subscribe()
        self.tables.append((self.clock.monotonic(), table))

    def serving(self, deployment: str = "D", app: str = APP) -> list[str]:
        """The replica ids callers route to now (the last table pushed)."""
        info = self.tables[-1][1].get((app, deployment))
        return [] if info is None else [r.replica_id for r in info.replicas]

    async def deploy(self, *deployments: DeploymentSpec, app: str = APP) -> None:
        await self.calls.deploy_app(app_spec(*deployments, name=app))

    async def wait_app(self, app: str = APP, within_s: float = 60.0) -> tuple[str, str]:
        """``wait_app`` as ``serve.run`` calls it, virtual time advancing meanwhile."""
        waiting = asyncio.ensure_future(self.calls.wait_app(app))
        await self.advance_until(waiting.done, within_s, f"{app} to settle")
        return waiting.result()

    async def status(
        self, deployment: str = "D", app: str = APP
    ) -> tuple[str, str, dict[str, int]]:
        """(app status, deployment status, replica states) as ``serve.status()`` has them."""
        found = (await self.calls.status()).applications[app]
        dep = found.deployments[deployment]
        return found.status, dep.status, dep.replica_states

    async def advance_until(
        self, predicate: Callable[[], object], within_s: float, what: str, step: float = 0.25
    ) -> float:
        """Advance virtual time by ``step`` until ``predicate()``; the virtual time it took."""
        start = self.clock.monotonic()
        await self.clock.settle()
        while not predicate():
            if self.clock.monotonic() - start >= within_s:
                raise AssertionError(f"{what}: not within {within_s} virtual seconds")
            await self.clock.advance(step)
        return self.clock.monotonic() - start

    async def proxy_up(self) -> None:
        """The newest proxy has reported ready (``wait_proxy`` returns once it routes with
        the table, which it does just before)."""
        await self.calls.wait_proxy()
        await self.clock.settle()
        assert self.backend.proxies[-1].phase == "running"

    async def close(self) -> None:
        await self.controller.close()
        await self.backend.close()


def run(
    body: Callable[[World], Awaitable[None]],
    address: str | None = None,
    http: HTTPOptions | None = None,
    places: list[str] | None = None,
    proxy_scripts: list[ProxyScript] | None = None,
) -> None:
    async def main() -> None:
        world = World(address, http, places, proxy_scripts)
        try:
            await world.subscribe()
            # (a real-time bound: virtual time never waits, so a hang is a defect)
            await asyncio.wait_for(body(world), 20)
        finally:
            await world.close()

    asyncio.run(main())


# -- the fakes answer what replicas answer --------------------------------------------------------


def test_memory_hosts_answer_every_replica_call_with_its_parameters() -> None:
    stubs = {
        name: fn
        for name, fn in inspect.getmembers(ReplicaCalls, inspect.isfunction)
        if not name.startswith("_")
    }
    for name, stub in stubs.items():
        handler = getattr(MemoryReplica, f"rpc_{name}")
        wanted = [p for p in inspect.signature(stub).parameters if p != "self"]
        got = [p for p in inspect.signature(handler).parameters if p not in ("self", "peer")]
        assert got == wanted, name


def test_the_memory_backend_is_chosen_by_name() -> None:
    assert base.load("memory") is MemoryBackend


# -- starting -------------------------------------------------------------------------------------


def test_n_replicas_start_and_serve_once_their_constructors_finish() -> None:
    async def body(w: World) -> None:
        w.backend.script = Script(init_s=5.0)
        await w.deploy(deployment(num_replicas=3))
        await w.clock.advance(4.75)
        assert await w.status() == ("DEPLOYING", "UPDATING", {"STARTING": 3})
        assert w.serving() == []
        await w.clock.advance(0.25)
        assert await w.wait_app(within_s=0) == ("RUNNING", "")
        assert await w.status() == ("RUNNING", "HEALTHY", {"RUNNING": 3})
        assert sorted(w.serving()) == sorted(h.replica_id for h in w.backend.replicas)
        assert len(w.backend.replicas) == 3
        for host in w.backend.replicas:
            assert host.init is not None and host.init.payload == b"v1"
            assert host.label.startswith(f"{APP}.D#")

    run(body)


def test_a_replica_that_dies_is_replaced() -> None:
    async def body(w: World) -> None:
        await w.deploy(deployment(num_replicas=3))
        assert await w.wait_app() == ("RUNNING", "")
        dead = w.backend.replicas[1]
        dead.crash(1)
        await w.clock.settle()
        assert dead.replica_id not in w.serving()
        assert await w.wait_app() == ("RUNNING", "")
        assert len(w.backend.replicas) == 4  # one new host, for the dead one only
        assert sorted(w.serving()) == sorted(h.replica_id for h in w.backend.live())
        assert await w.status() == ("RUNNING", "HEALTHY", {"RUNNING": 3})

    run(body)


def test_replicas_dying_while_starting_three_times_fail_the_deploy() -> None:
    async def body(w: World) -> None:
        w.backend.script = Script(init_s=1.0, exits_while_starting=3)
        await w.deploy(deployment(num_replicas=1))
        status, message = await w.wait_app()
        assert status == "DEPLOY_FAILED"
        assert "3 times in a row" in message and "exit code 3" in message
        assert len(w.backend.replicas) == 3  # no fourth attempt
        await w.clock.advance(60)
        assert len(w.backend.replicas) == 3
        assert (await w.status())[1] == "UNHEALTHY"

    run(body)


def test_a_constructor_error_fails_the_deploy_with_its_message() -> None:
    async def body(w: World) -> None:
        w.backend.script = Script(init_error="Traceback ...\nValueError: no model file")
        await w.deploy(deployment(num_replicas=2))
        status, message = await w.wait_app()
        assert status == "DEPLOY_FAILED"
        assert "ValueError: no model file" in message
        await w.clock.settle()
        assert w.backend.live() == []  # the failed ones are killed, none is started again

    run(body)


def test_a_replica_that_never_registers_is_not_served_and_is_killed_on_delete() -> None:
    async def body(w: World) -> None:
        w.backend.script = Script(registers=False)
        await w.deploy(deployment(num_replicas=1))
        await w.clock.advance(3600)
        assert await w.status() == ("DEPLOYING", "UPDATING", {"STARTING": 1})
        assert w.serving() == []
        deleting = asyncio.ensure_future(w.calls.delete_app(APP))
        await w.clock.settle()  # nothing runs there to drain: killed at once
        assert deleting.done()
        (host,) = w.backend.replicas
        assert host.exit is not None and host.exit.reason == "killed by SIGKILL"
        assert "drain" not in host.calls

    run(body)


# -- updates --------------------------------------------------------------------------------------


def test_a_rolling_update_starts_the_new_version_before_draining_the_old() -> None:
    async def body(w: World) -> None:
        await w.deploy(deployment(num_replicas=3, graceful_shutdown_timeout_s=2.0))
        assert await w.wait_app() == ("RUNNING", "")
        old = list(w.backend.replicas)
        w.backend.script = Script(init_s=4.0, drain_s=1.0)
        since = len(w.tables)
        started = w.clock.monotonic()
        await w.deploy(deployment(version="v2", num_replicas=3, graceful_shutdown_timeout_s=2.0))
        await w.clock.advance(3.75)
        assert all("drain" not in h.calls for h in old)  # the new ones are still starting
        assert sorted(w.serving()) == sorted(h.replica_id for h in old)
        assert await w.wait_app() == ("RUNNING", "")
        new = [h for h in w.backend.replicas if h not in old]
        assert len(new) == 3
        assert all(h.init is not None and h.init.payload == b"v2" for h in new)
        assert all(h.calls.count("drain") == 1 for h in old)
        await w.advance_until(lambda: all(h.ended for h in old), 10, "the old to exit")
        assert all(h.exit is not None and h.exit.code == 0 for h in old)  # drained, not killed
        assert sorted(w.serving()) == sorted(h.replica_id for h in new)
        # What callers saw meanwhile: never fewer than 3 replicas to route to.
        seen = [len(table[(APP, "D")].replicas) for _, table in w.tables[since:]]
        assert seen and min(seen) >= 3, seen
        switch = next(t for t, table in w.tables[since:] if len(table[(APP, "D")].replicas) > 3)
        assert switch - started == 4.0  # the new version served once its constructors finished

    run(body)


def test_num_replicas_changes_in_place() -> None:
    async def body(w: World) -> None:
        await w.deploy(deployment(num_replicas=2))
        assert await w.wait_app() == ("RUNNING", "")
        first = list(w.backend.replicas)
        await w.deploy(deployment(num_replicas=4))
        assert await w.wait_app() == ("RUNNING", "")
        assert len(w.backend.replicas) == 4 and w.backend.replicas[:2] == first
        assert all("drain" not in h.calls for h in first)  # the same version: kept
        await w.deploy(deployment(num_replicas=1))
        assert await w.wait_app() == ("RUNNING", "")
        await w.advance_until(lambda: len(w.backend.live()) == 1, 60, "three to exit")
        assert await w.status() == ("RUNNING", "HEALTHY", {"RUNNING": 1})
        assert [h.calls.count("drain") for h in w.backend.replicas].count(1) == 3
        assert w.serving() == [w.backend.live()[0].replica_id]

    run(body)


def test_user_config_changes_in_place_and_a_failing_reconfigure_fails_the_deploy() -> None:
    async def body(w: World) -> None:
        await w.deploy(deployment(num_replicas=2, user_config={"threshold": 1}))
        assert await w.wait_app() == ("RUNNING", "")
        hosts = list(w.backend.replicas)
        assert [h.user_config for h in hosts] == [{"threshold": 1}] * 2
        await w.deploy(deployment(num_replicas=2, user_config={"threshold": 2}))
        assert await w.wait_app() == ("RUNNING", "")
        assert w.backend.replicas == hosts  # no replica was replaced
        assert [h.user_config for h in hosts] == [{"threshold": 2}] * 2
        assert all(h.calls.count("reconfigure") == 1 and "drain" not in h.calls for h in hosts)
        hosts[0].script.reconfigure_error = "threshold must be < 3"
        await w.deploy(deployment(num_replicas=2, user_config={"threshold": 3}))
        status, message = await w.wait_app()
        assert status == "DEPLOY_FAILED"
        assert "reconfigure() raised ValueError: threshold must be < 3" in message

    run(body)


# -- health ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("health", "after_s"), [("fail", 2.0), ("hang", 3.0)])
def test_a_replica_failing_its_health_check_is_replaced(health: str, after_s: float) -> None:
    """Checked every health_check_period_s (2 s); one that does not answer in
    health_check_timeout_s (1 s) has failed too."""

    async def body(w: World) -> None:
        config = {"num_replicas": 2, "health_check_period_s": 2.0, "health_check_timeout_s": 1.0}
        await w.deploy(deployment(**config))
        assert await w.wait_app() == ("RUNNING", "")
        sick, well = w.backend.replicas
        sick.script.health = health  # type: ignore[assignment]
        await w.clock.advance(after_s - 0.25)
        assert not sick.ended and sick.replica_id in w.serving()
        await w.clock.advance(0.25)
        assert sick.exit is not None and sick.exit.reason == "killed by SIGKILL"
        assert sick.replica_id not in w.serving()
        assert await w.wait_app() == ("RUNNING", "")
        assert not well.ended and len(w.backend.live()) == 2
        assert well.calls.count("check_health") == 1

    run(body)


# -- stopping -------------------------------------------------------------------------------------


def test_a_graceful_stop_drains_and_kills_a_replica_that_does_not_exit_in_time() -> None:
    async def body(w: World) -> None:
        await w.deploy(deployment(num_replicas=2, graceful_shutdown_timeout_s=3.0))
        assert await w.wait_app() == ("RUNNING", "")
        stubborn, willing = w.backend.replicas
        stubborn.script.ignores_drain = True
        willing.script.drain_s = 1.0
        deleting = asyncio.ensure_future(w.calls.delete_app(APP))
        await w.clock.settle()
        assert stubborn.calls[-1] == "drain" and willing.calls[-1] == "drain"
        assert w.serving() == []  # callers stopped sending before the drain
        await w.clock.advance(1.0)
        assert willing.exit is not None and willing.exit.code == 0
        await w.clock.advance(3.0 + KILL_AFTER_S - 1.0 - 0.25)
        assert not stubborn.ended and not deleting.done()
        await w.clock.advance(0.25)
        assert stubborn.exit is not None and stubborn.exit.reason == "killed by SIGKILL"
        await w.clock.settle()
        assert deleting.done()
        assert (await w.calls.status()).applications == {}

    run(body)


# -- autoscaling ----------------------------------------------------------------------------------

AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 2.0,
    "upscale_delay_s": 3.0,
    "downscale_delay_s": 10.0,
    "metrics_interval_s": 1.0,
    "look_back_period_s": 2.0,
}


def test_autoscaling_up_and_down_after_its_delays() -> None:
    async def body(w: World) -> None:
        config = AutoscalingConfig(**AUTOSCALING)
        await w.deploy(deployment(autoscaling_config=config))
        assert await w.wait_app() == ("RUNNING", "")
        (first,) = w.backend.replicas
        first.script.ongoing = 8  # wants ceil(8 / 2) = 4 replicas
        await w.clock.advance(3.0)  # first sample at 1 s: up wanted since, for < 3 s
        assert len(w.backend.replicas) == 1
        await w.clock.advance(1.0)
        assert len(w.backend.replicas) == 4
        assert await w.wait_app() == ("RUNNING", "")
        assert len(w.serving()) == 4
        first.script.ongoing = 0
        dropped = w.clock.monotonic()
        # The look-back still holds the load for a tick; then down is wanted for 10 s.
        took = await w.advance_until(lambda: len(w.backend.live()) < 4, 30, "scaling down")
        assert 10.0 <= took <= 10.0 + 2 * config.metrics_interval_s, took
        await w.advance_until(lambda: len(w.backend.live()) == 1, 30, "down to one")
        assert await w.status() == ("RUNNING", "HEALTHY", {"RUNNING": 1})
        assert w.clock.monotonic() - dropped < 10.0 + 2 * config.metrics_interval_s + 1.0

    run(body)


def test_autoscaling_from_zero_when_a_caller_reports_queued_requests() -> None:
    async def body(w: World) -> None:
        config = AutoscalingConfig(**{**AUTOSCALING, "min_replicas": 0, "initial_replicas": 0})
        await w.deploy(deployment(autoscaling_config=config))
        assert await w.wait_app() == ("RUNNING", "")
        assert w.backend.replicas == []
        await w.clock.advance(30)
        assert w.backend.replicas == []  # no load, no replica
        await w.calls.record_queued({(APP, "D"): 3})
        await w.clock.settle()
        # At once, without waiting for a tick or the upscale delay.
        assert len(w.backend.replicas) >= 1
        assert await w.wait_app(within_s=0) == ("RUNNING", "")
        assert len(w.serving()) == len(w.backend.replicas)
        await w.calls.record_queued({(APP, "D"): 0})
        # Idle: one replica after the downscale delay, none once idle that long.
        await w.advance_until(lambda: w.backend.live() == [], 40, "scaling to zero")
        assert w.serving() == []
        assert await w.status() == ("RUNNING", "HEALTHY", {})

    run(body)


# -- restarts of the controller -------------------------------------------------------------------


def test_a_restarted_controller_adopts_the_live_hosts_and_replaces_the_dead(
    tmp_path: Path,
) -> None:
    async def body(w: World) -> None:
        await w.deploy(deployment(num_replicas=3, health_check_period_s=1.0))
        assert await w.wait_app() == ("RUNNING", "")
        alive = list(w.backend.replicas)
        await w.clock.settle()
        saved = checkpoint.load(w.backend, str(tmp_path))
        assert saved is not None
        refs = [r.host for r in saved.apps[0].deployments[0].replicas]
        assert sorted(json.dumps(r) for r in refs) == sorted(json.dumps(h.ref) for h in alive)

        dead = alive.pop(0)
        await w.restart_controller(while_down=dead.crash)  # it dies while there is none
        assert sorted(w.serving()) == sorted(h.replica_id for h in alive)  # serving through it
        assert await w.wait_app() == ("RUNNING", "")
        assert len(w.backend.replicas) == 4  # one new host, for the dead one
        new = w.backend.replicas[-1]
        assert sorted(w.serving()) == sorted(h.replica_id for h in [*alive, new])
        # The adopted ones reattached: their health checks reach them again.
        before = [h.calls.count("check_health") for h in alive]
        await w.clock.advance(2.0)
        after = [h.calls.count("check_health") for h in alive]
        assert all(b < a for b, a in zip(before, after, strict=True)), (before, after)
        assert all(not h.ended for h in alive)

    run(body, address=str(tmp_path))


# -- the HTTP proxy -------------------------------------------------------------------------------


def test_the_proxy_is_restarted_with_back_off_and_given_up_after_three_failed_starts() -> None:
    async def body(w: World) -> None:
        (first,) = w.backend.proxies
        await w.proxy_up()
        started = w.clock.monotonic()
        w.backend.proxy_script = ProxyScript(exits_while_starting=1)
        first.crash(1)  # it had served: restarted after 0.5 s, then 1 s, then 2 s
        starts = []
        for _ in range(40):
            await w.clock.advance(0.25)
            if len(w.backend.proxies) > len(starts) + 1:
                starts.append(w.clock.monotonic() - started)
        assert starts == [0.5, 1.5, 3.5]  # and no fourth: it is given up
        # serve.run of an app with a route says why, instead of waiting for ever
        await w.calls.deploy_app(app_spec(deployment(), route_prefix="/"))
        waiting = asyncio.ensure_future(w.calls.wait_app(APP))
        await w.advance_until(waiting.done, 10, "the deploy to fail")
        with pytest.raises(ServalError, match="exited 3 times in a row before it was ready"):
            waiting.result()

    run(body, http=HTTPOptions())


def test_waiting_for_the_proxy_waits_for_its_replacement_and_fails_once_given_up() -> None:
    # serve.start() waits on wait_proxy: after the proxy exited, it returned at once, though
    # no proxy listened (the acknowledged table version of the one that died still counted).
    async def body(w: World) -> None:
        await w.proxy_up()
        w.backend.proxies[-1].crash(1)
        waiting = asyncio.ensure_future(w.calls.wait_proxy())
        await w.clock.advance(0.25)
        assert not waiting.done()  # restarting (after 0.5 s): no proxy listens yet
        await w.advance_until(waiting.done, 5, "wait_proxy to return")
        waiting.result()
        assert len(w.backend.proxies) == 2 and w.backend.proxies[-1].phase == "running"
        w.backend.proxy_script = ProxyScript(exits_while_starting=1)
        w.backend.proxies[-1].crash(1)
        waiting = asyncio.ensure_future(w.calls.wait_proxy())
        await w.advance_until(waiting.done, 20, "wait_proxy to give up")
        with pytest.raises(ServalError, match="exited 3 times in a row before it was ready"):
            waiting.result()

    run(body, http=HTTPOptions())


def test_a_proxy_that_stayed_up_is_restarted_after_the_shortest_delay() -> None:
    async def body(w: World) -> None:
        await w.proxy_up()
        for stayed_s in (1.0, 1.0, 11.0):  # a proxy up 10 s starts the count over
            await w.clock.advance(stayed_s)
            before = len(w.backend.proxies)
            w.backend.proxies[-1].crash(1)
            took = await w.advance_until(
                lambda n=before: len(w.backend.proxies) > n,
                20,
                "a restart",
                step=0.125,
            )
            delays.append(took)
            await w.proxy_up()
        assert delays == [0.5, 1.0, 0.5]

    delays: list[float] = []
    run(body, http=HTTPOptions())


def test_a_proxy_at_every_place_and_the_places_followed() -> None:
    # Ray's EveryNode: a proxy per node; an app is reachable once every proxy routes with it;
    # a node that joins gets a proxy, one that leaves is no longer waited for.
    async def body(w: World) -> None:
        assert sorted(p.node for p in w.backend.proxies) == ["a", "b"]
        await w.calls.wait_proxy()
        await w.calls.deploy_app(app_spec(deployment(), route_prefix="/"))
        assert await w.wait_app() == ("RUNNING", "")
        version = w.controller.table_version
        assert all(version in p.versions for p in w.backend.proxies)
        w.backend.proxy_places = ["a", "b", "c"]
        await w.advance_until(lambda: len(w.backend.proxies) == 3, 5, "a proxy on c")
        assert w.backend.proxies[-1].node == "c"
        await w.calls.wait_proxy()
        gone = next(p for p in w.backend.proxies if p.node == "a")
        w.backend.proxy_places = ["b", "c"]
        await w.advance_until(lambda: gone.ended, 5, "a's proxy stopped")
        await w.clock.advance(10)
        assert len(w.backend.proxies) == 3  # not restarted: its place is gone
        await w.calls.deploy_app(app_spec(deployment(version="v2"), route_prefix="/"))
        assert await w.wait_app() == ("RUNNING", "")  # (not waiting for a's proxy)
        # the checkpoint names each place's proxy
        assert sorted(w.controller.proxies.refs()) == ["b", "c"]  # type: ignore[union-attr]

    run(body, http=HTTPOptions(), places=["a", "b"])


def test_a_proxy_that_cannot_listen_at_one_place_fails_the_wait_with_its_reason() -> None:
    async def body(w: World) -> None:
        waiting = asyncio.ensure_future(w.calls.wait_proxy())
        await w.advance_until(waiting.done, 5, "wait_proxy to fail")
        with pytest.raises(ServalError, match="port 8000 is taken"):
            waiting.result()

    # the first place's proxy listens, the second's cannot
    scripts = [ProxyScript(), ProxyScript(listen_error="port 8000 is taken")]
    run(body, http=HTTPOptions(), places=["a", "b"], proxy_scripts=scripts)


# -- the clock ------------------------------------------------------------------------------------


def test_the_fake_clock_fires_timers_in_order_and_times_out_waits() -> None:
    async def main() -> list[Any]:
        clock = FakeClock()
        log: list[Any] = []

        async def sleeper(name: str, seconds: float) -> None:
            await clock.sleep(seconds)
            log.append((name, clock.monotonic() - 1000.0))

        tasks = [asyncio.ensure_future(sleeper(n, s)) for n, s in [("b", 2.0), ("a", 1.0)]]
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timed = asyncio.ensure_future(clock.wait_for(never, 1.5))
        quick = asyncio.ensure_future(clock.wait_for(asyncio.sleep(0, "ok"), 1.5))
        await clock.advance(1.25)
        log.append(("quick", quick.result()))
        assert not timed.done()
        await clock.advance(1.0)
        with pytest.raises(TimeoutError):
            timed.result()
        assert never.cancelled()  # the wait cancelled what it waited for
        await asyncio.gather(*tasks)
        assert clock.pending == 0
        return log

    assert asyncio.run(main()) == [("a", 1.0), ("quick", "ok"), ("b", 2.0)]


def test_the_real_clock_is_the_default() -> None:
    async def main() -> None:
        assert isinstance(Controller(MemoryBackend()).clock, RealClock)

    asyncio.run(main())
