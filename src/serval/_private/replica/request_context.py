"""What user code can ask about the request it is serving, and the replica it runs in."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

_request: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "serval_request", default=None
)
_servable: list[Any] = [None]
_model_listener: list[Callable[[list[str]], None] | None] = [None]


def set_request(meta: dict[str, Any] | None) -> None:
    _request.set(meta)


def current_request() -> dict[str, Any] | None:
    return _request.get()


def set_servable(obj: Any) -> None:
    _servable[0] = obj


def servable() -> Any:
    return _servable[0]


def set_model_listener(listener: Callable[[list[str]], None]) -> None:
    """The replica's hook: told whenever the set of loaded multiplexed models changes."""
    _model_listener[0] = listener


def report_models(model_ids: list[str]) -> None:
    listener = _model_listener[0]
    if listener is not None:
        listener(model_ids)
