"""The ``serval`` command (also ``python -m serval``), with Ray Serve's verbs.

``run``, ``build``, ``start``, ``deploy``, ``status``, ``config`` and ``shutdown``. The cluster a
command talks to is ``--address``, else ``SERVAL_ADDRESS``, else the per-user default runtime
directory. ``run`` deploys to the cluster running there, else starts one there owned by the
command (it stops at Ctrl-C): ``serval status`` in another terminal finds it.

``deploy`` is declarative, as Ray's ``serve deploy``: the file is the whole set of applications.
Apps it names are deployed (unchanged ones are left as they run, changed ones roll), every other
app on the cluster is deleted — ones deployed from Python or ``serval run`` too.

A serval cluster on Ray is named as Ray's tools name a Ray cluster: ``--address auto``,
``--address <head>:6379`` or ``--address ray://<head>:10001``; or ``RAY_ADDRESS`` (when no
``--address`` or ``SERVAL_ADDRESS`` is given); or ``SERVAL_BACKEND=ray`` (Ray's own default then).
Its apps outlive the command that deployed them (``serval run`` deletes its own at Ctrl-C).

Errors print one line and exit 1 — never a traceback (``-v`` logs it at debug level).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import yaml  # type: ignore[import-untyped]
from pydantic import ValidationError

from serval._cli_deploy import (
    apply_config,
    config_http_fields,
    http_fields_given,
    warn_http_differs,
)
from serval._cli_logs import add_logs_arguments
from serval._cli_status import FORMATS, print_status, to_yaml
from serval._private.wire import endpoints, layout
from serval.config import HTTPOptions
from serval.exceptions import ServalError
from serval.schema import (
    ApplicationSchema,
    ServeDeploySchema,
    application_config,
    build_application,
    describe_errors,
    import_attr,
    load_config,
    parse_config,
    resolve_application,
    source_config,
)

__all__ = ["main"]

logger = logging.getLogger("serval.cli")

_PROG = "serval"
_SHUTDOWN_WAIT_S = 10.0
_WATCH_S = 0.5  # how often `serval run` looks whether its cluster was shut down elsewhere
_MAX_ADDRESS_BYTES = 107 - layout.MAX_REPLICA_SOCKET_SUFFIX


class CLIError(Exception):
    """An error the user can act on: printed as one line, exit code 1."""


# -- entry point ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        return 130
    except (CLIError, ServalError) as exc:
        logger.debug("command failed", exc_info=True)
        return _fail(str(exc))
    except Exception as exc:
        logger.debug("command failed", exc_info=True)
        return _fail(f"{type(exc).__name__}: {exc}")


def _fail(message: str) -> int:
    first, _, rest = message.strip().partition("\n")
    # A replica's traceback ends with the exception itself; that line is the one to show.
    last = rest.strip().splitlines()[-1] if rest.strip() else ""
    print(f"{_PROG}: error: {first}{' ' + last if last else ''}", file=sys.stderr, flush=True)
    return 1


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG, description="serval: serve Ray Serve applications on one machine."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="deploy an app or a config file and serve until Ctrl-C")
    p.add_argument("target", help="module:app (an Application or an app builder) or config.yaml")
    p.add_argument("arguments", nargs="*", metavar="KEY=VALUE", help="args for an app builder")
    p.add_argument("--name", help="application name (default: 'default')")
    p.add_argument("--route-prefix", help="HTTP route prefix (default: the app's, else '/')")
    _http_flags(p)
    _dashboard_flag(p)
    _address_flag(
        p,
        "the cluster to deploy to (default: $SERVAL_ADDRESS, else the per-user default); "
        "if none runs there, one is started there, owned by this command",
    )
    _app_dir_flag(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("build", help="write a config file for one or more apps")
    p.add_argument("import_paths", nargs="+", metavar="module:app")
    p.add_argument("-o", "--output-path", help="file to write (default: print it)")
    _app_dir_flag(p)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("start", help="start a detached cluster")
    _http_flags(p)
    _dashboard_flag(p)
    _address_flag(p, "runtime directory of the new cluster")
    p.set_defaults(func=_cmd_start)

    p = sub.add_parser(
        "deploy",
        help="make a running cluster's apps those of a config file",
        description="Declarative, as Ray's `serve deploy`: the file is the whole set of apps. "
        "Apps in it are deployed (unchanged ones are untouched, changed ones roll: new replicas "
        "start before the old ones stop); every other app on the cluster is deleted, whether it "
        "came from a config file, serve.run or `serval run`. Waits until every app runs; exit "
        "code 0, else 1 with a one-line error.",
    )
    p.add_argument("config_file")
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the cluster has the new set of apps (the removed ones deleted), as "
        "Ray's does, without waiting for their replicas (then see `serval status`)",
    )
    _address_flag(p)
    _app_dir_flag(p)
    p.set_defaults(func=_cmd_deploy)

    p = sub.add_parser("status", help="show applications, deployments and replicas")
    p.add_argument("-n", "--name", help="only this application")
    p.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="table",
        help="table (default), or for tools yaml (Ray's `serve status` shape) or json (the same)",
    )
    _address_flag(p)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("config", help="print the config the apps were deployed with")
    p.add_argument("-n", "--name", help="only this application")
    _address_flag(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("logs", help="show and follow the cluster's log files")
    add_logs_arguments(p)
    _address_flag(p)
    p.set_defaults(func=_cmd_logs)

    p = sub.add_parser("shutdown", help="delete every app and stop the cluster")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    _address_flag(p)
    p.set_defaults(func=_cmd_shutdown)
    return parser


def _http_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", "--http-host", dest="host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", "--http-port", dest="port", type=int, help="HTTP port (default 8000)")
    # HTTPS (http_options.ssl_*; an encrypted key's password: in a config file's http_options)
    p.add_argument("--ssl-keyfile", help="serve HTTPS with this PEM private key")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this PEM certificate (chain)")
    p.add_argument(
        "--ssl-ca-certs", help="require client certificates signed by these PEM CA certificates"
    )


def _dashboard_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dashboard-port",
        type=int,
        help="the dashboard's port on 127.0.0.1 (default 8265; 0: no dashboard)",
    )


def _dashboard_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """``serve.start``'s ``dashboard_options`` from ``--dashboard-port``; its port checked
    first, as the HTTP port is, so that a taken one is a clear error."""
    port = getattr(args, "dashboard_port", None)
    if port is None:
        return None
    if not 0 <= port <= 65535:
        raise CLIError(f"--dashboard-port must be from 0 to 65535, got {port}")
    if port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                reason = "is in use" if exc.errno == errno.EADDRINUSE else f"is not usable ({exc})"
                raise CLIError(f"dashboard port 127.0.0.1:{port} {reason}") from None
    return {"port": port}


def _print_dashboard(address: str) -> bool:
    """The dashboard's URL with its token, as Jupyter prints its own: opening it logs in.
    Whether the cluster has a dashboard."""
    from serval._private.process.dashboard import read_url

    url = read_url(address)
    if url is not None:
        print(f"dashboard: {url}", flush=True)
    return url is not None


def _ray_dashboard(args: argparse.Namespace) -> dict[str, Any] | None:
    """On Ray the dashboard runs on the head node (8266 unless ``--dashboard-port``)."""
    port = getattr(args, "dashboard_port", None)
    return None if port is None else {"port": port}


def _print_ray_dashboard() -> None:
    from serval import api

    url = api.dashboard_url()
    if url is not None:
        print(f"dashboard (on the head node): {url}", flush=True)


def _address_flag(p: argparse.ArgumentParser, text: str | None = None) -> None:
    p.add_argument(
        "--address",
        "-a",
        help=text
        or "the cluster's runtime directory (default: $SERVAL_ADDRESS, else the per-user default)",
    )


def _app_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--app-dir", "-d", default=".", help="put this directory first on sys.path (default: .)"
    )


# -- the cluster a command talks to --------------------------------------------------------------


def _ray_address(args: argparse.Namespace) -> str | None:
    """The Ray cluster this command talks to, if it talks to one (``""``: Ray's default)."""
    # (from cluster, not ray_cluster: a local cluster's command never imports Ray)
    from serval._private.process.cluster import is_ray_address
    from serval._private.process.settings import settings

    given: str | None = args.address or settings().address
    if given is not None:
        return given if is_ray_address(given) else None
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    return "" if settings().backend == "ray" else None


def _join_ray(
    address: str,
    start: bool,
    http: HTTPOptions | None = None,
    dashboard: dict[str, Any] | None = None,
    logging_config: dict[str, Any] | None = None,
) -> None:
    """Connect to Ray at ``address`` and to the serval cluster there; ``start``: start its
    controller if it has none (else that is an error)."""
    from serval import api
    from serval._private.process import ray_cluster

    try:
        ray_cluster.init_ray(address or None)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CLIError(f"cannot connect to the Ray cluster at {address or 'auto'}: {exc}") from None
    if not start and not ray_cluster.is_running():
        raise CLIError(
            f"no serval cluster is running on the Ray cluster at {address or 'auto'} "
            "(start one with `serval start --address ...`)"
        )
    api.start(
        http_options=http,
        backend="ray",
        dashboard_options=dashboard,
        logging_config=logging_config,
    )


def _given_address(args: argparse.Namespace) -> str | None:
    from serval._private.process.settings import settings

    address: str | None = args.address or settings().address
    return os.path.abspath(address) if address else None


def _address(args: argparse.Namespace) -> str:
    from serval._private.process.cluster import default_address

    return _given_address(args) or default_address()


def _connect_to(args: argparse.Namespace, address: str | None = None) -> str:
    """Connect to the running cluster the command names (local or on Ray); its address."""
    ray_address = _ray_address(args)
    if ray_address is not None:
        _join_ray(ray_address, start=False)
        return ray_address or "auto"
    address = address or _address(args)
    _connect(address)
    return address


def _wait(done: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        time.sleep(0.1)
    return bool(done())


def _connect(address: str) -> None:
    from serval import api
    from serval._private.process.cluster import is_running

    if not is_running(address):
        raise CLIError(f"no serval cluster is running at {address} (start one with `serval start`)")
    api.start(address=address)


def _check_address_length(address: str) -> None:
    # The longest Unix socket path in a runtime directory is <address>/r/<12 hex>.sock, and a
    # socket path holds at most 107 bytes.
    if len(os.fsencode(address)) > _MAX_ADDRESS_BYTES:
        raise CLIError(
            f"the address {address} is too long: the Unix socket paths inside it would exceed "
            f"107 bytes; use a directory of at most {_MAX_ADDRESS_BYTES} bytes"
        )


def _use_app_dir(app_dir: str) -> None:
    """As Ray does: the app directory (cwd by default) comes first on sys.path; ``serve.run``
    hands the same sys.path to the replicas."""
    path = os.path.abspath(app_dir)
    if not os.path.isdir(path):
        raise CLIError(f"--app-dir {app_dir}: not a directory")
    sys.path.insert(0, path)


def _check_port_free(options: HTTPOptions) -> None:
    if not options.enabled:
        return
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((options.host, options.port))
        except OSError as exc:
            reason = "is in use" if exc.errno == errno.EADDRINUSE else f"is not usable ({exc})"
            raise CLIError(f"HTTP port {options.host}:{options.port} {reason}") from None


def _http_options(args: argparse.Namespace, base: HTTPOptions | None = None) -> HTTPOptions:
    base = base or HTTPOptions()
    given = {
        name: getattr(args, name)
        for name in ("host", "port", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs")
        if getattr(args, name, None) is not None
    }
    try:
        options = dataclasses.replace(base, **given)  # every option the file set, but these
        if options.tls:  # the files load here (else: which, and why), with absolute paths
            from serval._private.proxy.tls import checked

            options = checked(options)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return options


def _scheme(http: HTTPOptions) -> str:
    return "https" if http.tls else "http"


# -- run -----------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    from serval import api

    _use_app_dir(args.app_dir)
    ray_address = _ray_address(args)
    config: ServeDeploySchema | None = None
    if _is_config_file(args.target):
        if args.name or args.route_prefix or args.arguments:
            raise CLIError(
                "--name, --route-prefix and KEY=VALUE args go with module:app, not a config file"
            )
        config = load_config(args.target)
        apps = _build_all(config, args.target)
    else:
        apps = [_app_from_import_path(args)]
    http = _http_options(args, config.http() if config is not None else None)
    asked = http_fields_given(args, config)
    system_logging = _system_logging(config)

    # Ctrl-C and SIGTERM both tear down (SIGINT too when a shell started us with it ignored).
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    deployed: list[str] = []
    owned = False
    address: str | None = None
    try:
        if ray_address is not None:  # started if need be; it outlives this command
            _join_ray(
                ray_address,
                start=True,
                http=http,
                dashboard=_ray_dashboard(args),
                logging_config=system_logging,
            )
            print(f"deploying to the Ray cluster at {ray_address or 'auto'}", flush=True)
            _print_ray_dashboard()
            serving = warn_http_differs(ray_address or "auto", http, asked)
        else:
            address = _address(args)
            owned = not _start_or_join(address, http, args, system_logging)
            serving = http if owned else warn_http_differs(address, http, asked)
        for cfg, app, src in apps:
            api.run(app, name=cfg.name, route_prefix=cfg.route_prefix, _source_config=src)
            deployed.append(cfg.name)
            _print_serving(cfg, serving)
        print("Ctrl-C to stop.", flush=True)
        _serve_while_the_cluster_runs(address, owned)
        print(f"the serval cluster at {address} was shut down", flush=True)
        api._disconnect(stop_cluster=False)  # (what is left of an owned one is cleaned up)
        return 0
    except KeyboardInterrupt:
        logger.info("shutting down")
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _teardown(owned, deployed)
        return 0
    except Exception:
        _teardown(owned, deployed)  # a failed deploy leaves nothing of this command behind
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _serve_while_the_cluster_runs(address: str | None, owned: bool) -> None:
    """Return when the cluster is gone (``serval shutdown`` from elsewhere); Ctrl-C or SIGTERM
    raise KeyboardInterrupt meanwhile. (On Ray: until then.)"""
    from serval import api

    if address is None:
        while True:
            signal.pause()
    while not _cluster_gone(address, owned, api):
        time.sleep(_WATCH_S)


def _cluster_gone(address: str, owned: bool, api: Any) -> bool:
    if owned:  # its controller exited cleanly: asked to (a restart after a crash is not that)
        cluster = api._owner.cluster
        return cluster is None or bool(cluster.stopped.is_set())
    # A daemon removes the runtime directory when its cluster is shut down (not on a crash).
    return not os.path.isdir(address)


def _system_logging(config: ServeDeploySchema | None) -> dict[str, Any] | None:
    """A config file's top-level ``logging_config``: the controller's and the proxies'."""
    if config is None or config.logging_config is None:
        return None
    return config.logging_config.model_dump(mode="json")


def _start_or_join(
    address: str,
    http: HTTPOptions,
    args: argparse.Namespace,
    system_logging: dict[str, Any] | None = None,
) -> bool:
    """Connect to the cluster running at ``address`` (True), else start one there that this
    command owns (False): at the default address, ``serval status`` finds it with no flags.
    Either way, print its dashboard's URL."""
    from serval import api
    from serval._private.process.cluster import is_running

    if is_running(address):
        if args.dashboard_port is not None:
            logger.warning("--dashboard-port ignored: the cluster at %s has its own", address)
        _connect(address)
        if system_logging is not None:
            logger.warning(
                "the file's top-level logging_config is ignored: the cluster at %s was "
                "started with its own (it applies to a cluster the file starts)",
                address,
            )
        print(f"deploying to the serval cluster running at {address}", flush=True)
        _print_dashboard(address)
        return True
    _check_address_length(address)
    if not os.path.isdir(os.path.dirname(address)):
        raise CLIError(f"cannot create {address}: its parent directory does not exist")
    _check_port_free(http)
    dashboard = _dashboard_options(args)
    api.start(
        http_options=http,
        _own_address=address,
        dashboard_options=dashboard,
        logging_config=system_logging,
    )
    print(f"started a serval cluster at {address} (it stops with this command)", flush=True)
    if address != _default_address():
        print(f"talk to it with --address {address} or SERVAL_ADDRESS={address}", flush=True)
    _print_dashboard(address)
    return False


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _teardown(owned: bool, deployed: list[str]) -> None:
    """A cluster this command owns stops; on a cluster it only connected to (or on Ray), the
    apps it deployed are deleted and the cluster lives on."""
    from serval import api

    if owned:
        api.shutdown()
        return
    for name in deployed:
        with contextlib.suppress(ServalError, ConnectionError, OSError):
            api.delete(name)


def _is_config_file(target: str) -> bool:
    return target.endswith((".yaml", ".yml", ".json")) or os.path.isfile(target)


def _app_from_import_path(
    args: argparse.Namespace,
) -> tuple[ApplicationSchema, Any, dict[str, Any] | None]:
    builder_args: dict[str, Any] = {}
    for item in args.arguments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"app builder arguments are KEY=VALUE, got {item!r}")
        builder_args[key] = value
    try:
        target = import_attr(args.target)
    except ImportError as exc:
        raise CLIError(f"{args.target}: {exc}") from None
    try:
        app, reason = resolve_application(target, builder_args, args.target)
    except ValidationError as exc:  # a typed builder's arguments
        raise CLIError(f"{args.target}: invalid app builder arguments: {_fields(exc)}") from None
    if app is None:
        raise CLIError(reason)
    route_prefix: Any = args.route_prefix
    if route_prefix is None:
        route_prefix = app.deployment.route_prefix or "/"
    try:
        cfg = ApplicationSchema(
            name=args.name or "default", route_prefix=route_prefix, import_path=args.target
        )
    except ValidationError as exc:
        raise CLIError(_fields(exc, flags=True)) from None
    # Like Ray, an app run from an import path has no config entry (`serval config` skips it).
    return cfg, app, None


def _fields(exc: ValidationError, flags: bool = False) -> str:
    return "; ".join(
        f"{'--' + field.replace('_', '-') if flags else field}: {reason}"
        for field, reason in describe_errors(exc)
    )


def _build_all(
    config: ServeDeploySchema, file: str
) -> list[tuple[ApplicationSchema, Any, dict[str, Any] | None]]:
    """Import and build every app before deploying any, so a bad entry deploys nothing."""
    return [
        (cfg, build_application(cfg, i, file), source_config(cfg))
        for i, cfg in enumerate(config.applications)
    ]


def _print_serving(cfg: ApplicationSchema, http: HTTPOptions | None) -> None:
    if cfg.route_prefix is None:
        where = "no HTTP route"
    elif http is None:
        where = f"route prefix {cfg.route_prefix}"
    elif not http.enabled:
        where = "HTTP disabled"
    else:
        base = endpoints.url_base(_scheme(http), http.host, http.port)
        where = f"{base}{http.root_path}{cfg.route_prefix}"
    print(f"application {cfg.name!r} is running: {where}", flush=True)


# -- build ---------------------------------------------------------------------------------------


def _cmd_build(args: argparse.Namespace) -> int:

    _use_app_dir(args.app_dir)
    many = len(args.import_paths) > 1
    entries = []
    for i, path in enumerate(args.import_paths, start=1):
        try:
            target = import_attr(path)
        except ImportError as exc:
            raise CLIError(f"{path}: {exc}") from None
        app, reason = resolve_application(target, {}, path)
        if app is None:
            raise CLIError(reason)
        name = f"app{i}"
        prefix = app.deployment.route_prefix or (f"/{name}" if many else "/")
        entries.append(application_config(app, name, prefix, path))
    defaults = HTTPOptions()
    document: dict[str, Any] = {
        "proxy_location": "EveryNode",
        "http_options": {"host": defaults.host, "port": defaults.port},
        "applications": entries,
    }
    parse_config(document, args.output_path or "<serval build>")  # what we write must load
    try:
        body = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    except yaml.YAMLError as exc:
        raise CLIError(f"an option cannot be written as YAML: {exc}") from None
    text = f"# This file was generated by `serval build`.\n\n{body}"
    if args.output_path:
        with open(args.output_path, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output_path}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# -- start / deploy ------------------------------------------------------------------------------


def _cmd_start(args: argparse.Namespace) -> int:
    from serval._private.process.daemon import start_detached

    ray_address = _ray_address(args)
    if ray_address is not None:
        http = _http_options(args)
        _join_ray(ray_address, start=True, http=http, dashboard=_ray_dashboard(args))
        _print_ray_dashboard()
        print(
            f"serval cluster running on the Ray cluster at {ray_address or 'auto'} "
            f"(HTTP on port {http.port} of every node); it lives until `serval shutdown`"
        )
        return 0
    address = _address(args)
    http = _http_options(args)
    from serval._private.process.cluster import is_running

    if is_running(address):
        raise CLIError(f"a serval cluster is already running at {address}")
    _check_address_length(address)
    if not os.path.isdir(os.path.dirname(address)):
        raise CLIError(f"cannot create {address}: its parent directory does not exist")
    _check_port_free(http)
    from serval._private.process.dashboard import dashboard_options

    start_detached(address, http, dashboard=dashboard_options(_dashboard_options(args)))
    print(
        f"serval cluster started at {address} (HTTP on {_scheme(http)}://{http.host}:{http.port})"
    )
    if not _print_dashboard(address) and args.dashboard_port != 0:
        from serval._private.process.daemon import log_path

        print(f"no dashboard: its default port 8265 is taken (see {log_path(address)})")
    if address != _default_address():
        print(f"talk to it with --address {address} or SERVAL_ADDRESS={address}")
    return 0


def _default_address() -> str:
    from serval._private.process.cluster import default_address

    return default_address()


def _cmd_deploy(args: argparse.Namespace) -> int:
    _use_app_dir(args.app_dir)
    config = load_config(args.config_file)
    apps = _build_all(config, args.config_file)  # every import before anything changes
    address = _connect_to(args)
    warn_http_differs(address, config.http(), config_http_fields(config))
    apply_config(apps, args.config_file, wait=not args.no_wait)
    names = ", ".join(repr(cfg.name) for cfg, _, _ in apps)
    print(f"{'deployed' if not args.no_wait else 'deploying'} {names} to {address}")
    return 0


# -- status / config -----------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> int:
    from serval import api

    address = _connect_to(args)
    status = api.status()
    if args.name and args.name not in status.applications:
        raise CLIError(f"no application named {args.name!r} at {address}")
    print_status(status, address, args.output, args.name)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from serval import api

    _connect_to(args)
    configs = api.app_configs()
    if args.name:
        if args.name not in configs:
            raise CLIError(f"no application named {args.name!r}")
        configs = {args.name: configs[args.name]}
    docs = [to_yaml(c) for c in configs.values() if c is not None]
    python_apps = [name for name, c in configs.items() if c is None]
    if not docs:
        print("No config has been deployed.")
    else:
        sys.stdout.write("---\n".join(docs))
    if python_apps:
        logger.info("deployed from Python, without a config: %s", ", ".join(python_apps))
    return 0


# -- logs ----------------------------------------------------------------------------------------


def _cmd_logs(args: argparse.Namespace) -> int:
    from serval._cli_logs import Selection, find_directory, show

    ray = args.logs_dir is None and _ray_address(args) is not None
    address = None if ray or args.logs_dir is not None else _address(args)
    directory, note = find_directory(logs_dir=args.logs_dir, address=address, ray=ray)
    if note is not None:
        print(f"{_PROG}: {note}", file=sys.stderr, flush=True)
    selection = Selection(args.component, args.app, args.deployment, args.replica, args.request_id)
    return show(
        directory, selection, tail=args.tail, follow=args.follow, as_json=args.output == "json"
    )


# -- shutdown ------------------------------------------------------------------------------------


def _cmd_shutdown(args: argparse.Namespace) -> int:
    from serval import api

    address = _connect_to(args)
    if not args.yes and not _confirm(
        f"This stops the serval cluster at {address} and deletes every application on it. "
        "Continue? [y/N] "
    ):
        raise CLIError("aborted")
    api.shutdown()
    if _ray_address(args) is not None:
        from serval._private.process import ray_cluster

        ray_cluster.init_ray()
        gone = _wait(lambda: not ray_cluster.is_running(), _SHUTDOWN_WAIT_S)
    else:
        gone = _wait_gone(address, _SHUTDOWN_WAIT_S)
    if not gone:
        raise CLIError(f"some processes of the cluster at {address} are still running")
    print(f"serval cluster at {address} stopped")
    return 0


def _confirm(question: str) -> bool:
    try:
        answer = input(question)
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def _wait_gone(address: str, timeout: float) -> bool:
    """Wait until no serval process of ``address`` is left."""
    from serval._private.process import procs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not procs.naming(address, exclude=(os.getpid(),)):
            return True
        time.sleep(0.05)
    return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
