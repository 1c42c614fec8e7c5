"""Deployments and applications: what ``@serve.deployment`` and ``.bind()`` produce."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar, overload

import cloudpickle

from serval._private.caller import control
from serval._private.wire.types import AppSpec, DeploymentSpec
from serval.config import (
    RENAMED_DEPLOYMENT_OPTIONS,
    AutoscalingConfig,
    AutoscalingPolicy,
    DeploymentConfig,
    RequestRouterConfig,
    migrate_renamed,
)
from serval.handle import RayServeHandle, RayServeSyncHandle

__all__ = ["Application", "Deployment", "deployment"]

T = TypeVar("T")
_UNSET: Any = object()
_CONFIG_FIELDS = {f.name for f in fields(DeploymentConfig)}
# Ray's actor options (resources: scheduling on a Ray cluster; the local backend runs every
# replica anyway). Which runtime_env fields a backend honours it says at deploy time.
_SUPPORTED_ACTOR_OPTIONS = {
    "num_cpus",
    "num_gpus",
    "memory",
    "object_store_memory",
    "resources",
    "accelerator_type",
    "runtime_env",
}
_SUPPORTED_RUNTIME_ENV = {"env_vars", "pip", "working_dir", "py_modules", "conda", "uv", "config"}
# Ray Serve options serval does not implement: rejected, never silently ignored.
_UNSUPPORTED_OPTIONS = {
    "request_router_config": "custom request routers are not supported",
    "max_constructor_retry_count": "a constructor that raises fails the deployment at once",
    "version": "deployment versions are derived from the code and options",
    "prev_version": "deployment versions are derived from the code and options",
}


class Deployment:
    """A class or function and its options; ``.bind(...)`` makes it an ``Application``."""

    def __init__(
        self,
        func_or_class: Callable[..., Any],
        name: str,
        config: DeploymentConfig,
        route_prefix: str | None = _UNSET,
    ) -> None:
        self.func_or_class = func_or_class
        self._name = name
        self.config = config
        self._route_prefix = route_prefix

    @property
    def name(self) -> str:
        return self._name

    @property
    def route_prefix(self) -> str | None:
        return None if self._route_prefix is _UNSET else self._route_prefix

    @property
    def num_replicas(self) -> int:
        return self.config.num_replicas

    @property
    def max_ongoing_requests(self) -> int:
        return self.config.max_ongoing_requests

    @property
    def user_config(self) -> Any:
        return self.config.user_config

    def options(
        self, *, name: str | None = None, route_prefix: Any = _UNSET, **changes: Any
    ) -> Deployment:
        """A copy with other options (the same keywords as ``@serve.deployment``)."""
        _validate_option_names(changes)
        config = self.config.with_changes(**_normalize(changes)) if changes else self.config
        return Deployment(
            self.func_or_class,
            name or self._name,
            config,
            self._route_prefix if route_prefix is _UNSET else route_prefix,
        )

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """This deployment with its constructor arguments; bound deployments among them
        arrive in the constructor as ``DeploymentHandle``s."""
        return Application(self, args, kwargs)

    def get_handle(self, sync: bool = True) -> RayServeSyncHandle | RayServeHandle:
        """A handle as in the ServeHandle guide: sync (``remote()`` → ``ObjectRef``) or asyncio
        (``await remote()`` → ``ObjectRef``). Inside a replica it targets the caller's app."""
        app = control.app_of_deployment(self._name)
        cls = RayServeSyncHandle if sync else RayServeHandle
        return cls(self._name, app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"deployment {self._name!r} cannot be called directly; use "
            f"{self._name}.bind(...) and serve.run(...), then call its handle"
        )

    def __repr__(self) -> str:
        return f"Deployment(name={self._name!r})"


class Application:
    """A bound deployment: the node of an application graph that ``serve.run`` deploys."""

    def __init__(
        self, deployment: Deployment, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.deployment = deployment
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"Application({self.deployment.name})"


@overload
def deployment(_func_or_class: type[T]) -> Deployment: ...
@overload
def deployment(_func_or_class: Callable[..., Any]) -> Deployment: ...
@overload
def deployment(
    _func_or_class: None = None, **options: Any
) -> Callable[[Callable[..., Any]], Deployment]: ...


def deployment(
    _func_or_class: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    route_prefix: Any = _UNSET,
    **options: Any,
) -> Any:
    """Declare a deployment: ``@serve.deployment`` or ``@serve.deployment(num_replicas=2, ...)``.

    Options: ``num_replicas``, ``max_ongoing_requests`` (default 5), ``max_queued_requests``
    (default -1, no limit), ``user_config``, ``health_check_period_s``,
    ``health_check_timeout_s``, ``graceful_shutdown_timeout_s``,
    ``graceful_shutdown_wait_loop_s``, ``ray_actor_options``, ``logging_config`` (a
    ``serval.schema.LoggingConfig`` or a dict of its fields); ``name`` and ``route_prefix``.
    """
    _validate_option_names(options)
    config = DeploymentConfig().with_changes(**_normalize(options))

    def decorate(target: Callable[..., Any]) -> Deployment:
        if not callable(target):
            raise TypeError("@serve.deployment decorates a class or a function")
        return Deployment(target, name or target.__name__, config, route_prefix)

    return decorate(_func_or_class) if _func_or_class is not None else decorate


# Ray Serve 2.4x's spelling of the request router's options, as deployment options of their own
_ROUTER_OPTIONS = (
    "request_router_class",
    "request_router_kwargs",
    "request_routing_stats_period_s",
    "request_routing_stats_timeout_s",
)


def _validate_option_names(options: dict[str, Any]) -> None:
    unknown = set(options) - _CONFIG_FIELDS - set(RENAMED_DEPLOYMENT_OPTIONS) - set(_ROUTER_OPTIONS)
    for name in sorted(unknown & set(_UNSUPPORTED_OPTIONS)):
        raise ValueError(
            f"deployment option {name!r} is not supported: {_UNSUPPORTED_OPTIONS[name]}"
        )
    if unknown:
        raise TypeError(f"unknown deployment option(s): {', '.join(sorted(unknown))}")


def _normalize(options: dict[str, Any]) -> dict[str, Any]:
    out = migrate_renamed(dict(options), RENAMED_DEPLOYMENT_OPTIONS)
    loose = {k: out.pop(k) for k in _ROUTER_OPTIONS if k in out}
    if loose:
        if out.get("request_router_config") is not None:
            raise ValueError(
                f"give {', '.join(sorted(loose))} inside request_router_config, not beside it"
            )
        out["request_router_config"] = RequestRouterConfig(**loose)
    if out.get("num_replicas") == "auto":
        # Ray Serve's defaults for num_replicas="auto".
        out["num_replicas"] = 1
        out["autoscaling_config"] = {
            "min_replicas": 1,
            "max_replicas": 100,
            "target_ongoing_requests": 2,
            **(out.get("autoscaling_config") or {}),
        }
    if "logging_config" in out:
        out["logging_config"] = _logging_dict(out["logging_config"])
    auto = out.get("autoscaling_config")
    if isinstance(auto, dict):
        out["autoscaling_config"] = AutoscalingConfig(**auto)
    elif auto is not None and not isinstance(auto, AutoscalingConfig):
        raise TypeError("autoscaling_config must be a dict or serve.AutoscalingConfig")
    actor = out.get("ray_actor_options")
    if actor is not None:
        if not isinstance(actor, dict):
            raise TypeError("ray_actor_options must be a dict")
        unknown = set(actor) - _SUPPORTED_ACTOR_OPTIONS
        if unknown:
            raise ValueError(f"unsupported ray_actor_options: {', '.join(sorted(unknown))}")
        env = actor.get("runtime_env") or {}
        unknown = set(env) - _SUPPORTED_RUNTIME_ENV
        if unknown:
            raise ValueError(
                f"unsupported runtime_env field(s): {', '.join(sorted(unknown))} "
                f"(serval knows {', '.join(sorted(_SUPPORTED_RUNTIME_ENV))})"
            )
        out["ray_actor_options"] = dict(actor)
    return out


# -- building an application for the controller --------------------------------------------------


def map_applications(value: Any, fn: Callable[[Application], Any]) -> Any:
    """``value`` with every ``Application`` in it (in nested lists, tuples and dicts, as
    constructor arguments may hold them) replaced by ``fn(node)``."""
    if isinstance(value, Application):
        return fn(value)
    if isinstance(value, list):
        return [map_applications(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(map_applications(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_applications(v, fn) for k, v in value.items()}
    return value


def graph_nodes(app: Application) -> list[tuple[str, Application]]:
    """Each node of a bound graph once, with its deployment's name in the app: a deployment
    bound twice gets ``_1``, ``_2``... suffixes; the same bound node used twice is one."""
    nodes: list[tuple[str, Application]] = []
    seen: set[int] = set()
    taken: set[str] = set()

    def visit(node: Application) -> Application:
        if id(node) not in seen:
            seen.add(id(node))
            name, n = node.deployment.name, 0
            while name in taken:
                n += 1
                name = f"{node.deployment.name}_{n}"
            taken.add(name)
            nodes.append((name, node))
            map_applications((node.args, node.kwargs), visit)
        return node

    visit(app)
    return nodes


def build(
    app: Application,
    name: str,
    route_prefix: Any,
    source_config: dict[str, Any] | None = None,
    logging_config: Any = None,
) -> AppSpec:
    """Name each deployment of the bound graph once; serialize its code and arguments, with
    bound deployments among them replaced by handles. ``logging_config`` (or a config file's
    application-level one) is that of the deployments that set none."""
    from serval.handle import DeploymentHandle

    if not isinstance(app, Application):
        raise TypeError(
            f"serve.run expects a bound deployment (Deployment.bind(...)), got {type(app).__name__}"
        )
    nodes = graph_nodes(app)
    names = {id(node): dep_name for dep_name, node in nodes}

    def to_handle(node: Application) -> DeploymentHandle:
        return DeploymentHandle(names[id(node)], name)

    if logging_config is None:
        logging_config = (source_config or {}).get("logging_config")
    app_logging = _logging_dict(logging_config)
    specs = [
        _spec(
            dep_name,
            node,
            _legacy_handles(
                node.deployment.func_or_class,
                map_applications((node.args, node.kwargs), to_handle),
            ),
            app_logging,
        )
        for dep_name, node in nodes
    ]
    ingress = nodes[0][0]
    if route_prefix is _UNSET:
        route_prefix = app.deployment._route_prefix
        if route_prefix is _UNSET:
            route_prefix = "/"
    if route_prefix is not None:
        if not isinstance(route_prefix, str) or not route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {route_prefix!r}")
        if len(route_prefix) > 1 and route_prefix.endswith("/"):
            route_prefix = route_prefix.rstrip("/")
    # A config file's application-level autoscaling policy (Ray Serve takes it from files only)
    app_policy = (source_config or {}).get("autoscaling_policy")
    return AppSpec(
        name,
        route_prefix,
        ingress,
        tuple(specs),
        tuple(sys.path),
        os.getcwd(),
        source_config,
        AutoscalingPolicy(**app_policy) if app_policy else None,
    )


def _logging_dict(value: Any) -> dict[str, Any] | None:
    """A ``logging_config`` checked, as a dict (pydantic imported only when there is one:
    every replica process imports this module)."""
    if value is None:
        return None
    from serval.logging_config import logging_config_dict

    return logging_config_dict(value)


def _legacy_handles(target: Any, init: tuple[Any, Any]) -> tuple[Any, Any]:
    """As in Ray 2.0-2.6: a handle given to a constructor parameter annotated
    ``RayServeDeploymentHandle`` is that legacy handle (``ref = await h.remote()``)."""
    from serval.handle import DeploymentHandle, RayServeDeploymentHandle

    args, kwargs = init
    if not inspect.isclass(target):
        return init
    try:
        signature = inspect.signature(target.__init__)
        bound = signature.bind_partial(None, *args, **kwargs)
    except (TypeError, ValueError):
        return init
    legacy = {
        name
        for name, param in signature.parameters.items()
        if _names_legacy_handle(param.annotation)
    }
    if not legacy:
        return init
    for name in legacy & set(bound.arguments):
        value = bound.arguments[name]
        if type(value) is DeploymentHandle:
            bound.arguments[name] = RayServeDeploymentHandle(value.deployment_name, value.app_name)
    return tuple(bound.args[1:]), dict(bound.kwargs)


def _names_legacy_handle(annotation: Any) -> bool:
    if isinstance(annotation, str):  # (from __future__ import annotations)
        return annotation.rsplit(".", 1)[-1] == "RayServeDeploymentHandle"
    return getattr(annotation, "__name__", None) == "RayServeDeploymentHandle"


def _spec(
    dep_name: str,
    node: Application,
    init: tuple[Any, Any],
    app_logging: dict[str, Any] | None = None,
) -> DeploymentSpec:
    target = node.deployment.func_or_class
    try:
        payload = cloudpickle.dumps((target, *init))
    except Exception as exc:
        raise TypeError(
            f"could not serialize deployment {dep_name!r} (its class or constructor "
            f"arguments): {type(exc).__name__}: {exc}"
        ) from exc
    config = node.deployment.config
    router = config.request_router_config
    if router is not None:  # its class, loadable wherever the deployment is called
        config = config.with_changes(request_router_config=router.portable())
    if config.logging_config is None and app_logging is not None:
        config = config.with_changes(logging_config=app_logging)
    return DeploymentSpec(
        dep_name, payload, config, spec_version(payload, config), not inspect.isclass(target)
    )


def spec_version(payload: bytes, config: DeploymentConfig) -> str:
    """What changes when a deployment needs new replicas: its code and arguments, and the
    options that replicas start with."""
    restart = json.dumps(config.restart_fields(), sort_keys=True, default=repr).encode()
    return hashlib.sha256(_stable(payload) + restart).hexdigest()[:16]


def _stable(payload: bytes) -> bytes:
    """``payload`` with what differs between two processes that pickle the same code taken
    out: cloudpickle names each class it pickles by value (a ``@serve.deployment`` class, whose
    module name is bound to the Deployment) with a random id drawn once per process. Without
    this, ``serval deploy`` of an unchanged file would restart every replica."""
    tracker: Any = getattr(cloudpickle.cloudpickle, "_DYNAMIC_CLASS_TRACKER_BY_CLASS", {})
    for cls, tracker_id in list(tracker.items()):
        token = tracker_id.encode()
        if token in payload:
            name = f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', '')}"
            payload = payload.replace(token, name.encode())
    return payload
