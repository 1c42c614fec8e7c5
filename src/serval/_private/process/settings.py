"""Settings read from the environment, once, when first needed (never at import)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serval.config import HTTPOptions

# The user's PYTHONPATH, carried through the controller and the proxy (which run without it)
# to the replicas, which get it back as PYTHONPATH.
USER_PYTHONPATH_VAR = "SERVAL_USER_PYTHONPATH"


@dataclass(frozen=True)
class Settings:
    # The cluster to connect to instead of starting one: a runtime directory.
    address: str | None
    # The user's code path for replicas: the driver's PYTHONPATH.
    user_pythonpath: str | None
    # The backend a new cluster runs on (SERVAL_BACKEND): "local" or "ray"; None: Ray when
    # the driver has called ray.init(), else local.
    backend: str | None = None


@functools.cache
def settings() -> Settings:
    env = os.environ
    user_path = env[USER_PYTHONPATH_VAR] if USER_PYTHONPATH_VAR in env else env.get("PYTHONPATH")
    return Settings(
        address=env.get("SERVAL_ADDRESS") or None,
        user_pythonpath=user_path or None,
        backend=env.get("SERVAL_BACKEND") or None,
    )


# -- HTTPOptions on a command line ---------------------------------------------------------------
# The local backend starts the controller, the daemon and the proxy with HTTPOptions as JSON on
# their command lines, which every user of the machine can read (ps); the key's password
# (ssl_keyfile_password) goes in their environment instead, which only the same user can.
# Replicas do not get it (backends.local.replica_env).

PASSWORD_ENV = "SERVAL_SSL_KEYFILE_PASSWORD"
_FROM_ENV = "ssl_keyfile_password_from_env"  # the JSON's marker: the password is in the env


def http_options_argv(options_json: str) -> str:
    """``HTTPOptions`` JSON for a command line: without the password (``http_options_env``)."""
    data: dict[str, Any] = json.loads(options_json)
    if data.get("ssl_keyfile_password") is None:
        return options_json
    data["ssl_keyfile_password"] = None
    data[_FROM_ENV] = True
    return json.dumps(data)


def http_options_env(env: dict[str, str], options: HTTPOptions) -> dict[str, str]:
    """``env`` for a process given ``http_options_argv(options.to_json())``."""
    if options.ssl_keyfile_password is None:
        return env
    return {**env, PASSWORD_ENV: options.ssl_keyfile_password}


def http_options_from_argv(text: str) -> HTTPOptions:
    """``HTTPOptions`` from a command line's JSON (``http_options_argv``), password and all."""
    from serval.config import HTTPOptions

    data: dict[str, Any] = json.loads(text)
    if data.pop(_FROM_ENV, False):
        if PASSWORD_ENV not in os.environ:
            raise ValueError(f"http_options: the key's password is not in ${PASSWORD_ENV}")
        data["ssl_keyfile_password"] = os.environ[PASSWORD_ENV]
    return HTTPOptions(**data)
