"""Custom autoscaling policies run here, in a replica of the application, not in the controller.

Why: the controller never loads user code (``controller/controller.py``). It is started
without the user's ``PYTHONPATH`` (``python -P``: nothing from the current directory), keeps
deployments as opaque bytes, and survives any user code that fails to import or crashes. Ray
Serve's controller unpickles and calls the policy itself; doing the same here would break that
rule for every custom policy, and importing a policy only "if it is installed" would fail the
guides' own example (a policy in ``autoscaling_policy.py`` next to the app). A replica already
has what the policy needs: the deployer's code path and working directory, the user's
dependencies, the deployment's environment.

So the controller computes each ``AutoscalingContext`` from what it already measures (plain
numbers, ids, the config), and asks one running replica of the application (the same one
while it lives) to decide: ``ReplicaCalls.autoscale``. That replica unpickles the policy (or
imports it by its path), calls it, checks its answer (numbers, the state) and returns the raw
numbers and the new ``policy_state`` pickled again: the controller keeps the state as opaque
bytes it sends back next time, and applies the factors, bounds and delays to the numbers
itself (``controller/autoscaling.py``, pure, tested on a fake clock).

Policies run on a thread of their own with an event loop of its own, created at the first
decision: ``asyncio.get_running_loop()`` works in them (class-based policies start background
tasks there, as on Ray's controller loop), and a slow policy delays neither the replica's
requests nor its control calls. One decision at a time: a policy still running when the next
tick asks is an error for that tick. A class-based policy is constructed once per replica
that runs it (with ``policy_kwargs``) and kept while its definition is unchanged.

What differs from Ray Serve: with no replica running there is nothing to run a
deployment-level policy; requests waiting then bring up replicas by Ray's own cold-start rule
(``ceil(upscaling_factor)``, at least one), without the policy. An application-level policy
runs as long as any replica of the application does, so it may scale a deployment from zero.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import cloudpickle

from serval.config import AutoscalingContext, AutoscalingPolicy, DeploymentID

__all__ = ["PolicyRunner", "checked_stats", "record_stats"]

# Ray Serve's RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S default
STATS_TIMEOUT_S = 10.0

Decision = tuple[list[float | None], bytes]


class PolicyRunner:
    """Runs custom policies for one replica, on a thread and event loop of their own."""

    def __init__(self, inline: bool = False) -> None:
        # inline: on the caller's loop, not a thread of its own (for tests on virtual time,
        # which cannot wait for another thread)
        self._inline = inline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._policies: dict[tuple[str, bytes, str], Callable[..., Any]] = {}
        self._deciding = False  # read on the replica's loop, written on the policy thread

    async def run(
        self,
        policy: AutoscalingPolicy,
        contexts: list[AutoscalingContext],
        state: bytes,
        app_level: bool,
    ) -> Decision:
        """The policy's raw wishes, one per context (None: it left that one out), and its
        new state, pickled."""
        if self._deciding:
            raise RuntimeError("the policy's previous decision is still running")
        if self._inline:
            return await self._decide(policy, contexts, state, app_level)
        future = asyncio.run_coroutine_threadsafe(
            self._decide(policy, contexts, state, app_level), self._policy_loop()
        )
        return await asyncio.wrap_future(future)

    def _policy_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever, name="serval-autoscaling-policy", daemon=True
                ).start()
                self._loop = loop
            return self._loop

    async def _decide(
        self,
        policy: AutoscalingPolicy,
        contexts: list[AutoscalingContext],
        state: bytes,
        app_level: bool,
    ) -> Decision:
        self._deciding = True
        try:
            fn = self._policy(policy)
            saved = cloudpickle.loads(state) if state else {}
            saved = saved if isinstance(saved, dict) else {}
            new_state: Any
            if app_level:
                for ctx in contexts:
                    ctx.policy_state = dict(saved.get(ctx.deployment_id) or {})
                by_id = {ctx.deployment_id: ctx for ctx in contexts}
                answer = await _called(fn, by_id)
                wishes, new_state = _app_answer(answer, contexts, policy.policy_function)
            else:
                contexts[0].policy_state = saved
                answer = await _called(fn, contexts[0])
                wish, new_state = _deployment_answer(answer, policy.policy_function)
                wishes = [wish]
            try:
                pickled = cloudpickle.dumps(new_state)
            except Exception as exc:
                raise TypeError(f"the policy_state it returned does not pickle: {exc}") from exc
            return wishes, pickled
        finally:
            self._deciding = False

    def _policy(self, policy: AutoscalingPolicy) -> Callable[..., Any]:
        key = (
            str(policy.policy_function),
            policy._serialized_policy_def,
            json.dumps(policy.policy_kwargs, sort_keys=True),
        )
        fn = self._policies.get(key)
        if fn is None:
            target = policy.get_policy()
            # A class: one instance, made here once (Ray Serve: once, on its controller).
            made: Any = target(**policy.policy_kwargs) if inspect.isclass(target) else target
            if not callable(made):
                raise TypeError(
                    f"{policy.policy_function} made a {type(made).__name__}, not a callable"
                )
            fn = self._policies[key] = made
        return fn


async def _called(fn: Callable[..., Any], arg: Any) -> Any:
    result = fn(arg)
    if inspect.isawaitable(result):
        result = await result
    return result


def _deployment_answer(answer: Any, name: str | Any) -> tuple[float, dict[str, Any]]:
    if not isinstance(answer, tuple | list) or len(answer) != 2:
        raise TypeError(
            f"autoscaling policy {name} must return (target_replicas, policy_state), "
            f"got {_short(answer)}"
        )
    wish, state = answer
    return _replicas(wish, name), _state(state, name)


def _app_answer(
    answer: Any, contexts: list[AutoscalingContext], name: str | Any
) -> tuple[list[float | None], dict[DeploymentID, dict[str, Any]]]:
    if not isinstance(answer, tuple | list) or len(answer) != 2 or not isinstance(answer[0], dict):
        raise TypeError(
            f"application autoscaling policy {name} must return ({{DeploymentID: replicas}}, "
            f"{{DeploymentID: policy_state}}), got {_short(answer)}"
        )
    decisions, states = answer
    known = {ctx.deployment_id for ctx in contexts}
    unknown = [key for key in decisions if key not in known]
    if unknown:
        raise ValueError(f"application autoscaling policy {name} decided for unknown {unknown}")
    states = states or {}
    if not isinstance(states, dict):
        raise TypeError(f"application autoscaling policy {name}: policy_state must be a dict")
    wishes: list[float | None] = [
        _replicas(decisions[ctx.deployment_id], name) if ctx.deployment_id in decisions else None
        for ctx in contexts
    ]
    return wishes, {key: _state(value, name) for key, value in states.items() if key in known}


def _replicas(value: Any, name: str | Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(
            f"autoscaling policy {name} returned {_short(value)} replicas, not a number"
        )
    if math.isinf(value):
        raise ValueError(f"autoscaling policy {name} returned {value} replicas")
    return max(0.0, float(value))


def _state(value: Any, name: str | Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(
            f"autoscaling policy {name}: policy_state must be a dict, got {_short(value)}"
        )
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


async def record_stats(
    user: Any, call: Callable[[Callable[..., Any]], Awaitable[Any]]
) -> dict[str, float]:
    """The replica's custom metrics: what its ``record_autoscaling_stats()`` returns ({} if
    it has none), called as its control hooks are (``call``), within ``STATS_TIMEOUT_S``."""
    fn = getattr(user, "record_autoscaling_stats", None)
    if fn is None:
        return {}
    return checked_stats(await asyncio.wait_for(call(fn), STATS_TIMEOUT_S))


def checked_stats(stats: Any) -> dict[str, float]:
    if not isinstance(stats, dict):
        raise TypeError(f"record_autoscaling_stats() must return a dict, got {_short(stats)}")
    out: dict[str, float] = {}
    for key, value in stats.items():
        if (
            not isinstance(key, str)
            or isinstance(value, bool)
            or not isinstance(value, int | float)
        ):
            raise TypeError(
                "record_autoscaling_stats() must return {name: number}, "
                f"got {_short(key)}: {_short(value)}"
            )
        out[key] = float(value)
    return out
