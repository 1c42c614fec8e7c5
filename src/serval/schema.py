"""Config files in Ray Serve's schema: validation, and turning an entry into an Application.

A file has ``proxy_location``, ``http_options``, ``grpc_options`` and ``applications``; each
application has a ``name``, ``route_prefix``, ``import_path``, ``args``, ``runtime_env`` (Ray's
fields; all but ``env_vars`` need the Ray backend) and ``deployments`` whose options override
those set in code.
Every model forbids unknown fields, so a misspelt option is an error, never silently ignored.
A bad file raises :class:`ConfigError`, which names the file, the field
(``applications[0].deployments[1].num_replicas``) and the reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import traceback
import types
import typing
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic import model_validator as _model_validator
from pydantic_core import PydanticCustomError

from serval._autoscaling_types import DEFAULT_AUTOSCALING_POLICY
from serval.config import (
    RENAMED_AUTOSCALING_OPTIONS,
    AutoscalingConfig,
    AutoscalingPolicy,
    BackpressureConfig,
    DeploymentConfig,
    HTTPOptions,
    gRPCOptions,
)
from serval.deployment import (
    _UNSUPPORTED_OPTIONS,
    Application,
    Deployment,
    graph_nodes,
    map_applications,
)
from serval.exceptions import ServalError
from serval.logging_config import EncodingType, LoggingConfig

# Ray Serve's schema module has the status types too (``ray.serve.schema.ServeStatus``, ...).
from serval.status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    ServeStatus,
)

__all__ = [
    "ApplicationSchema",
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "ConfigError",
    "DeploymentSchema",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "EncodingType",
    "HTTPOptionsSchema",
    "LoggingConfig",
    "ServeApplicationSchema",
    "ServeDeploySchema",
    "ServeStatus",
    "application_config",
    "build_application",
    "describe_errors",
    "gRPCOptionsSchema",
    "import_attr",
    "load_config",
    "parse_config",
    "source_config",
]

_STRICT = ConfigDict(extra="forbid", strict=True)


class ConfigError(ServalError):
    """A config file (or an entry of it) that cannot be deployed: file, field and reason."""

    def __init__(self, file: str, problems: list[tuple[str, str]]) -> None:
        self.file = file
        self.problems = problems
        parts = [f"{field}: {reason}" if field else reason for field, reason in problems]
        super().__init__(f"{file}: " + "; ".join(parts))


# -- the models ----------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = _STRICT


class HTTPOptionsSchema(_Model):
    """:class:`serval.config.HTTPOptions` in a file (its docstring says what each field does)."""

    host: str = HTTPOptions.host
    port: int = Field(default=HTTPOptions.port, ge=1, le=65535)
    request_timeout_s: float | None = Field(default=None, gt=0)
    root_path: str = ""
    keep_alive_timeout_s: float = Field(default=HTTPOptions.keep_alive_timeout_s, gt=0)
    # serval's own
    max_request_body_bytes: int = Field(default=HTTPOptions.max_request_body_bytes, gt=0)
    request_header_timeout_s: float = Field(default=HTTPOptions.request_header_timeout_s, gt=0)
    request_body_timeout_s: float = Field(default=HTTPOptions.request_body_timeout_s, gt=0)
    max_request_header_bytes: int = Field(default=HTTPOptions.max_request_header_bytes, gt=0)
    max_connections: int | None = Field(default=None, gt=0)
    request_body_window_bytes: int = Field(default=HTTPOptions.request_body_window_bytes, gt=0)
    system_route_hosts: list[str] = Field(default_factory=list)
    # HTTPS (Ray Serve's fields; HTTPOptions says what they do)
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = None

    @field_validator("ssl_keyfile_password", mode="before")
    @classmethod
    def _password_is_text(cls, value: Any) -> Any:
        # pydantic's own message would show the value: the password (a YAML number, say).
        if value is not None and not isinstance(value, str):
            raise PydanticCustomError(
                "serval_field", "{reason}", {"reason": "must be a string (quote it in YAML)"}
            )
        return value

    @_model_validator(mode="after")
    def _ssl_pairs(self) -> HTTPOptionsSchema:
        key, cert = self.ssl_keyfile or None, self.ssl_certfile or None  # ("": not set)
        if (key is None) != (cert is None):
            missing = "ssl_keyfile" if key is None else "ssl_certfile"
            raise _at(
                (missing,),
                "ssl_keyfile and ssl_certfile go together (HTTPS needs both); this one is not set",
            )
        for name in ("ssl_keyfile_password", "ssl_ca_certs"):
            if cert is None and getattr(self, name):
                raise _at((name,), "needs ssl_certfile and ssl_keyfile (HTTPS)")
        return self

    def __repr_args__(self) -> Any:  # (the password never shows)
        for name, value in super().__repr_args__():
            yield name, ("**" if name == "ssl_keyfile_password" and value else value)

    def options(self, **overrides: Any) -> HTTPOptions:
        """These options as :class:`HTTPOptions`, with ``overrides`` winning."""
        fields = self.model_dump()
        fields["system_route_hosts"] = tuple(fields["system_route_hosts"])
        fields.update(overrides)
        return HTTPOptions(**fields)


class RuntimeEnvSchema(_Model):
    """Ray's runtime_env fields; all but ``env_vars`` need the Ray backend (the local backend
    refuses them when the app is deployed)."""

    env_vars: dict[str, str] = Field(default_factory=dict)
    working_dir: str | None = None
    py_modules: list[str] | None = None
    pip: list[str] | str | dict[str, Any] | None = None
    uv: list[str] | str | dict[str, Any] | None = None
    conda: str | dict[str, Any] | None = None
    config: dict[str, Any] | None = None

    def fields_set(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True, exclude_none=True)


class RayActorOptionsSchema(_Model):
    num_cpus: float | None = Field(default=None, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    memory: float | None = Field(default=None, ge=0)
    object_store_memory: float | None = Field(default=None, ge=0)
    resources: dict[str, float] | None = None
    accelerator_type: str | None = None
    runtime_env: RuntimeEnvSchema | None = None


class AutoscalingPolicySchema(_Model):
    """:class:`serval.config.AutoscalingPolicy` in a file: the policy by its import path."""

    policy_function: str = DEFAULT_AUTOSCALING_POLICY
    policy_kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("policy_function")
    @classmethod
    def _path(cls, value: str) -> str:
        AutoscalingPolicy(policy_function=value)  # 'module:name' (imported where it runs)
        return value


def _autoscaling_model() -> type[BaseModel]:
    """The fields of :class:`serval.config.AutoscalingConfig`, unknown ones rejected."""
    hints = typing.get_type_hints(AutoscalingConfig)
    fields: dict[str, Any] = {
        f.name: (hints[f.name], f.default) for f in dataclasses.fields(AutoscalingConfig)
    }
    fields["policy"] = (AutoscalingPolicySchema | None, None)
    for old in (*RENAMED_AUTOSCALING_OPTIONS, "smoothing_factor"):  # deprecated, still taken
        fields[old] = (float | None, None)
    model: type[BaseModel] = create_model("AutoscalingConfigSchema", __config__=_STRICT, **fields)
    return model


if TYPE_CHECKING:
    AutoscalingConfigSchema = BaseModel
else:
    AutoscalingConfigSchema = _autoscaling_model()


class BackpressureConfigSchema(_Model):
    """:class:`serval.config.BackpressureConfig` in a file."""

    status_code: Literal[503, 429] = 503
    retry_after_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class DeploymentSchema(_Model):
    """Options of one deployment; only the fields the file sets override the code's."""

    name: str = Field(min_length=1)
    num_replicas: int | Literal["auto"] | None = None
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    max_concurrent_queries: int | None = Field(default=None, ge=1)  # deprecated name of it
    max_queued_requests: int | None = Field(default=None, ge=-1)
    user_config: Any = None
    autoscaling_config: AutoscalingConfigSchema | None = None
    health_check_period_s: float | None = Field(default=None, gt=0)
    health_check_timeout_s: float | None = Field(default=None, gt=0)
    graceful_shutdown_timeout_s: float | None = Field(default=None, gt=0)
    graceful_shutdown_wait_loop_s: float | None = Field(default=None, gt=0)
    ray_actor_options: RayActorOptionsSchema | None = None
    placement_group_bundles: list[dict[str, float]] | None = Field(default=None, min_length=1)
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = (
        None
    )
    max_replicas_per_node: int | None = Field(default=None, ge=1)
    backpressure_config: BackpressureConfigSchema | None = None
    logging_config: LoggingConfig | None = None

    @field_validator("num_replicas", mode="wrap")
    @classmethod
    def _num_replicas(cls, value: Any, handler: Callable[[Any], Any]) -> Any:
        # One clear message instead of one per member of the union.
        if value is None or value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"must be an int >= 0 or 'auto' (got {_short(value)})")
        return value

    @field_validator("autoscaling_config")
    @classmethod
    def _autoscaling(cls, value: BaseModel | None) -> BaseModel | None:
        if value is not None:
            with warnings.catch_warnings():  # (a deprecated name is warned about once, later)
                warnings.simplefilter("ignore", DeprecationWarning)
                AutoscalingConfig(**value.model_dump())  # cross-field checks (min <= max, ...)
        return value

    def overrides(self) -> dict[str, Any]:
        """The options this entry sets, as ``Deployment.options`` keywords."""
        return self.model_dump(exclude_unset=True, exclude={"name"})


class ApplicationSchema(_Model):
    name: str = Field(default="default", min_length=1)
    route_prefix: str | None = "/"
    import_path: str
    args: dict[str, Any] = Field(default_factory=dict)
    runtime_env: RuntimeEnvSchema = Field(default_factory=RuntimeEnvSchema)
    deployments: list[DeploymentSchema] = Field(default_factory=list)
    # Ray Serve's application-level autoscaling policy (its deployments with autoscaling)
    autoscaling_policy: AutoscalingPolicySchema | None = None
    # the logging of its deployments that set none of their own
    logging_config: LoggingConfig | None = None

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith("/"):
            raise ValueError(f"must start with '/' (got {value!r})")
        if value != "/" and value.endswith("/"):
            raise ValueError(f"must not end with '/' unless it is '/' (got {value!r})")
        if "{" in value or "}" in value:
            raise ValueError(f"must not contain '{{' or '}}' (got {value!r})")
        return value

    @field_validator("import_path")
    @classmethod
    def _import_path(cls, value: str) -> str:
        _split_import_path(value)
        return value

    @_model_validator(mode="after")
    def _unique_deployments(self) -> ApplicationSchema:
        seen: dict[str, int] = {}
        for i, dep in enumerate(self.deployments):
            if dep.name in seen:
                raise _at(
                    ("deployments", i, "name"),
                    f"duplicate deployment {dep.name!r} (also deployments[{seen[dep.name]}])",
                )
            seen[dep.name] = i
        return self


ServeApplicationSchema = ApplicationSchema  # Ray Serve's name for an application's entry


class gRPCOptionsSchema(_Model):
    """:class:`serval.config.gRPCOptions` in a file: with ``grpc_servicer_functions``, the
    proxies serve gRPC on ``port`` too (see ``serve.start``)."""

    port: int = Field(default=gRPCOptions.port, ge=1, le=65535)
    grpc_servicer_functions: list[str] = Field(default_factory=list)
    request_timeout_s: float | None = Field(default=None, gt=0)
    enable_reflection: bool = gRPCOptions.enable_reflection

    def options(self) -> gRPCOptions:
        return gRPCOptions(**self.model_dump())


GRPCOptionsSchema = gRPCOptionsSchema  # (the name this model had before serval served gRPC)


def _at(where: tuple[str | int, ...], reason: str) -> PydanticCustomError:
    """An error a model validator raises about one of the model's fields (``where``)."""
    return PydanticCustomError("serval_field", "{reason}", {"where": where, "reason": reason})


class ServeDeploySchema(_Model):
    proxy_location: Literal["Disabled", "HeadOnly", "EveryNode"] = "EveryNode"
    http_options: HTTPOptionsSchema = Field(default_factory=lambda: HTTPOptionsSchema())
    grpc_options: gRPCOptionsSchema | None = None
    # the controller's and the proxies' (serve.start's), for a cluster the file starts
    logging_config: LoggingConfig | None = None
    applications: list[ApplicationSchema] = Field(min_length=1)

    @_model_validator(mode="after")
    def _unique_apps(self) -> ServeDeploySchema:
        names: dict[str, int] = {}
        prefixes: dict[str, int] = {}
        for i, app in enumerate(self.applications):
            if app.name in names:
                raise _at(
                    ("applications", i, "name"),
                    f"duplicate application name {app.name!r} "
                    f"(also applications[{names[app.name]}])",
                )
            names[app.name] = i
            if app.route_prefix is not None:
                if app.route_prefix in prefixes:
                    raise _at(
                        ("applications", i, "route_prefix"),
                        f"route prefix {app.route_prefix!r} is already used by "
                        f"applications[{prefixes[app.route_prefix]}]",
                    )
                prefixes[app.route_prefix] = i
        return self

    def http(self, host: str | None = None, port: int | None = None) -> HTTPOptions:
        """The file's HTTP options, with ``host``/``port`` from the command line winning."""
        opts = self.http_options
        return opts.options(
            host=host if host is not None else opts.host,
            port=port if port is not None else opts.port,
            enabled=self.proxy_location != "Disabled",
            location="HeadOnly" if self.proxy_location == "HeadOnly" else "EveryNode",
            grpc_options=self.grpc_options.options() if self.grpc_options is not None else None,
        )


# -- loading and error messages ------------------------------------------------------------------


def load_config(path: str) -> ServeDeploySchema:
    """Read and validate a config file; :class:`ConfigError` says what is wrong where."""

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(path, [("", exc.strerror or str(exc))]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(path, [(where, f"invalid YAML: {problem}")]) from None
    return parse_config(data, path)


def parse_config(data: Any, file: str = "<config>") -> ServeDeploySchema:
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(file, [("", f"expected a mapping with 'applications', got {kind}")])
    try:
        return ServeDeploySchema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(file, describe_errors(exc)) from None


def describe_errors(
    exc: ValidationError, prefix: tuple[str | int, ...] = ()
) -> list[tuple[str, str]]:
    """(field path, reason) for each error of a pydantic validation."""
    out = []
    for err in exc.errors(include_url=False):
        loc = prefix + tuple(err["loc"]) + tuple(err.get("ctx", {}).get("where", ()))
        out.append((field_path(loc), _reason(err, loc)))
    return out


def field_path(loc: tuple[str | int, ...]) -> str:
    """``("applications", 0, "name")`` -> ``applications[0].name``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _reason(err: Any, loc: tuple[str | int, ...]) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return _unknown_field(loc)
    if kind == "missing":
        return "required field is missing"
    msg: str = err["msg"]
    if kind == "serval_field":
        return msg
    if kind in ("value_error", "assertion_error"):
        prefixes = ("Value error, ", "Assertion failed, ")
        return msg.split(", ", 1)[1] if msg.startswith(prefixes) else msg
    return f"{msg} (got {_short(err.get('input'))})"


def _unknown_field(loc: tuple[str | int, ...]) -> str:
    name = str(loc[-1])
    parent = _model_at(loc[:-1])
    if parent is RuntimeEnvSchema:
        return (
            f"runtime_env field {name!r} is not supported: serval knows "
            f"{', '.join(RuntimeEnvSchema.model_fields)}"
        )
    if parent is DeploymentSchema and name in _UNSUPPORTED_OPTIONS:
        return f"deployment option {name!r} is not supported: {_UNSUPPORTED_OPTIONS[name]}"
    reason = "unknown field"
    if parent is not None:
        close = difflib.get_close_matches(name, list(parent.model_fields), n=1)
        if close:
            reason += f"; did you mean {close[0]!r}?"
        else:
            reason += f" (expected one of: {', '.join(parent.model_fields)})"
    return reason


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    tp: Any = ServeDeploySchema
    for part in loc:
        if isinstance(part, int):
            args = get_args(tp)
            tp = args[0] if get_origin(tp) is list and args else None
        elif isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        else:
            return None
        if get_origin(tp) in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            tp = members[0] if len(members) == 1 else None
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- import paths ----------------------------------------------------------------------------------


def _split_import_path(path: str) -> tuple[str, str]:
    """``pkg.mod:attr`` or ``pkg.mod.attr`` -> (module, attribute path)."""
    if path.count(":") > 1:
        raise ValueError(f"must be 'module:attribute' or 'module.attribute' (got {path!r})")
    if ":" in path:
        module, attr = path.split(":")
    else:
        module, _, attr = path.rpartition(".")
    if (
        not module
        or not attr
        or not all(p.isidentifier() for p in (*module.split("."), *attr.split(".")))
    ):
        raise ValueError(f"must be 'module:attribute' or 'module.attribute' (got {path!r})")
    return module, attr


def import_attr(path: str) -> Any:
    """Import ``module:attr``; raise ``ImportError`` with a one-line reason when that fails."""
    try:
        module_name, attr = _split_import_path(path)
    except ValueError as exc:
        raise ImportError(str(exc)) from None
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise ImportError(
                f"no module named {exc.name!r} (looked in the current directory and sys.path)"
            ) from None
        raise ImportError(f"importing {module_name!r} failed: {_describe(exc)}") from None
    except Exception as exc:
        raise ImportError(f"importing {module_name!r} failed: {_describe(exc)}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def _describe(exc: BaseException) -> str:
    """``ValueError: bad (at mymodule.py:12)``: the exception and the user's line that raised."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{text} (at {exc.filename}:{exc.lineno})"
    if frames:
        text += f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return text


# -- from a config entry to an Application -------------------------------------------------------


def resolve_application(
    target: Any, args: dict[str, Any], import_path: str
) -> tuple[Application | None, str]:
    """An Application from what an import path names: an Application, or an app builder
    called with ``args`` (a dict, or a pydantic model if its parameter is annotated so).
    Returns (app, "") or (None, reason)."""
    if isinstance(target, Application):
        if args:
            return None, f"args were given but {import_path!r} is an Application, not a builder"
        return target, ""
    if isinstance(target, Deployment):
        return None, f"{import_path!r} is a Deployment; point at {target.name}.bind(...)"
    if not callable(target):
        return None, (
            f"{import_path!r} is of type {type(target).__name__}, not an Application "
            "(Deployment.bind(...)) or an app builder function"
        )
    arg: Any = args
    model = _builder_model(target)
    if model is not None:
        arg = model.model_validate(args)  # ValidationError: the caller reports the fields
    try:
        app = target(arg)
    except Exception as exc:
        return None, f"the app builder {import_path!r} raised {_describe(exc)}"
    if not isinstance(app, Application):
        return None, (
            f"the app builder {import_path!r} returned type {type(app).__name__}, "
            "not an Application (Deployment.bind(...))"
        )
    return app, ""


def _builder_model(builder: Callable[..., Any]) -> type[BaseModel] | None:
    try:
        params = list(inspect.signature(builder).parameters.values())
        hints = typing.get_type_hints(builder)
    except (TypeError, ValueError, NameError):
        return None
    if not params:
        return None
    hint = hints.get(params[0].name)
    return hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


def walk(app: Application) -> list[tuple[str, Application]]:
    """Each node of the bound graph once, with the name ``serve.run`` gives its deployment."""
    return graph_nodes(app)


def rebuild(app: Application, change: Callable[[str, Deployment], Deployment]) -> Application:
    """A copy of the graph with each node's deployment replaced by ``change(name, dep)``."""
    names = {id(node): name for name, node in graph_nodes(app)}
    memo: dict[int, Application] = {}

    def copy(node: Application) -> Application:
        if id(node) not in memo:
            new = Application(change(names[id(node)], node.deployment), (), {})
            memo[id(node)] = new
            new.args = map_applications(node.args, copy)
            new.kwargs = map_applications(node.kwargs, copy)
        return memo[id(node)]

    return copy(app)


def build_application(cfg: ApplicationSchema, index: int, file: str) -> Application:
    """Import ``cfg.import_path``, call the builder, apply the file's deployment options and
    ``runtime_env``; every failure is a :class:`ConfigError` at the field that caused it."""
    here: tuple[str | int, ...] = ("applications", index)
    try:
        target = import_attr(cfg.import_path)
    except ImportError as exc:
        raise ConfigError(file, [(field_path((*here, "import_path")), str(exc))]) from None
    try:
        app, reason = resolve_application(target, cfg.args, cfg.import_path)
    except ValidationError as exc:
        raise ConfigError(file, describe_errors(exc, (*here, "args"))) from None
    if app is None:
        raise ConfigError(file, [(field_path((*here, "import_path")), reason)])

    nodes = dict(walk(app))
    for j, dep in enumerate(cfg.deployments):
        if dep.name not in nodes:
            raise ConfigError(
                file,
                [
                    (
                        field_path((*here, "deployments", j, "name")),
                        f"application {cfg.name!r} has no deployment {dep.name!r} "
                        f"(it has: {', '.join(nodes)})",
                    )
                ],
            )
    overrides = {dep.name: (j, dep.overrides()) for j, dep in enumerate(cfg.deployments)}
    app_env = cfg.runtime_env.fields_set()

    def change(name: str, dep: Deployment) -> Deployment:
        j, opts = overrides.get(name, (None, {}))
        if app_env:
            # The app's runtime_env is every deployment's, field by field, unless the
            # deployment sets that field itself (env_vars: variable by variable).
            actor = dict(opts.get("ray_actor_options", dep.config.ray_actor_options) or {})
            env = {**app_env, **(actor.get("runtime_env") or {})}
            env_vars = {**app_env.get("env_vars", {}), **(env.get("env_vars") or {})}
            if env_vars:
                env["env_vars"] = env_vars
            actor["runtime_env"] = env
            opts = {**opts, "ray_actor_options": actor}
        if not opts:
            return dep
        try:
            return dep.options(**opts)
        except (TypeError, ValueError, NotImplementedError) as exc:
            where = (*here, "deployments", j) if j is not None else (*here, "runtime_env")
            raise ConfigError(file, [(field_path(where), str(exc))]) from None

    return rebuild(app, change)


def source_config(cfg: ApplicationSchema) -> dict[str, Any]:
    """The entry as ``serval config`` prints it: the fields the file set, plus the key ones."""
    out: dict[str, Any] = {
        "name": cfg.name,
        "route_prefix": cfg.route_prefix,
        "import_path": cfg.import_path,
    }
    out.update(cfg.model_dump(mode="json", exclude_unset=True))
    return out


# -- from an Application to a config entry (``serval build``) -------------------------------------


def application_config(
    app: Application, name: str, route_prefix: str | None, import_path: str
) -> dict[str, Any]:
    """A config entry that deploys ``app`` as the code sets it up."""
    return {
        "name": name,
        "route_prefix": route_prefix,
        "import_path": import_path,
        "runtime_env": {},
        "deployments": [
            {"name": dep_name, **_options_set(node.deployment.config)}
            for dep_name, node in walk(app)
        ],
    }


_DEFAULTS = DeploymentConfig()


def _options_set(config: DeploymentConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value == getattr(_DEFAULTS, f.name):
            continue
        if isinstance(value, AutoscalingConfig):
            policy = value.policy
            value = {
                k: v
                for k, v in dataclasses.asdict(value).items()
                if v is not None and k != "policy"
            }
            if not policy.is_default_policy_function():
                value["policy"] = {"policy_function": policy.policy_function}
                if policy.policy_kwargs:
                    value["policy"]["policy_kwargs"] = policy.policy_kwargs
        elif isinstance(value, BackpressureConfig):
            value = dataclasses.asdict(value)
        out[f.name] = value
    return out
