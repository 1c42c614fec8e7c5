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

__all__ = [
    "FunctionDeployment",
    "Kind",
    "async_methods",
    "check_stream",
    "http_entry",
    "kind",
    "kind_cached",
    "sync_with_context",
    "with_context",
]


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


def async_methods(user: Any) -> frozenset[str]:
    """The names of ``user``'s async methods (those a handle may call: public, and
    ``__call__``). Found on the class, without running a property's code."""
    found = set()
    names = [n for n in dir(type(user)) if not n.startswith("_")] + ["__call__"]
    for name in names:
        try:
            static = inspect.getattr_static(user, name)
        except AttributeError:
            continue
        if isinstance(static, property):
            continue
        fn = getattr(user, name, None)
        if callable(fn) and kind(fn) is Kind.ASYNC:
            found.add(name)
    return frozenset(found)


def check_stream(kind: Kind, stream: bool, deployment: str, fn: Callable[..., Any]) -> None:
    """A generator is called with ``stream=True``, and only a generator is."""
    if stream == (kind in (Kind.ASYNC_GEN, Kind.SYNC_GEN)):
        return
    name = f"{deployment}.{getattr(fn, '__name__', 'method')}"
    raise TypeError(
        f"{name} is a {kind.value} function: call it with handle.options(stream=True)"
        if not stream
        else f"{name} is not a generator, so it cannot be called with stream=True"
    )


async def with_context(meta: Any, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    if meta is not None:
        request_context.set_request(meta)
    return await fn(*args, **kwargs)


def sync_with_context(meta: Any, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    request_context.set_request(meta)
    return fn(*args, **kwargs)


_POSITIONAL = (
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.VAR_POSITIONAL,
)


def http_entry(call: Callable[..., Any]) -> Callable[[Any], Any]:
    """What an HTTP request calls: ``call(request)``, or, as in Ray Serve, ``call()`` when it
    takes no argument (``def __call__(self)``, a function deployment ``def f()``). The
    wrapper has the kind of ``call``, so it runs where ``call`` would (loop or thread)."""
    try:
        params = inspect.signature(call).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it the request
        return call
    if any(p.kind in _POSITIONAL for p in params):
        return call
    found = kind(call)
    if found is Kind.ASYNC:

        async def no_request(request: Any) -> Any:
            return await call()

    elif found is Kind.ASYNC_GEN:

        async def no_request(request: Any) -> Any:  # type: ignore[misc]
            async for item in call():
                yield item

    elif found is Kind.SYNC_GEN:

        def no_request(request: Any) -> Any:  # type: ignore[misc]
            yield from call()

    else:

        def no_request(request: Any) -> Any:  # type: ignore[misc]
            return call()

    return no_request
