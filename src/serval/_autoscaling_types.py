"""The types of custom autoscaling policies, as Ray Serve names them (``serval.config`` exports
them: ``AutoscalingPolicy``, ``AutoscalingContext``, ``DeploymentID``, ``ReplicaID``,
``TimeStampedValue``).

A leaf: it imports nothing of serval's, so every process can read these objects, the
controller included. An ``AutoscalingPolicy`` holds the user's policy only as an import path
and opaque bytes (cloudpickle): constructing one in the driver serializes a callable; reading
one anywhere else never loads it. Only ``get_policy()`` does, and only a replica calls it
(``_private/replica/autoscaling.py`` says why the policy runs there).
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_AUTOSCALING_POLICY",
    "AutoscalingContext",
    "AutoscalingPolicy",
    "DeploymentID",
    "ReplicaID",
    "TimeStampedValue",
    "load_callable",
    "serialize_callable",
    "split_path",
]

# The built-in policy (run by the controller itself, never loaded from this path there).
DEFAULT_AUTOSCALING_POLICY = "serval.autoscaling_policy:default_autoscaling_policy"


@dataclass(frozen=True)
class DeploymentID:
    """A deployment, named within its application."""

    name: str
    app_name: str = "default"

    def __str__(self) -> str:
        return f"Deployment(name={self.name!r}, app={self.app_name!r})"


@dataclass(frozen=True)
class ReplicaID:
    """A replica: its id (unique within the cluster) and its deployment's."""

    unique_id: str
    deployment_id: DeploymentID

    def to_full_id_str(self) -> str:
        return f"{self.deployment_id.app_name}#{self.deployment_id.name}#{self.unique_id}"

    def __str__(self) -> str:
        return (
            f"Replica(id={self.unique_id!r}, deployment={self.deployment_id.name!r}, "
            f"app={self.deployment_id.app_name!r})"
        )


@dataclass(frozen=True, order=True)
class TimeStampedValue:
    """One value of a custom metric and when it was recorded (``time.time()``)."""

    timestamp: float
    value: float = field(compare=False)


@dataclass(frozen=True)
class AutoscalingPolicy:
    """A custom autoscaling policy (Ray Serve's ``serve.config.AutoscalingPolicy``).

    ``policy_function``: a function ``(AutoscalingContext) -> (replicas, policy_state)``, or
    a class whose instances are such callables (constructed once with ``policy_kwargs``);
    for an application-level policy, ``(dict[DeploymentID, AutoscalingContext]) ->
    (dict[DeploymentID, replicas], dict[DeploymentID, policy_state])``. Given as an object,
    it becomes its import path and is serialized here, with cloudpickle (by value when it
    lives in ``__main__``, else by reference); given as a path (``"module:name"`` or
    ``"module.name"``), it is imported where it runs, from the deployer's code path.
    ``policy_kwargs`` must be JSON-serializable. The default is the built-in policy.
    """

    policy_function: str | Callable[..., Any] = DEFAULT_AUTOSCALING_POLICY
    policy_kwargs: dict[str, Any] = field(default_factory=dict)
    # cloudpickle of the policy given as an object (b"": import it by its path)
    _serialized_policy_def: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        target = self.policy_function
        if callable(target):
            path, serialized = serialize_callable(target, "policy_function")
            if not self._serialized_policy_def:
                object.__setattr__(self, "_serialized_policy_def", serialized)
            object.__setattr__(self, "policy_function", path)
        elif not isinstance(target, str) or not split_path(target)[1]:
            raise ValueError(
                "policy_function must be a callable or an import path 'module:name', "
                f"got {target!r}"
            )
        if not isinstance(self.policy_kwargs, dict):
            raise TypeError(f"policy_kwargs must be a dict, got {self.policy_kwargs!r}")
        try:
            json.dumps(self.policy_kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"policy_kwargs is not JSON-serializable: {exc}") from None

    def is_default_policy_function(self) -> bool:
        return self.policy_function == DEFAULT_AUTOSCALING_POLICY

    def get_policy(self) -> Callable[..., Any]:
        """The policy function or class itself: unpickled, or imported by its path. Runs the
        user's code (module imports): never called by the controller."""
        assert isinstance(self.policy_function, str)
        return load_callable(self.policy_function, self._serialized_policy_def)


def serialize_callable(target: Any, what: str) -> tuple[str, bytes]:
    """A user's function or class given as an object: (its import path, its cloudpickle — by
    value when it lives in ``__main__``, else by reference)."""
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if not callable(target) or not module or not qualname:
        raise TypeError(f"{what} must be a function or a class, got {target!r}")
    import cloudpickle

    return f"{module}:{qualname}", cloudpickle.dumps(target)


def load_callable(path: str, serialized: bytes) -> Callable[..., Any]:
    """What ``serialize_callable`` wrote (``serialized``), or, when empty, ``path``
    (``"module:name"``) imported. Runs the user's code (module imports)."""
    if serialized:
        import cloudpickle

        loaded: Callable[..., Any] = cloudpickle.loads(serialized)
        return loaded
    module_name, attr = split_path(path)
    value: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        value = getattr(value, part)
    if not callable(value):
        raise TypeError(f"{path!r} is not callable")
    return value  # type: ignore[no-any-return]


def split_path(path: str) -> tuple[str, str]:
    """'pkg.module:name' or 'pkg.module.name' -> ('pkg.module', 'name'); ('', '') if neither."""
    if ":" in path:
        module, _, attr = path.partition(":")
    else:
        module, _, attr = path.rpartition(".")
    if not module or not attr or not all(part.isidentifier() for part in module.split(".")):
        return "", ""
    return module, attr


class AutoscalingContext:
    """What a custom autoscaling policy is given at each decision (Ray Serve's names).

    - ``deployment_id``, ``deployment_name``, ``app_name``
    - ``current_num_replicas`` (running), ``target_num_replicas`` (the autoscaler's target),
      ``running_replicas`` (their ``ReplicaID``)
    - ``total_num_requests``: requests running at the replicas plus those waiting at
      callers, averaged over ``look_back_period_s``; ``total_queued_requests``: the waiting
      ones; ``total_running_requests``: the difference
    - ``aggregated_metrics[name][replica_id]``: the mean over ``look_back_period_s`` of what
      each replica's ``record_autoscaling_stats()`` returned; ``raw_metrics`` the values
      themselves (``TimeStampedValue``)
    - ``capacity_adjusted_min_replicas`` / ``..._max_replicas``: the config's bounds
    - ``policy_state``: what the policy returned last time (``{}`` at first)
    - ``last_scale_up_time`` / ``last_scale_down_time`` / ``current_time``: ``time.time()``
      values (None: never)
    - ``config``: the deployment's ``AutoscalingConfig``

    The metrics may be given as callables, evaluated when first read.
    """

    def __init__(
        self,
        deployment_id: DeploymentID,
        deployment_name: str,
        app_name: str | None,
        current_num_replicas: int,
        target_num_replicas: int,
        running_replicas: list[ReplicaID],
        total_num_requests: float | Callable[[], float],
        total_queued_requests: float | Callable[[], float] | None,
        aggregated_metrics: (
            dict[str, dict[ReplicaID, float]] | Callable[[], dict[str, dict[ReplicaID, float]]]
        )
        | None,
        raw_metrics: (
            dict[str, dict[ReplicaID, list[TimeStampedValue]]]
            | Callable[[], dict[str, dict[ReplicaID, list[TimeStampedValue]]]]
        )
        | None,
        capacity_adjusted_min_replicas: int,
        capacity_adjusted_max_replicas: int,
        policy_state: dict[str, Any],
        last_scale_up_time: float | None,
        last_scale_down_time: float | None,
        current_time: float | None,
        config: Any | None,
    ) -> None:
        self.deployment_id = deployment_id
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.current_num_replicas = current_num_replicas
        self.target_num_replicas = target_num_replicas
        self.running_replicas = running_replicas
        self._total_num_requests = total_num_requests
        self._total_queued_requests = total_queued_requests
        self._aggregated_metrics = aggregated_metrics
        self._raw_metrics = raw_metrics
        self.capacity_adjusted_min_replicas = capacity_adjusted_min_replicas
        self.capacity_adjusted_max_replicas = capacity_adjusted_max_replicas
        self.policy_state = policy_state
        self.last_scale_up_time = last_scale_up_time
        self.last_scale_down_time = last_scale_down_time
        self.current_time = current_time
        self.config = config

    @functools.cached_property
    def total_num_requests(self) -> float:
        value = self._total_num_requests
        return value() if callable(value) else value

    @functools.cached_property
    def total_queued_requests(self) -> float:
        value = self._total_queued_requests
        value = value() if callable(value) else value
        return 0.0 if value is None else value

    @property
    def total_running_requests(self) -> float:
        return max(0.0, self.total_num_requests - self.total_queued_requests)

    @functools.cached_property
    def aggregated_metrics(self) -> dict[str, dict[ReplicaID, float]]:
        value = self._aggregated_metrics
        value = value() if callable(value) else value
        return {} if value is None else value

    @functools.cached_property
    def raw_metrics(self) -> dict[str, dict[ReplicaID, list[TimeStampedValue]]]:
        value = self._raw_metrics
        value = value() if callable(value) else value
        return {} if value is None else value

    def __repr__(self) -> str:
        return (
            f"AutoscalingContext({self.deployment_id}, current={self.current_num_replicas}, "
            f"target={self.target_num_replicas}, requests={self.total_num_requests})"
        )
