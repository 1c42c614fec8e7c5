"""A user's methods as the replica calls them: what kind each is (async, sync, a generator
of either), a function deployment as an object with ``__call__``, and calling one in its
request's context (so ``serve.get_multiplexed_model_id()`` and friends know the request).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from enum import Enum
from typing import Any

from serval._private.replica import request_context

__all__ = ["FunctionDeployment", "Kind", "kind", "kind_cached", "sync_with_context", "with_context"]


class Kind(Enum):
    ASYNC = "async"
    SYNC = "sync"
    ASYNC_GEN = "async generator"
    SYNC_GEN = "generator"


class FunctionDeployment:
    """Wraps a function deployment so that it is called as ``__call__``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.__call__ = fn  # an instance attribute: looked up by getattr, not by type


_KINDS: dict[Any, Kind] = {}


def kind_cached(fn: Callable[..., Any]) -> Kind:
    """``kind`` of a bound method, cached by its function (bound methods are made anew)."""
    key = getattr(fn, "__func__", fn)
    found = _KINDS.get(key)
    if found is None:
        found = _KINDS[key] = kind(fn)
    return found


def kind(fn: Callable[..., Any]) -> Kind:
    target = inspect.unwrap(fn)
    if inspect.isasyncgenfunction(target):
        return Kind.ASYNC_GEN
    if inspect.isgeneratorfunction(target):
        return Kind.SYNC_GEN
    if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004 - a callable object's async __call__
    ):
        return Kind.ASYNC
    return Kind.SYNC


async def with_context(meta: Any, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    if meta is not None:
        request_context.set_request(meta)
    return await fn(*args, **kwargs)


def sync_with_context(meta: Any, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    request_context.set_request(meta)
    return fn(*args, **kwargs)
