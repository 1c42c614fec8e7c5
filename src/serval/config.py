"""Typed configuration: a deployment's options, and the HTTP options of a cluster.

The field names, defaults and meaning are Ray Serve's; ``HTTPOptions`` adds serval's own
(its docstring says which).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import warnings
from dataclasses import InitVar, dataclass, field
from enum import StrEnum
from typing import Any

from serval._autoscaling_types import (
    AutoscalingContext,
    AutoscalingPolicy,
    DeploymentID,
    ReplicaID,
    TimeStampedValue,
    load_callable,
    serialize_callable,
    split_path,
)

__all__ = [
    "AutoscalingConfig",
    "AutoscalingContext",
    "AutoscalingPolicy",
    "BackpressureConfig",
    "DeploymentConfig",
    "DeploymentID",
    "DeploymentMode",
    "HTTPOptions",
    "ProxyLocation",
    "ReplicaID",
    "RequestRouterConfig",
    "TimeStampedValue",
    "gRPCOptions",
]

# Options a replica needs when it changes; anything else can be applied in place.
_IN_PLACE_FIELDS = frozenset(
    {
        "num_replicas",
        "user_config",
        "max_queued_requests",
        "autoscaling_config",
        "backpressure_config",
    }
)


class ProxyLocation(StrEnum):
    """Where HTTP proxies run (``serve.start(proxy_location=...)``, Ray Serve's enum)."""

    Disabled = "Disabled"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"


class DeploymentMode(StrEnum):
    """Ray Serve's older name of ``ProxyLocation`` (``NoServer`` is ``Disabled``)."""

    NoServer = "NoServer"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"


# Names Ray Serve renamed and still accepts, with a deprecation warning: old -> new.
RENAMED_DEPLOYMENT_OPTIONS = {"max_concurrent_queries": "max_ongoing_requests"}
RENAMED_AUTOSCALING_OPTIONS = {
    "target_num_ongoing_requests_per_replica": "target_ongoing_requests",
    "upscale_smoothing_factor": "upscaling_factor",
    "downscale_smoothing_factor": "downscaling_factor",
}


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{old} is deprecated (as in Ray Serve); use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def migrate_renamed(options: dict[str, Any], renamed: dict[str, str]) -> dict[str, Any]:
    """``options`` with the deprecated names of ``renamed`` moved to their new ones (warned
    about; a new name given too wins)."""
    out = dict(options)
    if not any(old in out for old in renamed):
        return out
    for old, new in renamed.items():
        if old in out:
            warn_renamed(old, new, stacklevel=4)
            value = out.pop(old)
            out.setdefault(new, value)
    return out


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
    # 1 -> 0 waits this long instead of downscale_delay_s (None: downscale_delay_s)
    downscale_to_zero_delay_s: float | None = None
    # A custom policy (AutoscalingPolicy, or a dict of its fields); the default is built in.
    policy: AutoscalingPolicy = field(default_factory=AutoscalingPolicy)
    # Ray Serve's deprecated names, still accepted (with a warning) for the fields above.
    target_num_ongoing_requests_per_replica: InitVar[float | None] = None
    smoothing_factor: InitVar[float | None] = None
    upscale_smoothing_factor: InitVar[float | None] = None
    downscale_smoothing_factor: InitVar[float | None] = None

    def __post_init__(
        self,
        target_num_ongoing_requests_per_replica: float | None,
        smoothing_factor: float | None,
        upscale_smoothing_factor: float | None,
        downscale_smoothing_factor: float | None,
    ) -> None:
        self._take_deprecated(
            target_num_ongoing_requests_per_replica,
            smoothing_factor,
            upscale_smoothing_factor,
            downscale_smoothing_factor,
        )
        policy = self.policy
        if policy is None or isinstance(policy, dict):
            object.__setattr__(self, "policy", AutoscalingPolicy(**(policy or {})))
        elif isinstance(policy, str) or callable(policy):  # the policy function alone
            object.__setattr__(self, "policy", AutoscalingPolicy(policy_function=policy))
        _check(
            isinstance(self.policy, AutoscalingPolicy),
            f"autoscaling_config.policy must be an AutoscalingPolicy or a dict, got {policy!r}",
        )
        _check(
            self.downscale_to_zero_delay_s is None or self.downscale_to_zero_delay_s >= 0,
            "autoscaling_config.downscale_to_zero_delay_s must be >= 0",
        )
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

    def _take_deprecated(
        self,
        target_per_replica: float | None,
        smoothing: float | None,
        upscale_smoothing: float | None,
        downscale_smoothing: float | None,
    ) -> None:
        moves = [
            (
                "target_num_ongoing_requests_per_replica",
                "target_ongoing_requests",
                target_per_replica,
            ),
            ("upscale_smoothing_factor", "upscaling_factor", upscale_smoothing),
            ("downscale_smoothing_factor", "downscaling_factor", downscale_smoothing),
            ("smoothing_factor", "upscaling_factor", smoothing),
            ("smoothing_factor", "downscaling_factor", smoothing),
        ]
        warned = set()
        for old, new, value in moves:
            if value is None:
                continue
            if old not in warned:
                warn_renamed(
                    old,
                    "upscaling_factor and downscaling_factor" if old == "smoothing_factor" else new,
                    stacklevel=5,
                )
                warned.add(old)
            if getattr(self, new) in (None, _AUTOSCALING_DEFAULTS.get(new)):
                object.__setattr__(self, new, value)


_AUTOSCALING_DEFAULTS = {"target_ongoing_requests": 2.0}


# Ray Serve's name for its built-in router: given, it means serval's built-in routing.
DEFAULT_REQUEST_ROUTER = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"


@dataclass(frozen=True)
class RequestRouterConfig:
    """How callers choose a deployment's replica (Ray Serve's ``serve.config.RequestRouterConfig``,
    the ``request_router_config`` deployment option).

    ``request_router_class``: a ``serve.request_router.RequestRouter`` subclass, or its import
    path (``"module:Class"``); given as a class it is serialized here with cloudpickle (by
    value when it lives in ``__main__``, else by reference) and loaded in every process that
    calls the deployment. The default is serval's built-in routing (power of two choices).
    ``request_router_kwargs`` go to the router's ``initialize_state``.
    ``request_routing_stats_period_s`` / ``request_routing_stats_timeout_s``: how often each
    replica's ``record_routing_stats()`` is asked for what the router sees as a replica's
    ``routing_stats``, and how long it may take.
    """

    request_router_class: str | type = DEFAULT_REQUEST_ROUTER
    request_router_kwargs: dict[str, Any] = field(default_factory=dict)
    request_routing_stats_period_s: float = 10.0
    request_routing_stats_timeout_s: float = 30.0
    _serialized_request_router_cls: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        target = self.request_router_class
        if isinstance(target, type):
            path, serialized = serialize_callable(target, "request_router_class")
            if not self._serialized_request_router_cls:
                object.__setattr__(self, "_serialized_request_router_cls", serialized)
            object.__setattr__(self, "request_router_class", path)
        elif not isinstance(target, str) or not split_path(target)[1]:
            raise ValueError(
                "request_router_class must be a RequestRouter subclass or an import path "
                f"'module:Class', got {target!r}"
            )
        _check(
            isinstance(self.request_router_kwargs, dict),
            f"request_router_kwargs must be a dict, got {self.request_router_kwargs!r}",
        )
        for name in ("request_routing_stats_period_s", "request_routing_stats_timeout_s"):
            value = getattr(self, name)
            _check(
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                f"{name} must be a number > 0, got {value!r}",
            )

    def is_default(self) -> bool:
        return self.request_router_class == DEFAULT_REQUEST_ROUTER

    def portable(self) -> RequestRouterConfig:
        """This config with its class serialized by value (loaded by its path here if need
        be): every process that calls the deployment loads it, the HTTP proxy included,
        which has not the deployer's code path. Runs user code (the import)."""
        if self.is_default():
            return self
        cls = self.get_request_router_class()
        module = sys.modules.get(cls.__module__)
        import cloudpickle

        by_value = module is not None and not cls.__module__.startswith(("serval.", "ray."))
        if by_value:
            cloudpickle.register_pickle_by_value(module)
        try:
            serialized = cloudpickle.dumps(cls)
        finally:
            if by_value:
                cloudpickle.unregister_pickle_by_value(module)
        return dataclasses.replace(self, _serialized_request_router_cls=serialized)

    def get_request_router_class(self) -> type:
        """The router class itself: unpickled, or imported by its path (runs user code)."""
        assert isinstance(self.request_router_class, str)
        return load_callable(self.request_router_class, self._serialized_request_router_cls)  # type: ignore[return-value]


@dataclass(frozen=True)
class BackpressureConfig:
    """The HTTP answer to a request shed because its deployment's ``max_queued_requests``
    is reached (Ray Serve's ``serve.config.BackpressureConfig``, a deployment option).

    ``status_code``: 503 (the default) or 429. ``retry_after_s``: when set, the answer has a
    ``Retry-After`` header of that many seconds, rounded up to a whole number. A request to a
    deployment that cannot serve at all (deleted, failed) is still a 503; handle callers still
    get a ``BackPressureError``.
    """

    status_code: int = 503
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        _check(
            type(self.status_code) is int and self.status_code in (503, 429),
            f"backpressure_config.status_code must be 503 or 429, got {self.status_code!r}",
        )
        value = self.retry_after_s
        _check(
            value is None
            or (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value >= 0
            ),
            f"backpressure_config.retry_after_s must be a number >= 0 or None, got {value!r}",
        )

    def retry_after_header(self) -> bytes | None:
        """The ``Retry-After`` value, whole seconds rounded up (None: no header)."""
        if self.retry_after_s is None:
            return None
        return b"%d" % math.ceil(self.retry_after_s)


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
    # Placement on a Ray cluster (the Ray backend; the local backend refuses them at deploy).
    placement_group_bundles: list[dict[str, float]] | None = None
    placement_group_strategy: str = "PACK"
    max_replicas_per_node: int | None = None
    backpressure_config: BackpressureConfig = field(default_factory=BackpressureConfig)
    request_router_config: RequestRouterConfig | None = None
    # LoggingConfig's fields (a plain dict: the controller holds no user classes); None: the
    # application's, else LoggingConfig's defaults. A change starts new replicas.
    logging_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_placement(self)
        backpressure = self.backpressure_config
        if backpressure is None or isinstance(backpressure, dict):
            # As in Ray Serve: a dict of its fields (unknown ones refused), None the default.
            backpressure = BackpressureConfig(**(backpressure or {}))
            object.__setattr__(self, "backpressure_config", backpressure)
        _check(
            isinstance(backpressure, BackpressureConfig),
            f"backpressure_config must be a BackpressureConfig or a dict, got {backpressure!r}",
        )
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
        # Ray Serve's rule, and the controller's need: it keeps the config but none of the
        # user's code, so an object of a user's class there could not even be read.
        try:
            json.dumps(self.user_config)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"user_config must be JSON-serializable: {exc}") from None

    def with_changes(self, **changes: Any) -> DeploymentConfig:
        if "autoscaling_config" in changes and isinstance(changes["autoscaling_config"], dict):
            changes["autoscaling_config"] = AutoscalingConfig(**changes["autoscaling_config"])
        router = changes.get("request_router_config")
        if isinstance(router, dict):
            changes["request_router_config"] = RequestRouterConfig(**router)
        elif router is not None and not isinstance(router, RequestRouterConfig):
            raise TypeError("request_router_config must be a dict or serve.RequestRouterConfig")
        return dataclasses.replace(self, **changes)

    def restart_fields(self) -> dict[str, Any]:
        """The options whose change needs new replicas (the rest are applied in place)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in _IN_PLACE_FIELDS
        }


_PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _check_placement(config: DeploymentConfig) -> None:
    bundles = config.placement_group_bundles
    if bundles is not None:
        _check(
            isinstance(bundles, list)
            and bool(bundles)
            and all(
                isinstance(b, dict)
                and all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in b.items())
                for b in bundles
            ),
            "placement_group_bundles must be a non-empty list of dicts of resource amounts, "
            f"got {bundles!r}",
        )
    _check(
        config.placement_group_strategy in _PLACEMENT_STRATEGIES,
        f"placement_group_strategy must be one of {', '.join(_PLACEMENT_STRATEGIES)}, "
        f"got {config.placement_group_strategy!r}",
    )
    per_node = config.max_replicas_per_node
    _check(
        per_node is None or (type(per_node) is int and per_node >= 1),
        f"max_replicas_per_node must be an int >= 1, got {per_node!r}",
    )


@dataclass(frozen=True)
class gRPCOptions:
    """Options of the gRPC proxy (Ray Serve's ``gRPCOptions``).

    - ``port``: where it listens (Ray Serve's default, 9000), on ``HTTPOptions.host`` (so
      127.0.0.1 unless told otherwise). The same proxy process serves HTTP and gRPC.
    - ``grpc_servicer_functions``: import paths of the ``add_<Service>Servicer_to_server``
      functions that grpcio-tools generates; their services' methods are routed to the
      applications. Empty (the default): no gRPC server is started.
    - ``request_timeout_s``: end to end; DEADLINE_EXCEEDED when it passes.
    - ``enable_reflection``: accepted (Ray Serve's); serval serves no reflection service yet.

    serval's own: ``sys_path``, where the proxy also looks for the servicer functions (after
    its own ``sys.path``); ``serve.start`` sets it to the driver's working directory and
    ``sys.path``, as replicas get the driver's code path.
    """

    port: int = 9000
    grpc_servicer_functions: tuple[str, ...] = ()
    request_timeout_s: float | None = None
    enable_reflection: bool = True
    sys_path: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(
            isinstance(self.port, int)
            and not isinstance(self.port, bool)
            and 0 < self.port < 65536,
            f"grpc_options.port must be an int in 1..65535, got {self.port!r}",
        )
        functions = self.grpc_servicer_functions
        _check(
            isinstance(functions, (list, tuple)) and all(isinstance(f, str) for f in functions),
            "grpc_options.grpc_servicer_functions must be a list of import paths, "
            f"got {functions!r}",
        )
        _check(
            self.request_timeout_s is None or _positive(self.request_timeout_s),
            f"grpc_options.request_timeout_s must be > 0 or None, got {self.request_timeout_s!r}",
        )
        # (a list, from JSON or a user, becomes a tuple: the options stay hashable)
        object.__setattr__(self, "grpc_servicer_functions", tuple(functions))
        if self.request_timeout_s is not None:  # a float, as Ray's model makes it
            object.__setattr__(self, "request_timeout_s", float(self.request_timeout_s))
        object.__setattr__(self, "sys_path", tuple(self.sys_path))

    @property
    def enabled(self) -> bool:
        """Whether a gRPC server runs (Ray Serve's rule: it has servicer functions)."""
        return bool(self.grpc_servicer_functions)


@dataclass(frozen=True)
class HTTPOptions:
    """Options of the HTTP proxy.

    Ray Serve's fields: ``host``, ``port`` (where the proxy listens), ``root_path``,
    ``request_timeout_s`` (end to end: 408 when it passes) and ``keep_alive_timeout_s`` (how
    long an idle connection waits for its next request; Ray Serve's default, 90 s).

    serval's own extensions (Ray Serve has none of these):

    - ``enabled``: False for a cluster without an HTTP proxy.
    - ``location``: where proxies run (Ray Serve's ``proxy_location``; ``serve.start`` and
      config files set it from there): ``"EveryNode"`` (the default) or ``"HeadOnly"``; on the
      local backend both mean this machine. ``"Disabled"`` is ``enabled=False``.
    - ``max_request_body_bytes``: a larger body is answered 413 (before it is read when its
      ``Content-Length`` says so, else as soon as it passes the limit) and the connection closed.
    - ``request_header_timeout_s``: a connection must send a whole request head (request line
      and headers) within this many seconds of opening, or of the response before when the next
      head had already begun; else it is closed: with a 408 when part of a head came, without
      a word when nothing did. (Between requests, ``keep_alive_timeout_s`` is the wait for the
      first byte of the next head; this timeout counts from that byte.)
    - ``request_body_timeout_s``: while a request's body is pending, the longest wait for its
      next bytes (time the proxy itself holds the client back does not count): 408 and close.
    - ``max_request_header_bytes``: a request line and headers larger than this are answered
      431 and the connection closed; reading stops there, whatever the client goes on sending.
    - ``max_connections``: open connections at most. When a new one would pass it, the new one
      is still served, and the connections idle longest (between requests, or not yet through
      their first request head) are closed to make room; when none is idle, the new one is
      answered 503. None: as many as the proxy's file descriptor limit allows, less room for
      its own (the proxy raises its soft limit to the hard one at start).
    - ``request_body_window_bytes``: a request body that is not whole when its request's turn
      comes and grows past this size leaves for the replica as it arrives, with at most this
      many bytes on their way that the replica's app has not yet taken (reading the client
      pauses beyond it): an upload holds about this much memory in the proxy and in the
      replica, beyond what the user's code keeps. A smaller body goes in one message.
    - ``system_route_hosts``: the ``Host`` names that ``/-/routes`` and ``/-/metrics`` answer
      to besides IP literals and ``localhost`` (a page in a browser can reach the proxy under
      a name of its own by DNS rebinding); ``"*"`` allows any. ``/-/healthz`` and the
      applications' routes answer any ``Host``.
    - ``grpc_options``: the gRPC proxy's options (:class:`gRPCOptions`), served by the same
      proxy processes; ``serve.start(grpc_options=...)`` and config files set it.

    HTTPS (Ray Serve's fields): ``ssl_keyfile`` and ``ssl_certfile`` (PEM files; both or
    neither) make the proxy serve HTTPS only, on the same port; ``ssl_keyfile_password``
    decrypts an encrypted key; with ``ssl_ca_certs`` (a PEM file of CA certificates) every
    client must present a certificate one of them signed, else its handshake fails (Ray Serve
    hands the file to uvicorn without asking clients for certificates, so it checks none; the
    docs' "for client certificate verification" is what serval does). ``serve.start`` loads
    the files and fails with the reason when one is missing, unreadable, not PEM, the key's
    password is wrong or the key is not the certificate's; relative paths are taken from the
    directory it runs in. On Ray the proxies read the files on their own nodes: each node
    (and the driver's machine, where they are checked) needs them at the same absolute paths;
    a proxy that cannot load them fails ``serve.start`` with its reason. The TLS handshake
    counts against ``request_header_timeout_s`` (the head must be whole that long after the
    connection opened) and a connection in its handshake against ``max_connections`` (the
    first to be closed for room). The password is kept out of ``repr``, logs and command
    lines.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    request_timeout_s: float | None = None
    root_path: str = ""
    max_request_body_bytes: int = 100 * 1024 * 1024
    enabled: bool = True
    keep_alive_timeout_s: float = 90.0
    request_header_timeout_s: float = 10.0
    request_body_timeout_s: float = 30.0
    max_request_header_bytes: int = 64 * 1024
    max_connections: int | None = None
    request_body_window_bytes: int = 1024 * 1024
    system_route_hosts: tuple[str, ...] = ()
    location: str = "EveryNode"
    grpc_options: gRPCOptions | None = None
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile_password: str | None = field(default=None, repr=False)
    ssl_ca_certs: str | None = None

    def __post_init__(self) -> None:
        self._check_ssl()
        if isinstance(self.grpc_options, dict):  # (from JSON)
            object.__setattr__(self, "grpc_options", gRPCOptions(**self.grpc_options))
        _check(
            self.grpc_options is None or isinstance(self.grpc_options, gRPCOptions),
            f"http_options.grpc_options must be gRPCOptions, got {self.grpc_options!r}",
        )
        _check(
            self.location in ("EveryNode", "HeadOnly"),
            f"http_options.location must be 'EveryNode' or 'HeadOnly' (no proxy: "
            f"proxy_location='Disabled'), got {self.location!r}",
        )
        _check(
            isinstance(self.port, int) and 0 < self.port < 65536,
            f"http_options.port must be an int in 1..65535, got {self.port!r}",
        )
        _check(
            self.request_timeout_s is None or _positive(self.request_timeout_s),
            f"http_options.request_timeout_s must be > 0 or None, got {self.request_timeout_s!r}",
        )
        for name in ("keep_alive_timeout_s", "request_header_timeout_s", "request_body_timeout_s"):
            value = getattr(self, name)
            _check(_positive(value), f"http_options.{name} must be > 0, got {value!r}")
        for name in (
            "max_request_body_bytes",
            "max_request_header_bytes",
            "request_body_window_bytes",
        ):
            value = getattr(self, name)
            _check(_positive_int(value), f"http_options.{name} must be an int > 0, got {value!r}")
        _check(
            self.max_connections is None or _positive_int(self.max_connections),
            f"http_options.max_connections must be an int > 0 or None, "
            f"got {self.max_connections!r}",
        )
        hosts = self.system_route_hosts
        _check(
            isinstance(hosts, (list, tuple)) and all(isinstance(h, str) and h for h in hosts),
            f"http_options.system_route_hosts must be a list of host names, got {hosts!r}",
        )
        # Host names compare case-insensitively; a list (from JSON or a user) becomes a tuple.
        object.__setattr__(self, "system_route_hosts", tuple(h.lower() for h in hosts))

    def _check_ssl(self) -> None:
        for name in _SSL_FIELDS:
            value = getattr(self, name)
            if value == "":  # (Ray Serve treats an empty one as not set)
                object.__setattr__(self, name, None)
            elif value is not None and not isinstance(value, str):
                # (the password's value is not shown: it may be the password)
                shown = "a " + type(value).__name__ if name == "ssl_keyfile_password" else value
                raise ValueError(f"http_options.{name} must be a string or None, got {shown!r}")
        key, cert = self.ssl_keyfile, self.ssl_certfile
        _check(
            (key is None) == (cert is None),
            "http_options.ssl_keyfile and http_options.ssl_certfile go together (HTTPS needs "
            f"both); {'ssl_keyfile' if key is None else 'ssl_certfile'} is not set",
        )
        for name in ("ssl_keyfile_password", "ssl_ca_certs"):
            _check(
                cert is not None or getattr(self, name) is None,
                f"http_options.{name} needs ssl_certfile and ssl_keyfile (HTTPS)",
            )

    @property
    def tls(self) -> bool:
        """Whether the proxy serves HTTPS."""
        return self.ssl_certfile is not None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> HTTPOptions:
        return cls(**json.loads(text))


_SSL_FIELDS = ("ssl_keyfile", "ssl_certfile", "ssl_keyfile_password", "ssl_ca_certs")


def _positive(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
        and math.isfinite(value)
    )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
