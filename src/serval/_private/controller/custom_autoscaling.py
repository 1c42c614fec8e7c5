"""Custom autoscaling policies, the controller's side (Ray Serve's ``AutoscalingPolicy``, per
deployment in ``autoscaling_config.policy``, or per application in a config file's
``autoscaling_policy``).

The controller keeps user code opaque, so it does not run these policies: a replica of the
application does (``replica/autoscaling.py`` says why, and what differs from Ray Serve). On
each autoscaling tick of a deployment with a custom policy the controller

1. asks each running replica for its custom metrics (``record_autoscaling_stats()``) and
   keeps them for ``look_back_period_s``;
2. builds the deployment's ``AutoscalingContext`` from what it measures (requests running and
   queued, averaged over the look-back; the replicas; the bounds; the times of the last
   changes) and sends it, with the policy and its opaque ``policy_state``, to one running
   replica (the same one while it runs);
3. gives the raw number it gets back to the deployment's ``AutoscalingPolicy.decide_custom``
   (pure: factors, bounds, delays) and applies the result.

An application-level policy decides for every deployment of the application that has an
``autoscaling_config``, once per tick of the first of them (in the application's order), from
each one's latest measurements; it takes precedence over the deployments' own policies (a
warning says so). With no replica running there is nothing to run a policy: requests waiting
at zero replicas scale up by the cold-start rule (``AutoscalingPolicy.cold_start``).

A policy that fails (raises, times out, answers nonsense) changes nothing that tick; its error
is logged once until it changes.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from serval._private.controller.clock import Clock
from serval._private.controller.state import (
    AppState,
    CustomPolicyState,
    DeploymentState,
    ReplicaRecord,
)
from serval._private.wire import protocol
from serval._private.wire.control import ReplicaCalls
from serval.config import (
    AutoscalingContext,
    AutoscalingPolicy,
    DeploymentID,
    ReplicaID,
    TimeStampedValue,
)

__all__ = ["CustomPolicies"]

logger = logging.getLogger(__name__)

# (the policy, whether it is the application's)
Custom = tuple[AutoscalingPolicy, bool]
Apply = Callable[[AppState, DeploymentState, int], None]


class CustomPolicies:
    def __init__(self, clock: Clock, apply: Apply) -> None:
        self.clock = clock
        self._apply = apply  # sets a deployment's autoscaling target (the controller's)

    def policy_of(self, app: AppState, dep: DeploymentState) -> Custom | None:
        """The custom policy that decides for ``dep``, if any."""
        config = dep.spec.config.autoscaling_config
        if config is None:
            return None
        app_policy = app.spec.autoscaling_policy
        if app_policy is not None and not app_policy.is_default_policy_function():
            if not config.policy.is_default_policy_function():
                self._log_once(
                    self._record(dep),
                    f"deployment {dep.name!r} has an autoscaling policy, but application "
                    f"{app.spec.name!r} has one too: the application's decides",
                )
            return app_policy, True
        if config.policy.is_default_policy_function():
            return None
        return config.policy, False

    # -- the tick --------------------------------------------------------------------------------

    async def collect_stats(
        self, dep: DeploymentState, running: list[ReplicaRecord], wait_s: float
    ) -> None:
        """Each running replica's custom metrics, kept for the look-back."""
        record = self._record(dep)
        calls = [
            self.clock.wait_for(ReplicaCalls(r.peer.call).autoscaling_stats(), wait_s)
            for r in running
            if r.peer is not None
        ]
        results = await _gather(calls)
        now = self.clock.time()
        live = {r.replica_id for r in running}
        for rid in [rid for rid in record.stats if rid not in live]:
            del record.stats[rid]
        for rec, result in zip(running, results, strict=True):
            if isinstance(result, BaseException):
                self._log_once(record, f"record_autoscaling_stats() of {rec.replica_id}: {result}")
                continue
            series = record.stats.setdefault(rec.replica_id, {})
            for name, value in result.items():
                if isinstance(value, float) and math.isfinite(value):
                    series.setdefault(name, deque()).append((now, value))
        assert dep.spec.config.autoscaling_config is not None
        cutoff = now - dep.spec.config.autoscaling_config.look_back_period_s
        for series in record.stats.values():
            for values in series.values():
                while values and values[0][0] < cutoff:
                    values.popleft()

    async def decide(
        self, app: AppState, dep: DeploymentState, custom: Custom, wait_s: float
    ) -> None:
        policy, app_level = custom
        if app_level:
            if dep is self._leader(app):
                await self._decide_app(app, policy, wait_s)
            return
        assert dep.policy is not None
        record = self._record(dep)
        now = self.clock.monotonic()
        runner = self._runner(record, [dep])
        if runner is None:  # no replica running: nothing can run the policy
            if dep.autoscale_target == 0 and dep.policy.load(now) > 0:
                self._set(app, dep, dep.policy.cold_start(now))
            return
        contexts = [self._context(app, dep)]
        answer = await self._ask(record, runner, policy, contexts, False, wait_s)
        if answer is None:
            return
        (wish,), record.state = answer
        assert wish is not None
        self._set(app, dep, dep.policy.decide_custom(now, dep.autoscale_target, wish))

    def cold_start(self, app: AppState, dep: DeploymentState) -> None:
        """Requests wait at zero replicas of a deployment with a custom policy."""
        assert dep.policy is not None
        self._set(app, dep, dep.policy.cold_start(self.clock.monotonic()))

    async def _decide_app(self, app: AppState, policy: AutoscalingPolicy, wait_s: float) -> None:
        record = app.custom
        if record is None or record.basis != policy:
            record = app.custom = CustomPolicyState(policy)
        deps = self._autoscaled(app)
        now = self.clock.monotonic()
        runner = self._runner(record, deps)
        answer = None
        if runner is not None:
            contexts = [self._context(app, d) for d in deps]
            answer = await self._ask(record, runner, policy, contexts, True, wait_s)
        wishes: list[float | None] = [None] * len(deps)
        if answer is not None:
            wishes, record.state = answer
        for dep, wish in zip(deps, wishes, strict=True):
            if not self._is_live(app, dep):
                continue
            assert dep.policy is not None
            if dep.autoscale_target == 0 and dep.policy.load(now) > 0:
                self._set(app, dep, dep.policy.cold_start(now))  # (as Ray: before the policy)
            elif wish is not None:
                self._set(app, dep, dep.policy.decide_custom(now, dep.autoscale_target, wish))

    async def _ask(
        self,
        record: CustomPolicyState,
        runner: ReplicaRecord,
        policy: AutoscalingPolicy,
        contexts: list[AutoscalingContext],
        app_level: bool,
        wait_s: float,
    ) -> tuple[list[float | None], bytes] | None:
        assert runner.peer is not None
        state = record.state
        call = ReplicaCalls(runner.peer.call).autoscale(policy, contexts, state, app_level)
        try:
            wishes, new_state = await self.clock.wait_for(call, wait_s)
            _check(wishes, new_state, len(contexts))
        except Exception as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else protocol.safe_str(exc)
            self._log_once(
                record,
                f"autoscaling policy {policy.policy_function} (run by replica "
                f"{runner.replica_id}) failed: {reason}",
            )
            return None
        record.error = ""
        return wishes, new_state

    # -- helpers ---------------------------------------------------------------------------------

    def _record(self, dep: DeploymentState) -> CustomPolicyState:
        # A new Decider (the autoscaling config changed) starts the policy's state afresh.
        if dep.custom is None or dep.custom.basis is not dep.policy:
            dep.custom = CustomPolicyState(dep.policy)
        return dep.custom

    def _context(self, app: AppState, dep: DeploymentState) -> AutoscalingContext:
        config = dep.spec.config.autoscaling_config
        decider = dep.policy
        assert config is not None and decider is not None
        record = self._record(dep)
        did = DeploymentID(dep.name, app.spec.name)
        running = [r.replica_id for r in dep.running()]
        ids = {rid: ReplicaID(rid, did) for rid in running}
        aggregated: dict[str, dict[ReplicaID, float]] = {}
        raw: dict[str, dict[ReplicaID, list[TimeStampedValue]]] = {}
        for rid, series in record.stats.items():
            if rid not in ids:
                continue
            for name, values in series.items():
                if values:
                    aggregated.setdefault(name, {})[ids[rid]] = sum(v for _, v in values) / len(
                        values
                    )
                    raw.setdefault(name, {})[ids[rid]] = [TimeStampedValue(t, v) for t, v in values]
        now = self.clock.monotonic()
        return AutoscalingContext(
            deployment_id=did,
            deployment_name=dep.name,
            app_name=app.spec.name,
            current_num_replicas=len(running),
            target_num_replicas=dep.autoscale_target,
            running_replicas=list(ids.values()),
            total_num_requests=decider.load(now),
            total_queued_requests=decider.queued(now),
            aggregated_metrics=aggregated,
            raw_metrics=raw,
            capacity_adjusted_min_replicas=config.min_replicas,
            capacity_adjusted_max_replicas=config.max_replicas,
            policy_state={},  # (the replica puts the policy's own there, from ``state``)
            last_scale_up_time=record.last_scale_up,
            last_scale_down_time=record.last_scale_down,
            current_time=self.clock.time(),
            config=config,
        )

    def _runner(
        self, record: CustomPolicyState, deps: list[DeploymentState]
    ) -> ReplicaRecord | None:
        """The replica to run the policy: the last one while it runs, else the first running
        one (in the deployments' order, then the oldest)."""
        candidates = [
            r
            for d in deps
            for r in sorted(d.running(), key=lambda r: r.index)
            if r.peer is not None and not r.peer.closed
        ]
        for rec in candidates:
            if rec.replica_id == record.runner:
                return rec
        if not candidates:
            return None
        record.runner = candidates[0].replica_id
        return candidates[0]

    def _set(self, app: AppState, dep: DeploymentState, wanted: int) -> None:
        record = self._record(dep)
        if wanted > dep.autoscale_target:
            record.last_scale_up = self.clock.time()
        elif wanted < dep.autoscale_target:
            record.last_scale_down = self.clock.time()
        self._apply(app, dep, wanted)

    def _leader(self, app: AppState) -> DeploymentState | None:
        deps = self._autoscaled(app)
        return deps[0] if deps else None

    def _autoscaled(self, app: AppState) -> list[DeploymentState]:
        out = []
        for spec in app.spec.deployments:
            dep = app.deployments.get(spec.name)
            if dep is not None and dep.policy is not None:
                out.append(dep)
        return out

    def _is_live(self, app: AppState, dep: DeploymentState) -> bool:
        return app.deployments.get(dep.name) is dep and dep.policy is not None

    def _log_once(self, record: CustomPolicyState, message: str) -> None:
        if record.error != message:
            record.error = message
            logger.warning("%s", message)


async def _gather(calls: list[Any]) -> list[Any]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


def _check(wishes: Any, state: Any, expected: int) -> None:
    # (the replica checked the user's answer; this guards the controller against a wrong reply)
    if not isinstance(state, bytes) or not isinstance(wishes, list) or len(wishes) != expected:
        raise TypeError("the replica's answer is not one decision per deployment")
    for wish in wishes:
        if wish is not None and not (isinstance(wish, float) and math.isfinite(wish) and wish >= 0):
            raise TypeError(f"the replica's answer has {wish!r} replicas")
