"""Typed configuration: a deployment's options, and the HTTP options of a cluster.

The field names, defaults and meaning are Ray Serve's.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AutoscalingConfig", "DeploymentConfig", "HTTPOptions"]

# Options a replica needs when it changes; anything else can be applied in place.
_IN_PLACE_FIELDS = frozenset(
    {"num_replicas", "user_config", "max_queued_requests", "autoscaling_config"}
)


@dataclass(frozen=True)
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    metrics_interval_s: float = 10.0
    look_back_period_s: float = 30.0
    upscaling_factor: float | None = None
    downscaling_factor: float | None = None

    def __post_init__(self) -> None:
        _check(self.min_replicas >= 0, "autoscaling_config.min_replicas must be >= 0")
        _check(
            self.max_replicas >= max(self.min_replicas, 1),
            "autoscaling_config.max_replicas must be >= min_replicas and >= 1",
        )
        if self.initial_replicas is not None:
            _check(
                self.min_replicas <= self.initial_replicas <= self.max_replicas,
                "autoscaling_config.initial_replicas must be within [min_replicas, max_replicas]",
            )
        _check(self.target_ongoing_requests > 0, "target_ongoing_requests must be > 0")
        for name in ("upscale_delay_s", "downscale_delay_s", "look_back_period_s"):
            _check(getattr(self, name) >= 0, f"autoscaling_config.{name} must be >= 0")
        _check(self.metrics_interval_s > 0, "autoscaling_config.metrics_interval_s must be > 0")


@dataclass(frozen=True)
class DeploymentConfig:
    num_replicas: int = 1
    max_ongoing_requests: int = 5
    max_queued_requests: int = -1
    user_config: Any = None
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0
    graceful_shutdown_wait_loop_s: float = 2.0
    autoscaling_config: AutoscalingConfig | None = None
    ray_actor_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.num_replicas, int) and self.num_replicas >= 0,
            f"num_replicas must be an int >= 0, got {self.num_replicas!r}",
        )
        _check(
            isinstance(self.max_ongoing_requests, int) and self.max_ongoing_requests >= 1,
            f"max_ongoing_requests must be an int >= 1, got {self.max_ongoing_requests!r}",
        )
        _check(
            isinstance(self.max_queued_requests, int)
            and (self.max_queued_requests == -1 or self.max_queued_requests >= 0),
            f"max_queued_requests must be -1 (no limit) or an int >= 0, "
            f"got {self.max_queued_requests!r}",
        )
        for name in (
            "health_check_period_s",
            "health_check_timeout_s",
            "graceful_shutdown_timeout_s",
            "graceful_shutdown_wait_loop_s",
        ):
            value = getattr(self, name)
            _check(
                isinstance(value, (int, float)) and value > 0 and math.isfinite(value),
                f"{name} must be a positive number, got {value!r}",
            )

    def with_changes(self, **changes: Any) -> DeploymentConfig:
        if "autoscaling_config" in changes and isinstance(changes["autoscaling_config"], dict):
            changes["autoscaling_config"] = AutoscalingConfig(**changes["autoscaling_config"])
        return dataclasses.replace(self, **changes)

    def restart_fields(self) -> dict[str, Any]:
        """The options whose change needs new replicas (the rest are applied in place)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _IN_PLACE_FIELDS
        }


@dataclass(frozen=True)
class HTTPOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout_s: float | None = None
    root_path: str = ""
    # serval's own: larger request bodies get 413 before they are read
    max_request_body_bytes: int = 100 * 1024 * 1024
    # serval's own: set False for a cluster without an HTTP proxy
    enabled: bool = True

    def __post_init__(self) -> None:
        _check(
            isinstance(self.port, int) and 0 < self.port < 65536,
            f"http_options.port must be an int in 1..65535, got {self.port!r}",
        )
        _check(
            self.request_timeout_s is None or self.request_timeout_s > 0,
            f"http_options.request_timeout_s must be > 0 or None, got {self.request_timeout_s!r}",
        )
        _check(self.max_request_body_bytes > 0, "http_options.max_request_body_bytes must be > 0")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HTTPOptions:
        return cls(**json.loads(text))


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
