"""Settings read from the environment, once, when first needed (never at import)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    # The cluster to connect to instead of starting one: a runtime directory.
    address: str | None


@functools.cache
def settings() -> Settings:
    return Settings(address=os.environ.get("SERVAL_ADDRESS") or None)
