"""Settings read from the environment, once, when first needed (never at import)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

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
