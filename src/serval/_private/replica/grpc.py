"""A gRPC request as the replica serves it (Ray Serve's rules; the proxy side is
``proxy.grpc``).

The proxy sends the request message and a ``serval.grpc_util.RayServegRPCContext`` as the
call's two arguments, with ``"grpc"`` in its metadata. The user's method of the gRPC method's
name is called with the message alone, or with ``grpc_context=`` too when it declares that
parameter. Its response message is serialized here (the proxy passes the bytes on without
knowing their type); the context travels back with it, carrying what the method set:

- unary: the call's result is ``(response bytes, context)``;
- server streaming (a generator): each item is a response's bytes; one last item, the
  context itself, ends the stream.

A method that raises after setting a status code on its context raises
``gRPCStatusError`` (that code, those details) instead; any other exception goes as it is.
Nothing here imports grpc: the request, the response and the context are the user's objects.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from serval._private.replica.methods import Kind
from serval.exceptions import gRPCStatusError

__all__ = ["CONTEXT_PARAMETER", "grpc_entry"]

CONTEXT_PARAMETER = "grpc_context"  # Ray Serve's name for it

_TAKES_CONTEXT: dict[Any, bool] = {}


def grpc_entry(fn: Callable[..., Any], kind: Kind) -> Callable[..., Any]:
    """What a gRPC request calls, with ``(request, context)``: ``fn`` as Ray Serve calls it,
    its output serialized; of the same kind as ``fn``, so it runs where ``fn`` would."""
    name = getattr(fn, "__name__", "method")
    takes = _takes_context(fn)

    def call(request: Any, context: Any) -> Any:
        return fn(request, grpc_context=context) if takes else fn(request)

    if kind is Kind.ASYNC:

        async def unary_async(request: Any, context: Any) -> Any:
            try:
                value = await call(request, context)
            except Exception as exc:
                _raise_with_status(exc, context)
                raise
            return _serialized(value, name), context

        return unary_async
    if kind is Kind.SYNC:

        def unary(request: Any, context: Any) -> Any:
            try:
                value = call(request, context)
            except Exception as exc:
                _raise_with_status(exc, context)
                raise
            return _serialized(value, name), context

        return unary
    if kind is Kind.ASYNC_GEN:

        async def stream_async(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in call(request, context):
                    yield _serialized(item, name)
            except Exception as exc:
                _raise_with_status(exc, context)
                raise
            yield context

        return stream_async

    def stream(request: Any, context: Any) -> Iterator[Any]:
        try:
            for item in call(request, context):
                yield _serialized(item, name)
        except Exception as exc:
            _raise_with_status(exc, context)
            raise
        yield context

    return stream


def _takes_context(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` declares a ``grpc_context`` parameter (cached by its function)."""
    key = getattr(fn, "__func__", fn)
    found = _TAKES_CONTEXT.get(key)
    if found is None:
        try:
            found = CONTEXT_PARAMETER in inspect.signature(fn).parameters
        except (TypeError, ValueError):  # no signature to read: call it with the request only
            found = False
        _TAKES_CONTEXT[key] = found
    return found


def _serialized(message: Any, name: str) -> bytes:
    serialize = getattr(message, "SerializeToString", None)
    if serialize is None:
        raise TypeError(
            f"gRPC method {name} returned {type(message).__name__}, not a protobuf message "
            "(a gRPC method returns its response message, a generator yields them)"
        )
    data: bytes = serialize()
    return data


def _raise_with_status(exc: Exception, context: Any) -> None:
    """Raise ``exc`` wrapped with the status code the method set, if it set one (but OK)."""
    code = context.code()
    if code is not None and getattr(code, "name", None) != "OK":
        raise gRPCStatusError(exc, code, context.details()) from exc
