"""What user code can ask about the request it is serving, and the replica it runs in."""

from __future__ import annotations

import contextvars
from typing import Any

_request: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "serval_request", default=None
)
_servable: list[Any] = [None]


def set_request(meta: dict[str, Any] | None) -> None:
    _request.set(meta)


def current_request() -> dict[str, Any] | None:
    return _request.get()


def set_servable(obj: Any) -> None:
    _servable[0] = obj


def servable() -> Any:
    return _servable[0]
