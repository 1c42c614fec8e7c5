"""``serval deploy``'s declarative apply of a whole config file (``apply_config``), and the
check, for ``deploy`` and ``run``, of the HTTP options asked for against the running cluster's
(they apply when a cluster starts: only those that differ are warned about)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from serval.config import HTTPOptions
from serval.exceptions import DeploymentFailedError, ServalError
from serval.schema import ApplicationSchema, ServeDeploySchema

__all__ = ["apply_config", "config_http_fields", "http_fields_given", "warn_http_differs"]

logger = logging.getLogger("serval.cli")


def apply_config(
    apps: list[tuple[ApplicationSchema, Any, dict[str, Any] | None]], file: str, wait: bool = True
) -> None:
    """Make the connected cluster's applications exactly ``apps`` (a config file's, built), as
    Ray's ``serve deploy`` and ``PUT /api/serve/applications/`` do: every app not among them is
    deleted, whatever deployed it; the others are deployed together and waited for, progress
    logged (not waited for unless ``wait``). An unchanged app is untouched (same versions: no
    replica restarts); a changed one rolls. Run as ``python -m serval deploy --address A FILE``
    (``--no-wait``) by whoever needs it."""
    from serval import api

    wanted = {cfg.name for cfg, _, _ in apps}
    removed = [name for name in api.app_configs() if name not in wanted]
    for name in removed:
        logger.info("deleting application %r (not in %s)", name, file)
    if removed:  # first: a removed app may free a route prefix an app of the file takes
        api._delete_many(removed)
    logger.info("deploying %s", ", ".join(repr(cfg.name) for cfg, _, _ in apps))
    try:
        api._run_many([(app, cfg.name, cfg.route_prefix, src) for cfg, app, src in apps], wait)
    except DeploymentFailedError:
        failed = [
            f"application {name!r} failed to deploy: {_last_line(app.message)}"
            for name, app in api.status().applications.items()
            if name in wanted and app.status == "DEPLOY_FAILED"
        ]
        if not failed:
            raise
        raise ServalError("; ".join(failed)) from None  # one line, every failed app named


def _last_line(message: str) -> str:
    """A traceback's last line: the exception."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


# -- http_options asked for vs. those of the running cluster -------------------------------------

_FLAG_FIELDS = ("host", "port", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs")


def http_fields_given(args: argparse.Namespace, config: ServeDeploySchema | None) -> list[str]:
    """The HTTP fields the command line or the file set (the rest: nothing was asked)."""
    names = [name for name in _FLAG_FIELDS if getattr(args, name, None) is not None]
    if config is not None:
        names += config_http_fields(config)
    return list(dict.fromkeys(names))


def config_http_fields(config: ServeDeploySchema) -> list[str]:
    names = sorted(config.http_options.model_fields_set - {"ssl_keyfile_password"})
    return names + (["proxy_location"] if "proxy_location" in config.model_fields_set else [])


def warn_http_differs(address: str, wanted: HTTPOptions, names: list[str]) -> HTTPOptions | None:
    """Warn, naming them, about the fields of ``names`` whose values in ``wanted`` the running
    cluster does not have (they apply when a cluster starts); the cluster's own options."""
    from serval._private.caller import control

    running = control.call(lambda c: c.http_options())
    differ = [
        f"{name} ({have!r} there, {want!r} asked)"
        for name in names
        if (pair := _compare(name, wanted, running)) is not None
        for have, want in [pair]
    ]
    if differ:
        logger.warning(
            "the cluster at %s keeps its own HTTP options; these differ from what was asked and "
            "apply only when a cluster starts: %s",
            address,
            ", ".join(differ),
        )
    return running


def _compare(name: str, wanted: HTTPOptions, running: HTTPOptions | None) -> tuple[Any, Any] | None:
    """(the cluster's, the asked) value of field ``name`` if they differ, else None."""
    if name == "proxy_location":
        have, want = _location(running), _location(wanted)
    elif running is None or not running.enabled:
        return None  # no HTTP proxy there: its options do not matter (proxy_location says it)
    else:
        have = _norm(name, getattr(running, name, None))
        want = _norm(name, getattr(wanted, name, None))
    return None if have == want else (have, want)


def _location(options: HTTPOptions | None) -> str:
    return "Disabled" if options is None or not options.enabled else options.location


def _norm(name: str, value: Any) -> Any:
    if isinstance(value, list | tuple):
        return list(value)
    if name.startswith("ssl_") and isinstance(value, str):  # (the cluster's are absolute)
        return os.path.abspath(value)
    return value
