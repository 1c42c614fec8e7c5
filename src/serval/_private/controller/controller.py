"""The controller: desired state, reconciled against running replicas.

It never touches the data plane. Callers subscribe and get the replica table pushed whenever it
changes; replicas register here when they start and report when their constructor finished.
User code stays opaque bytes here: the controller never unpickles it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from typing import Any

from serval._private.backends.base import Backend, Exit
from serval._private.controller import checkpoint, details
from serval._private.controller.autoscaling import AutoscalingPolicy
from serval._private.controller.clock import Clock, RealClock
from serval._private.controller.custom_autoscaling import CustomPolicies
from serval._private.controller.proxies import Proxies
from serval._private.controller.state import (
    AppState,
    ControlPeer,
    DeploymentState,
    ReplicaRecord,
    ReplicaState,
)
from serval._private.telemetry import metrics
from serval._private.wire import protocol
from serval._private.wire.control import ProxyCalls, ReplicaCalls
from serval._private.wire.messages import PUSH, Push
from serval._private.wire.tasks import TaskOwner
from serval._private.wire.types import AppSpec, DeploymentInfo, ReplicaInfo, ReplicaInit, Table
from serval.config import BackpressureConfig, HTTPOptions, RequestRouterConfig
from serval.exceptions import ApplicationNotFoundError, DeploymentFailedError
from serval.status import (
    ApplicationStatusOverview,
    DeploymentStatusOverview,
    ReplicaStatusOverview,
    ServeStatus,
)

logger = logging.getLogger(__name__)

_MAX_START_FAILURES = 3
_KILL_AFTER_S = 5.0  # after a graceful timeout, how long a replica gets before SIGKILL
_QUEUE_REPORT_MAX_AGE_S = 2.0  # a caller's queue report counts this long
_METRICS_TIMEOUT_S = 1.0  # a replica slower than this to report is left out of a scrape
_DEFAULT_BACKPRESSURE = BackpressureConfig()  # (tables leave it out)


class Controller:
    def __init__(
        self,
        backend: Backend,
        http: HTTPOptions | None = None,
        address: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.backend = backend
        # every timer and timeout of the controller's (a test runs it on a FakeClock)
        self.clock = clock if clock is not None else RealClock()
        self.address = address  # where the checkpoint lives (None: no checkpoint)
        self._save_scheduled = False
        self.http = http
        self.stopping = False
        self.apps: dict[str, AppState] = {}
        self.subscribers: set[ControlPeer] = set()
        self.table_version = 0
        self.stopped = asyncio.Event()
        self.tasks = TaskOwner("the controller")  # watches, loops, drains: close() ends them
        self._replicas: dict[str, tuple[AppState, DeploymentState, ReplicaRecord]] = {}
        # custom autoscaling policies (run by replicas: the controller keeps user code opaque)
        self.custom = CustomPolicies(self.clock, self._apply_decision)
        # The HTTP proxies (None: the cluster has none)
        self.proxies: Proxies | None = None
        if http is not None and http.enabled:
            self.proxies = Proxies(backend, http, self.clock, self.tasks, self._schedule_save)

    def start(self, recover: bool = False) -> None:
        ckpt = checkpoint.load(self.backend, self.address) if recover and self.address else None
        restored = checkpoint.restore(ckpt, self.backend) if ckpt is not None else None
        if restored is not None:
            self.table_version = restored.table_version
            self.apps = restored.apps
            for app, dep, rec in restored.replicas:
                self.adopt_replica(app, dep, rec)
            for app in self.apps.values():
                for dep in app.deployments.values():
                    self.setup_autoscaling(app, dep)
            logger.info("recovered %d application(s) from the checkpoint", len(self.apps))
        restored_proxies = restored.proxies if restored is not None else {}
        if self.proxies is not None:
            self.proxies.start(restored_proxies)
        else:
            for host in restored_proxies.values():
                host.kill()
        for app in list(self.apps.values()):
            if app.deleting:
                self.tasks.spawn(self._delete(app))
                continue
            for dep in app.deployments.values():
                self._reconcile(app, dep)
        self._publish()

    def adopt_replica(self, app: AppState, dep: DeploymentState, rec: ReplicaRecord) -> None:
        """Take over a replica that outlived the previous controller."""
        rec.started_at = self.clock.monotonic()  # (as far as status goes)
        dep.replicas[rec.replica_id] = rec
        self._replicas[rec.replica_id] = (app, dep, rec)
        self.tasks.spawn(self._watch(app, dep, rec))
        if rec.state == ReplicaState.RUNNING:
            self.tasks.spawn(self._health_loop(app, dep, rec))

    def _schedule_save(self) -> None:
        if self.address is None or self._save_scheduled:
            return
        self._save_scheduled = True
        asyncio.get_running_loop().call_soon(self._save)

    def _save(self) -> None:
        self._save_scheduled = False
        if self.address is None or self.stopping:
            return
        try:
            checkpoint.save(
                self.backend,
                self.address,
                self.table_version,
                self.proxies.refs() if self.proxies is not None else {},
                list(self.apps.values()),
            )
        except OSError as exc:
            logger.error("could not write the checkpoint: %s", exc)

    # -- the HTTP proxies (controller.proxies) ----------------------------------------------------

    def rpc_proxy_ready(self, peer: ControlPeer, error: str | None, node: str = "") -> None:
        if self.proxies is not None:
            self.proxies.ready(node, peer, error)

    def rpc_proxy_ack(self, peer: ControlPeer, version: int, node: str = "") -> None:
        if self.proxies is not None:
            self.proxies.ack(node, version)

    async def rpc_wait_proxy(self, peer: ControlPeer) -> None:
        """Return once every HTTP proxy listens (at once if there is none)."""
        if self.proxies is not None:
            await self.proxies.wait(0)

    # -- RPC: callers ----------------------------------------------------------------------------

    def rpc_subscribe(self, peer: ControlPeer) -> Table:
        self.subscribers.add(peer)
        return self.table_version, self._table(), self._routes()

    def rpc_deploy_app(self, peer: ControlPeer, spec: AppSpec) -> None:
        self._check_route_prefix(spec)
        for dspec in spec.deployments:
            reason = self.backend.unsupported(dspec.config)
            if reason is not None:
                raise ValueError(f"deployment {dspec.name!r} cannot run here: {reason}")
        app = self.apps.get(spec.name)
        if app is None or app.deleting:
            if app is not None:
                raise DeploymentFailedError(f"application {spec.name!r} is being deleted")
            app = AppState(spec, {})
            self.apps[spec.name] = app
        app.spec = spec
        app.deployed_at = self.clock.time()
        wanted = {d.name: d for d in spec.deployments}
        for name in list(app.deployments):
            if name not in wanted:
                self._retire(app, app.deployments.pop(name))
        for name, dspec in wanted.items():
            dep = app.deployments.get(name)
            if dep is None:
                dep = app.deployments[name] = DeploymentState(spec.name, dspec)
                self.setup_autoscaling(app, dep)
                continue
            old_config = dep.spec.config.user_config
            dep.spec = dspec
            dep.failed_message = ""
            dep.start_failures = 0
            if dspec.config.user_config != old_config:
                self._reconfigure(app, dep)
            self.setup_autoscaling(app, dep)
        self._publish()
        for dep in app.deployments.values():
            self._reconcile(app, dep)
        app.notify()

    async def rpc_wait_app(self, peer: ControlPeer, name: str) -> tuple[str, str]:
        """Return (status, message) once the app is RUNNING or DEPLOY_FAILED."""
        while True:
            app = self.apps.get(name)
            if app is None:
                raise ApplicationNotFoundError(f"application {name!r} does not exist")
            status, message = app.status()
            if status == "RUNNING" and self.proxies is not None and app.spec.route_prefix:
                await self.proxies.wait(self.table_version)  # reachable over HTTP on return
                return status, message
            if status in ("RUNNING", "DEPLOY_FAILED"):
                return status, message
            await app.changed.wait()

    async def rpc_delete_app(self, peer: ControlPeer, name: str) -> None:
        app = self.apps.get(name)
        if app is None:
            return
        await self._delete(app)

    def rpc_status(self, peer: ControlPeer) -> ServeStatus:
        out = {}
        now = self.clock.monotonic()
        for name, app in self.apps.items():
            status, message = app.status()
            deps = {d.name: self._deployment_status(d, now) for d in app.deployments.values()}
            out[name] = ApplicationStatusOverview(
                status, message, app.spec.route_prefix, app.deployed_at, deps
            )
        return ServeStatus(out)

    def _deployment_status(self, dep: DeploymentState, now: float) -> DeploymentStatusOverview:
        replicas = tuple(
            ReplicaStatusOverview(r.replica_id, r.state.value, *self._phase(dep, r, now))
            for r in sorted(dep.replicas.values(), key=lambda r: r.index)
        )
        return DeploymentStatusOverview(
            dep.status(),
            dep.replica_states(),
            dep.failed_message or dep.health_message,
            dep.target,
            replicas,
        )

    def _phase(self, dep: DeploymentState, rec: ReplicaRecord, now: float) -> tuple[str, float]:
        """What a replica is doing in its state, and for how long (status and progress)."""
        if rec.state == ReplicaState.STOPPING:
            return "stopping", now - (rec.stopping_at or now)
        if rec.state == ReplicaState.RUNNING:
            return "", 0.0
        if rec.registered_at is not None:
            return "running its constructor", now - rec.registered_at
        if self.backend.name == "ray":
            options = dep.spec.config.ray_actor_options
            wants = ", ".join(
                f"{key}={options[key]}"
                for key in ("num_cpus", "num_gpus", "memory", "resources")
                if options.get(key)
            )
            where = f" (it asks for {wants})" if wants else ""
            return f"waiting for Ray to place and start its actor{where}", now - rec.started_at
        return "starting its process", now - rec.started_at

    def rpc_http_options(self, peer: ControlPeer) -> HTTPOptions | None:
        """The cluster's HTTP options (None: it has no HTTP proxy), without a key password."""
        if self.http is None:
            return None
        return dataclasses.replace(self.http, ssl_keyfile_password=None)

    async def rpc_collect_metrics(
        self, peer: ControlPeer, node: str | None = None
    ) -> metrics.Snapshot:
        """Every running replica's metrics, and those of every HTTP proxy but the one at
        ``node`` (the proxy that asks adds its own), for ``/-/metrics``; one that does not
        answer within a second is left out of this scrape."""
        peers = [
            r.peer
            for app in self.apps.values()
            for dep in app.deployments.values()
            for r in dep.running()
            if r.peer is not None and not r.peer.closed
        ]
        asks = [ReplicaCalls(p.call).export_metrics() for p in peers]
        if self.proxies is not None:
            asks += [ProxyCalls(p.call).http_metrics() for p in self.proxies.peers(but=node)]
        found = await asyncio.gather(
            *(self.clock.wait_for(ask, _METRICS_TIMEOUT_S) for ask in asks),
            return_exceptions=True,
        )
        return metrics.merge([self._own_metrics(), *(s for s in found if isinstance(s, list))])

    def _own_metrics(self) -> metrics.Snapshot:
        """What the controller knows of the replicas, as metrics."""
        healthy: metrics.Series = []
        starts: metrics.Series = []
        queued: metrics.Series = []
        now = self.clock.monotonic()
        for app in self.apps.values():
            for dep in app.deployments.values():
                key = (dep.name, app.spec.name)
                starts.append((key, float(dep.starts)))
                queued.append((key, float(dep.queued_now(now, _QUEUE_REPORT_MAX_AGE_S))))
                for rec in dep.replicas.values():
                    running = rec.state == ReplicaState.RUNNING
                    healthy.append(((dep.name, rec.replica_id, app.spec.name), float(running)))
        return [
            (metrics.REPLICA_HEALTHY, healthy),
            (metrics.REPLICA_STARTS, starts),
            (metrics.QUEUED_AT_CALLERS, queued),
        ]

    def rpc_details(self, peer: ControlPeer) -> dict[str, Any]:
        """Every app, deployment and replica in detail, as JSON-able values (the dashboard's
        and the REST API's source: ``controller/details.py``)."""
        return details.of(self.backend.name, self.http, self.proxies, self.apps, self.clock)

    def rpc_app_configs(self, peer: ControlPeer) -> dict[str, dict[str, Any] | None]:
        return {name: app.spec.source_config for name, app in self.apps.items() if not app.deleting}

    def rpc_get_app(self, peer: ControlPeer, name: str) -> str:
        app = self.apps.get(name)
        if app is None or app.deleting:
            raise ApplicationNotFoundError(f"application {name!r} does not exist")
        return app.spec.ingress

    def rpc_apps_with_deployment(self, peer: ControlPeer, deployment: str) -> list[str]:
        return [
            name
            for name, app in self.apps.items()
            if deployment in app.deployments and not app.deleting
        ]

    async def rpc_shutdown(self, peer: ControlPeer) -> None:
        self.stopping = True
        proxies = self.proxies
        proxies_stopped = self.tasks.spawn(proxies.stop()) if proxies is not None else None
        await asyncio.gather(*(self._delete(app) for app in list(self.apps.values())))
        if proxies_stopped is not None:
            await proxies_stopped
        self.stopped.set()

    async def owner_gone(self) -> None:
        """The owner died without a shutdown: kill the proxy and every replica known here
        (adopted ones too: by pid), and wait for them to exit."""
        self.stopping = True  # nothing is restarted or replaced from now on
        hosts = []
        for _, _, rec in self._replicas.values():
            rec.state = ReplicaState.STOPPING  # an exit asked for: nothing to report
            hosts.append(rec.host)
        if self.proxies is not None:
            self.proxies.stopping = True
            hosts.extend(self.proxies.hosts())
        for host in hosts:
            host.kill()
        await asyncio.gather(*(h.wait() for h in hosts))

    # -- RPC: replicas ---------------------------------------------------------------------------

    def rpc_register(self, peer: ControlPeer, replica_id: str, address: str = "") -> ReplicaInit:
        found = self._replicas.get(replica_id)
        if found is None:
            raise LookupError(f"unknown replica {replica_id}")
        app, dep, rec = found
        rec.peer = peer
        rec.registered_at = self.clock.monotonic()  # its constructor runs from now on
        if address:  # where it listens, when its backend could not know it in advance
            rec.address = address
            self._schedule_save()
        peer.info["replica_id"] = replica_id
        return ReplicaInit(
            app=app.spec.name,
            deployment=dep.name,
            payload=dep.spec.payload,
            is_function=dep.spec.is_function,
            config=dep.spec.config,
            sys_path=app.spec.sys_path,
            cwd=app.spec.cwd,
        )

    def rpc_reattach(self, peer: ControlPeer, replica_id: str) -> None:
        """A replica adopted after a controller restart reconnects its control channel."""
        found = self._replicas.get(replica_id)
        if found is None:
            raise LookupError(f"unknown replica {replica_id}")
        found[2].peer = peer
        peer.info["replica_id"] = replica_id

    def rpc_record_models(self, peer: ControlPeer, replica_id: str, model_ids: list[str]) -> None:
        found = self._replicas.get(replica_id)
        if found is not None:
            found[2].model_ids = frozenset(model_ids)
            if found[2].state == ReplicaState.RUNNING:
                self._publish()

    def rpc_replica_ready(
        self,
        peer: ControlPeer,
        replica_id: str,
        error: str | None,
        async_methods: frozenset[str] = frozenset(),
    ) -> None:
        found = self._replicas.get(replica_id)
        if found is None:
            return
        app, dep, rec = found
        if rec.state != ReplicaState.STARTING:
            return
        if error is not None:
            dep.failed_message = error
            self._stop(app, dep, rec, graceful=False)
            self._after_change(app, dep)
            return
        rec.state = ReplicaState.RUNNING
        rec.async_methods = async_methods
        dep.start_failures = 0
        self._publish()
        self.tasks.spawn(self._health_loop(app, dep, rec))
        router = dep.spec.config.request_router_config
        if router is not None and not router.is_default():
            self.tasks.spawn(self._routing_stats_loop(app, dep, rec, router))
        self._after_change(app, dep)

    async def _routing_stats_loop(
        self, app: AppState, dep: DeploymentState, rec: ReplicaRecord, router: RequestRouterConfig
    ) -> None:
        """Ask a running replica for its ``record_routing_stats()`` every period; a change is
        published in the table, where callers' custom routers read it."""
        while rec.state == ReplicaState.RUNNING and self._is_live(app, dep) and not self.stopping:
            peer = rec.peer
            if peer is not None and not peer.closed:
                try:
                    stats = await asyncio.wait_for(
                        ReplicaCalls(peer.call).routing_stats(),
                        router.request_routing_stats_timeout_s,
                    )
                except (TimeoutError, OSError, ConnectionError) as exc:
                    logger.warning("routing stats of %s: %s", rec.replica_id, exc)
                except Exception as exc:  # the user's record_routing_stats() raised
                    logger.warning("record_routing_stats() of %s raised: %r", rec.replica_id, exc)
                else:
                    found = tuple(sorted(stats.items()))
                    if found != rec.routing_stats:
                        rec.routing_stats = found
                        self._publish()
            await asyncio.sleep(router.request_routing_stats_period_s)

    # -- reconciliation --------------------------------------------------------------------------

    def _reconcile(self, app: AppState, dep: DeploymentState) -> None:
        if app.deleting or dep.failed_message or self.stopping:
            return
        current = dep.current()
        for _ in range(dep.target - len(current)):
            self._start(app, dep)
        excess = len(current) - dep.target
        if excess > 0:
            # Prefer stopping replicas that are not serving yet.
            order = sorted(current, key=lambda r: (r.state == ReplicaState.RUNNING, r.index))
            for rec in order[:excess]:
                self._stop(app, dep, rec)
        current = dep.current()
        if all(r.state == ReplicaState.RUNNING for r in current) and len(current) >= dep.target:
            for rec in dep.outdated():  # the new version is up: retire the old one
                self._stop(app, dep, rec)

    def _start(self, app: AppState, dep: DeploymentState) -> None:
        index = dep.next_index
        dep.next_index += 1
        replica_id = uuid.uuid4().hex[:12]
        label = f"{app.spec.name}.{dep.name}#{index}"
        runtime_env = dep.spec.config.ray_actor_options.get("runtime_env") or {}
        env = {str(k): str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
        try:
            host = self.backend.start_replica(replica_id, label, env, dep.spec.config)
        except Exception as exc:  # it cannot be placed (no node with room, say): say why
            logger.error("could not start a replica of %s: %s", label, exc)
            dep.failed_message = f"could not start a replica: {exc}"
            app.notify()
            return
        rec = ReplicaRecord(
            replica_id,
            index,
            dep.spec.version,
            host,
            self.backend.replica_address(replica_id),
            started_at=self.clock.monotonic(),
        )
        dep.replicas[replica_id] = rec
        dep.starts += 1
        self._replicas[replica_id] = (app, dep, rec)
        self.tasks.spawn(self._watch(app, dep, rec))
        self._schedule_save()

    async def _watch(self, app: AppState, dep: DeploymentState, rec: ReplicaRecord) -> None:
        ended = await rec.host.wait()
        self._on_exit(app, dep, rec, ended)

    # -- autoscaling -------------------------------------------------------------------------------

    def setup_autoscaling(self, app: AppState, dep: DeploymentState) -> None:
        config = dep.spec.config.autoscaling_config
        if config is None:
            dep.policy = None
            return
        if dep.policy is not None and dep.policy.config == config:
            return
        fresh = dep.policy is None
        dep.policy = AutoscalingPolicy(config, self.clock.monotonic())
        if fresh and not dep.replicas:
            dep.autoscale_target = dep.policy.initial_replicas()
        else:
            dep.autoscale_target = max(
                config.min_replicas, min(config.max_replicas, dep.autoscale_target)
            )
        self.tasks.spawn(self._autoscale_loop(app, dep, dep.policy))

    async def _autoscale_loop(
        self, app: AppState, dep: DeploymentState, policy: AutoscalingPolicy
    ) -> None:
        interval = policy.config.metrics_interval_s
        while dep.policy is policy and not app.deleting and self._is_live(app, dep):
            await self.clock.sleep(interval)
            if dep.policy is not policy or app.deleting:
                return
            await self._autoscale_step(app, dep, policy, interval)

    async def _autoscale_step(
        self, app: AppState, dep: DeploymentState, policy: AutoscalingPolicy, interval: float
    ) -> None:
        running = [r for r in dep.running() if r.peer is not None and not r.peer.closed]
        custom = self.custom.policy_of(app, dep)
        stats = None
        if custom is not None:  # its custom metrics, gathered alongside
            stats = asyncio.ensure_future(self.custom.collect_stats(dep, running, interval))
        counts = await asyncio.gather(
            *(
                self.clock.wait_for(ReplicaCalls(r.peer.call).metrics(), interval)
                for r in running
                if r.peer
            ),
            return_exceptions=True,
        )
        now = self.clock.monotonic()
        ongoing = sum(c for c in counts if isinstance(c, int))
        queued = dep.queued_now(now, _QUEUE_REPORT_MAX_AGE_S)
        policy.record(now, ongoing + queued, queued)
        if custom is None:
            self._apply_decision(app, dep, policy.decide(now, dep.autoscale_target))
            return
        assert stats is not None
        await stats
        await self.custom.decide(app, dep, custom, interval)

    def _apply_decision(self, app: AppState, dep: DeploymentState, wanted: int) -> None:
        if wanted != dep.autoscale_target:
            logger.info("autoscaling %s: %d -> %d replicas", dep.name, dep.autoscale_target, wanted)
            dep.autoscale_target = wanted
            self._reconcile(app, dep)
            app.notify()
            self._schedule_save()

    def rpc_record_queued(self, peer: ControlPeer, counts: dict[tuple[str, str], int]) -> None:
        now = self.clock.monotonic()
        for (app_name, dep_name), n in counts.items():
            app = self.apps.get(app_name)
            dep = app.deployments.get(dep_name) if app is not None else None
            if app is None or dep is None:
                continue
            dep.queued[id(peer)] = (n, now)
            if n > 0 and dep.policy is not None and dep.autoscale_target == 0:
                # Requests wait at zero replicas: scale from zero now, not at the next tick.
                queued = float(dep.queued_now(now, _QUEUE_REPORT_MAX_AGE_S))
                dep.policy.record(now, queued, queued)
                if self.custom.policy_of(app, dep) is not None:
                    self.custom.cold_start(app, dep)
                else:
                    self._apply_decision(app, dep, dep.policy.decide(now, 0))

    def _is_live(self, app: AppState, dep: DeploymentState) -> bool:
        return self.apps.get(app.spec.name) is app and app.deployments.get(dep.name) is dep

    # -- live config and health --------------------------------------------------------------------

    def _reconfigure(self, app: AppState, dep: DeploymentState) -> None:
        """A new user_config, same code: apply it to the running replicas in place."""
        for rec in dep.replicas.values():
            # Replicas still starting read the new config when they register.
            if rec.state == ReplicaState.RUNNING and rec.peer is not None:
                dep.reconfiguring += 1
                self.tasks.spawn(self._reconfigure_one(app, dep, rec, dep.spec.config.user_config))

    async def _reconfigure_one(
        self, app: AppState, dep: DeploymentState, rec: ReplicaRecord, user_config: Any
    ) -> None:
        try:
            assert rec.peer is not None
            await ReplicaCalls(rec.peer.call).reconfigure(user_config)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {protocol.safe_str(exc)}"
            logger.error("reconfigure of replica %s failed: %s", rec.replica_id, reason)
            dep.failed_message = f"reconfigure() raised {reason}"
        finally:
            dep.reconfiguring -= 1
            app.notify()

    async def _health_loop(self, app: AppState, dep: DeploymentState, rec: ReplicaRecord) -> None:
        while rec.state == ReplicaState.RUNNING:
            config = dep.spec.config
            await self.clock.sleep(config.health_check_period_s)
            if rec.state != ReplicaState.RUNNING:
                return
            if rec.peer is None or rec.peer.closed:
                continue  # adopted and not reattached yet, or dying: its exit is watched
            try:
                await self.clock.wait_for(
                    ReplicaCalls(rec.peer.call).check_health(), config.health_check_timeout_s
                )
                if rec.started_at >= dep.health_failed_at:  # a replacement passed one
                    dep.health_message = ""
            except Exception as exc:
                reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else repr(exc)
                if rec.state != ReplicaState.RUNNING:
                    return
                dep.health_message = (
                    f"replica {rec.replica_id} failed its health check ({reason}); replaced"
                )
                dep.health_failed_at = self.clock.monotonic()
                logger.warning(
                    "replica %s of %s failed its health check (%s); replacing it",
                    rec.replica_id,
                    dep.name,
                    reason,
                )
                self._stop(app, dep, rec, graceful=False)
                self._after_change(app, dep)
                return

    def _stop(
        self, app: AppState, dep: DeploymentState, rec: ReplicaRecord, graceful: bool = True
    ) -> None:
        was_running = rec.state == ReplicaState.RUNNING
        rec.state = ReplicaState.STOPPING
        rec.stopping_at = self.clock.monotonic()
        if was_running:
            self._publish()  # callers stop sending before the replica starts draining
        if graceful and rec.peer is not None:
            self.tasks.spawn(self._drain(rec, dep.spec.config.graceful_shutdown_timeout_s))
        else:  # (not registered yet: nothing runs there to finish)
            rec.host.kill()

    async def _drain(self, rec: ReplicaRecord, grace: float) -> None:
        """Ask the replica to finish its requests and exit; kill it if it has not in time."""
        peer = rec.peer
        if peer is not None and not peer.closed:
            with contextlib.suppress(Exception):  # gone already, or not answering: killed below
                await self.clock.wait_for(ReplicaCalls(peer.call).drain(), _KILL_AFTER_S)
        with contextlib.suppress(asyncio.TimeoutError):
            await self.clock.wait_for(rec.host.wait(), grace + _KILL_AFTER_S)
            return
        logger.warning("replica %s did not exit in time; killing it", rec.replica_id)
        rec.host.kill()

    def _on_exit(
        self, app: AppState, dep: DeploymentState, rec: ReplicaRecord, ended: Exit
    ) -> None:
        self._schedule_save()
        dep.replicas.pop(rec.replica_id, None)
        self._replicas.pop(rec.replica_id, None)
        if rec.peer is not None:
            rec.peer.close()
        if rec.state == ReplicaState.RUNNING:
            logger.warning("replica %s of %s died (%s)", rec.replica_id, dep.name, ended.reason)
            self._publish()
        elif rec.state == ReplicaState.STARTING and not dep.failed_message:
            dep.start_failures += 1
            logger.warning(
                "replica %s of %s died while starting (%s)",
                rec.replica_id,
                dep.name,
                ended.reason,
            )
            if dep.start_failures >= _MAX_START_FAILURES:
                dep.failed_message = (
                    f"replicas died while starting, {dep.start_failures} times in a row "
                    f"(last: {ended.reason}); see the log above"
                )
        self._after_change(app, dep)

    def _after_change(self, app: AppState, dep: DeploymentState) -> None:
        if app.deleting:
            if not any(d.replicas for d in app.deployments.values()):
                app.notify()
            return
        if dep.app in self.apps and self.apps[dep.app] is app and dep.name in app.deployments:
            self._reconcile(app, dep)
        app.notify()

    def _retire(self, app: AppState, dep: DeploymentState) -> None:
        """A deployment dropped from its app by a redeploy."""
        for rec in list(dep.replicas.values()):
            if rec.state != ReplicaState.STOPPING:
                self._stop(app, dep, rec)

    async def _delete(self, app: AppState) -> None:
        if not app.deleting:
            app.deleting = True
            self._publish()
            for dep in app.deployments.values():
                for rec in list(dep.replicas.values()):
                    if rec.state != ReplicaState.STOPPING:
                        self._stop(app, dep, rec)
            app.notify()
        while any(d.replicas for d in app.deployments.values()):
            await app.changed.wait()
        if self.apps.get(app.spec.name) is app:
            del self.apps[app.spec.name]
            self._schedule_save()

    def _check_route_prefix(self, spec: AppSpec) -> None:
        if spec.route_prefix is None:
            return
        for name, app in self.apps.items():
            if (
                name != spec.name
                and not app.deleting
                and app.spec.route_prefix == spec.route_prefix
            ):
                raise ValueError(
                    f"route_prefix {spec.route_prefix!r} is already used by application {name!r}"
                )

    # -- the replica table -----------------------------------------------------------------------

    def _routes(self) -> dict[str, tuple[str, str]]:
        return {
            app.spec.route_prefix: (app.spec.name, app.spec.ingress)
            for app in self.apps.values()
            if app.spec.route_prefix is not None and not app.deleting
        }

    def _table(self) -> dict[tuple[str, str], DeploymentInfo]:
        table = {}
        for app in self.apps.values():
            if app.deleting:
                continue
            for dep in app.deployments.values():
                replicas = tuple(
                    ReplicaInfo(
                        r.replica_id, r.address, r.model_ids, r.async_methods, r.routing_stats
                    )
                    for r in dep.replicas.values()
                    if r.state == ReplicaState.RUNNING
                )
                cfg = dep.spec.config
                backpressure = cfg.backpressure_config
                table[(app.spec.name, dep.name)] = DeploymentInfo(
                    app.spec.name,
                    dep.name,
                    cfg.max_ongoing_requests,
                    cfg.max_queued_requests,
                    replicas,
                    None if backpressure == _DEFAULT_BACKPRESSURE else backpressure,
                    cfg.request_router_config,
                )
        return table

    def _publish(self) -> None:
        self._schedule_save()
        self.table_version += 1
        table = (self.table_version, self._table(), self._routes())
        pieces = protocol.encode(Push(PUSH, "table", table))
        for peer in list(self.subscribers):
            if peer.closed or peer.conn is None:
                self.subscribers.discard(peer)
                continue
            peer.conn.send_pieces(pieces)

    async def close(self) -> None:
        await self.tasks.close()
