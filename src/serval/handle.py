"""Handles: how Python code calls a deployment.

``DeploymentHandle`` (what ``serve.run`` returns and what ``.bind()`` injects) returns a
``DeploymentResponse`` at once; ``await`` it or call ``.result()``. The ServeHandle guide's
handles are here too: ``RayServeSyncHandle.remote()`` blocks until the request is assigned to a
replica and returns an ``ObjectRef``; ``await RayServeHandle.remote()`` does the same on the
caller's loop. ``get`` and ``wait`` mirror ``ray.get`` and ``ray.wait``.

A call made with a running event loop in this thread is routed on that loop (no thread hop);
otherwise it belongs to the process's home loop, and this thread sends it when it can (see
``Router.submit_from_thread``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar, overload

from serval._private.caller import runtime
from serval._private.caller.calls import Call, NestedResponse, set_nested_resolver
from serval._private.caller.client import ClusterClient
from serval._private.replica import request_context
from serval.exceptions import GetTimeoutError, ServalError

__all__ = [
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "ObjectRef",
    "RayServeDeploymentHandle",
    "RayServeHandle",
    "RayServeSyncHandle",
    "get",
    "wait",
]

T = TypeVar("T")


@dataclass(frozen=True)
class _HandleOptions:
    method_name: str = "__call__"
    multiplexed_model_id: str = ""
    stream: bool = False
    by_reference: bool = False


class _Submitted:
    """The common part of responses and refs: a call and the loop that owns it."""

    __slots__ = ("_call", "_owner")

    def __init__(self, call: Call, owner: asyncio.AbstractEventLoop) -> None:
        self._call = call
        self._owner = owner

    def __reduce__(self) -> Any:
        # Met while a call's arguments are pickled: the router resolves it, then sends again.
        raise NestedResponse(f"{type(self).__name__} cannot be pickled; await it first")

    def _check_not_blocking_owner(self, what: str) -> None:
        if runtime.running_loop() is self._owner:
            raise RuntimeError(
                f"{what} would block the event loop this request runs on; use `await` instead"
            )

    def _result(self, timeout: float | None) -> Any:
        self._check_not_blocking_owner("a blocking get")
        return self._wait(timeout)

    def _wait(self, timeout: float | None) -> Any:
        try:
            return self._call.result_sync(timeout)
        except GetTimeoutError:
            if not self._call.done.fired:  # gave up on it: it holds no slot of ours now
                runtime.client(self._owner).release(self._call)
            raise

    def cancel(self) -> None:
        """Cancel the request; the replica sees ``asyncio.CancelledError`` at its next await."""
        call, owner = self._call, self._owner
        if call.done.fired:
            return
        client = runtime.client(owner)
        if runtime.running_loop() is owner:
            client.cancel(call)
        else:
            owner.call_soon_threadsafe(client.cancel, call)


class DeploymentResponse(_Submitted, Generic[T]):
    """The future result of ``handle.remote()``: ``await`` it or call ``result()``.

    Passing it as an argument to another ``.remote()`` call sends the value, once ready.
    """

    def __await__(self) -> Generator[Any, None, T]:
        # A plain generator over one future (no coroutine frames): the hot path of async callers.
        call = self._call
        if not call.done.fired:
            loop = asyncio.get_running_loop()
            fut = call.waiter_future(loop, owner=loop is self._owner)
            try:
                yield from fut
            except asyncio.CancelledError:
                self.cancel()  # a cancelled awaiter cancels the request it waits for
                raise
        return call.outcome()  # type: ignore[no-any-return]

    def result(self, timeout_s: float | None = None, *, _skip_asyncio_check: bool = False) -> T:
        """Block until the result is ready; ``TimeoutError`` after ``timeout_s`` seconds."""
        if _skip_asyncio_check:
            return self._wait(timeout_s)  # type: ignore[no-any-return]
        return self._result(timeout_s)  # type: ignore[no-any-return]

    async def _to_object_ref(self) -> ObjectRef:
        await self._call.assigned.wait()
        return ObjectRef(self._call, self._owner)

    def _to_object_ref_sync(self) -> ObjectRef:
        self._call.assigned.wait_sync(None)
        return ObjectRef(self._call, self._owner)

    def __repr__(self) -> str:
        state = "done" if self._call.done.fired else "pending"
        return f"DeploymentResponse({self._call.app}.{self._call.label}, {state})"


class _ByReferenceResponse(DeploymentResponse[T]):
    """A response whose call is a Ray actor call (``_by_reference=True``, the Ray backend):
    awaited and fetched as any response, and ``_to_object_ref`` gives the real
    ``ray.ObjectRef``."""

    def __init__(
        self, call: Call, owner: asyncio.AbstractEventLoop, ref: concurrent.futures.Future[Any]
    ) -> None:
        super().__init__(call, owner)
        self._ref = ref

    async def _to_object_ref(self) -> Any:
        return await asyncio.wrap_future(self._ref)

    def _to_object_ref_sync(self) -> Any:
        self._check_not_blocking_owner("_to_object_ref_sync()")
        return self._ref.result()

    def cancel(self) -> None:
        import ray

        if self._ref.done() and self._ref.exception() is None:
            ray.cancel(self._ref.result())


class DeploymentResponseGenerator(_Submitted):
    """The items of a streaming call, iterable with ``for`` or ``async for``."""

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        self._check_not_blocking_owner("iterating a stream synchronously")
        assert self._call.stream is not None
        return self._call.stream.next_sync(None)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        assert self._call.stream is not None
        return await self._call.stream.next_async()

    def __del__(self) -> None:
        # Nobody can read the rest: stop the generator instead of leaving it waiting for
        # credit (it holds a slot of its replica while it waits).
        try:
            stream = self._call.stream
            if stream is not None and not stream.ended:
                self.cancel()
        except Exception:  # at interpreter exit, or the loop is gone: nothing left to stop
            pass

    def __repr__(self) -> str:
        return f"DeploymentResponseGenerator({self._call.app}.{self._call.label})"


class ObjectRef(_Submitted):
    """A reference to the result of a request already assigned to a replica.

    ``await ref`` or ``serve.get(ref)`` give the value; ``serve.wait`` tells which are ready.
    """

    def __await__(self) -> Generator[Any, None, Any]:
        return self._call.result_async().__await__()

    def __repr__(self) -> str:
        state = "ready" if self._call.done.fired else "pending"
        return f"ObjectRef({self._call.app}.{self._call.label} on {self._call.replica}, {state})"


class _PendingRef:
    """What the async legacy handle's ``remote()`` returns: await it for the ``ObjectRef``.

    The request is already submitted; passing this, un-awaited, as an argument is allowed.
    """

    __slots__ = ("_call", "_owner")

    def __init__(self, call: Call, owner: asyncio.AbstractEventLoop) -> None:
        self._call = call
        self._owner = owner

    def __reduce__(self) -> Any:
        raise NestedResponse("an un-awaited legacy handle call cannot be pickled; await it first")

    def __await__(self) -> Generator[Any, None, ObjectRef]:
        return self._wait().__await__()

    async def _wait(self) -> ObjectRef:
        await self._call.assigned.wait()
        if self._call.done.fired and self._call.replica is None:
            self._call.outcome()  # failed before assignment: raise now (e.g. back pressure)
        return ObjectRef(self._call, self._owner)


# -- submission ---------------------------------------------------------------------------------


_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})


_PLAIN, _CLOUDPICKLE, _RESOLVE = 0, 1, 2


def _classify(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """_PLAIN: builtin scalars only, which the C pickler sends (cloudpickle costs several
    times more); _RESOLVE: a response or ref (serval's or Ray's) among them, to resolve
    before sending;
    _CLOUDPICKLE: anything else."""
    kind = _PLAIN
    for a in (*args, *kwargs.values()) if kwargs else args:
        if type(a) not in _SCALARS:
            if isinstance(a, (_Submitted, _PendingRef)) or _is_ray_ref(a):
                return _RESOLVE
            kind = _CLOUDPICKLE
    return kind


def _is_ray_ref(value: Any) -> bool:
    """A ``ray.ObjectRef`` (told without importing Ray: only Ray's refs are named so)."""
    cls = type(value)
    return cls.__name__ == "ObjectRef" and cls.__module__.startswith("ray")


async def _resolve(value: Any) -> Any:
    if isinstance(value, DeploymentResponseGenerator):
        raise TypeError("a streaming response cannot be passed as an argument")
    if isinstance(value, _Submitted):
        return await value._call.result_async()
    if isinstance(value, _PendingRef):
        return await value._call.result_async()
    if _is_ray_ref(value):  # (the guide's handles on Ray give them): its value, as Ray would
        return await value
    return value


class ResolvedResponse:
    """What a callee gets for a response that was nested in its arguments (in a list, a dict,
    a dataclass): its value, to ``await`` (as Ray Serve's callee does) or take with
    ``result()``."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def __await__(self) -> Generator[Any, None, Any]:
        return self._value
        yield  # (a generator: awaiting it finishes at once)

    def result(self, timeout_s: float | None = None) -> Any:
        return self._value

    def __reduce__(self) -> tuple[Any, ...]:
        return (ResolvedResponse, (self._value,))

    def __repr__(self) -> str:
        return f"ResolvedResponse({self._value!r})"


async def _resolve_nested(call: Call) -> None:
    """Replace the responses nested in ``call``'s arguments by ``ResolvedResponse``s."""
    call.args = tuple([(await _nested(a))[0] for a in call.args])
    call.kwargs = {k: (await _nested(v))[0] for k, v in call.kwargs.items()}


async def _nested(value: Any) -> tuple[Any, bool]:
    """(``value`` with its responses resolved, whether any was): containers are rebuilt only
    when they hold one (lists, tuples, named tuples, dicts, sets, dataclass instances)."""
    if isinstance(value, DeploymentResponseGenerator):
        raise TypeError("a streaming response cannot be passed as an argument")
    if isinstance(value, (_Submitted, _PendingRef)):
        return ResolvedResponse(await _resolve(value)), True
    if type(value) in _SCALARS:
        return value, False
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [await _nested(v) for v in value]
        if not any(changed for _, changed in items):
            return value, False
        values = [v for v, _ in items]
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*values), True
        return type(value)(values), True
    if isinstance(value, dict):
        pairs = [(k, await _nested(v)) for k, v in value.items()]
        if not any(changed for _, (_, changed) in pairs):
            return value, False
        return type(value)({k: v for k, (v, _) in pairs}), True
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: await _nested(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if not any(changed for _, changed in fields.values()):
            return value, False
        copied = copy.copy(value)
        for name, (v, _) in fields.items():
            object.__setattr__(copied, name, v)
        return copied, True
    return value, False


async def _resolve_then_submit(client: ClusterClient, call: Call) -> None:
    try:
        call.args = tuple([await _resolve(a) for a in call.args])
        call.kwargs = {k: await _resolve(v) for k, v in call.kwargs.items()}
    except BaseException as exc:  # an argument's own failure is this call's failure
        call.set_exception(exc)
        return
    client.submit(call)


def _submit(call: Call) -> asyncio.AbstractEventLoop:
    """Hand ``call`` to the right loop's client; returns that loop (the call's owner)."""
    loop = runtime.running_loop()
    kind = _classify(call.args, call.kwargs)
    call.plain = kind == _PLAIN
    resolve = kind == _RESOLVE
    if loop is not None:
        client = runtime.client(loop)
        if resolve:
            _resolve_on_loop(client, call)
        else:
            client.submit(call)
        return loop
    home = runtime.home_loop()
    client = runtime.client(home)
    if resolve:
        home.call_soon_threadsafe(_resolve_on_loop, client, call)
    else:
        client.submit_from_thread(call)
    return home


def _resolve_on_loop(client: ClusterClient, call: Call) -> None:
    """On the client's loop: resolve the call's arguments in a task of the client's."""
    try:
        client.tasks.spawn(_resolve_then_submit(client, call), client.loop)
    except RuntimeError:  # the client is closed
        call.set_exception(ServalError("serval has been shut down in this process"))


class _HandleBase:
    """Target (app, deployment) and options; method attributes return re-targeted copies."""

    def __init__(
        self, deployment_name: str, app_name: str, options: _HandleOptions | None = None
    ) -> None:
        self.deployment_name = deployment_name
        self.app_name = app_name
        self._options = options or _HandleOptions()
        # ``handle.method`` is written inside loops; make each method's handle once.
        self._methods: dict[str, Any] = {}

    def _copy(self, **changes: Any) -> Any:
        return type(self)(self.deployment_name, self.app_name, replace(self._options, **changes))

    def options(
        self,
        *,
        method_name: str | None = None,
        multiplexed_model_id: str | None = None,
        stream: bool | None = None,
        use_new_handle_api: bool | None = None,
        _by_reference: bool | None = None,
    ) -> Any:
        """A copy of this handle with other options (Ray Serve's names). ``_by_reference``
        (the Ray backend): each call is a Ray actor call, whose response's
        ``_to_object_ref()`` is a real ``ray.ObjectRef``."""
        changes: dict[str, Any] = {}
        if _by_reference is not None:
            changes["by_reference"] = _by_reference
        kind = type(self)
        if use_new_handle_api is True:  # Ray 2.7-2.9's switch to the new API
            kind = DeploymentHandle
        elif use_new_handle_api is False and kind is DeploymentHandle:
            kind = RayServeHandle  # ref = await h.remote(); await ref
        if method_name is not None:
            changes["method_name"] = method_name
        if multiplexed_model_id is not None:
            changes["multiplexed_model_id"] = multiplexed_model_id
        if stream is not None:
            changes["stream"] = stream
        if kind is not type(self):
            return kind(self.deployment_name, self.app_name, replace(self._options, **changes))
        return self._copy(**changes)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        handle = self._methods.get(name)
        if handle is None:
            handle = self._methods[name] = self._copy(method_name=name)
        return handle

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.deployment_name, self.app_name, self._options))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(app={self.app_name!r}, deployment={self.deployment_name!r}, "
            f"method={self._options.method_name!r})"
        )

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        opts = self._options
        meta: dict[str, Any] | None = None
        if opts.multiplexed_model_id:
            meta = {"multiplexed_model_id": opts.multiplexed_model_id}
        if opts.stream:
            meta = {**(meta or {}), "stream": True}
        parent = request_context.current_request()
        if parent is not None and "request_id" in parent:
            # a call made while serving a request is part of it: its log lines say which
            meta = {
                **(meta or {}),
                "request_id": parent["request_id"],
                "route": parent.get("route"),
            }
        return Call(
            self.app_name, self.deployment_name, opts.method_name, args, kwargs, meta, opts.stream
        )


class DeploymentHandle(_HandleBase):
    """Calls a deployment: ``handle.remote(...)``, ``handle.method.remote(...)``."""

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        call = self._call(args, kwargs)
        if self._options.by_reference:
            return _by_reference(call)
        owner = _submit(call)
        if self._options.stream:
            return DeploymentResponseGenerator(call, owner)
        return DeploymentResponse(call, owner)


def _by_reference(call: Call) -> _ByReferenceResponse[Any]:
    from serval._private.caller import by_reference

    if call.stream is not None:
        raise ValueError("stream=True cannot be combined with _by_reference=True")
    if any(isinstance(a, (_Submitted, _PendingRef)) for a in (*call.args, *call.kwargs.values())):
        raise TypeError(
            "a call by reference takes values (or ray.ObjectRefs) as arguments: "
            "await a DeploymentResponse before passing it"
        )
    owner = runtime.running_loop() or runtime.home_loop()
    return _ByReferenceResponse(call, owner, by_reference.submit(call, owner))


class RayServeSyncHandle(_HandleBase):
    """The guide's sync handle: ``remote()`` blocks until assigned and returns an ``ObjectRef``."""

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        call = self._call(args, kwargs)
        if _on_ray():  # the guide's handle on Ray: a real ray.ObjectRef (ray.get, ray.wait)
            return _by_reference(call)._to_object_ref_sync()
        owner = _submit(call)
        if runtime.running_loop() is owner:
            raise RuntimeError(
                "the sync handle blocks; inside an event loop use get_handle(sync=False)"
            )
        call.assigned.wait_sync(None)
        if call.done.fired and call.replica is None:
            call.outcome()  # failed before assignment (back pressure, unknown deployment)
        return ObjectRef(call, owner)


class RayServeHandle(_HandleBase):
    """The guide's asyncio handle: ``ref = await handle.remote(...)``; ``await ref``."""

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        call = self._call(args, kwargs)
        if _on_ray():  # on Ray: `await` gives a real ray.ObjectRef
            return _RayPendingRef(_by_reference(call))
        return _PendingRef(call, _submit(call))


class RayServeDeploymentHandle(RayServeHandle):
    """Ray 2.0-2.6's handle of a bound deployment, injected into a constructor whose parameter
    is annotated with it: ``ref = await self.handle.remote(x)``, then ``await ref``."""


class _RayPendingRef:
    """What the async legacy handle's ``remote()`` returns on Ray: await it for the
    ``ray.ObjectRef``."""

    __slots__ = ("_response",)

    def __init__(self, response: _ByReferenceResponse[Any]) -> None:
        self._response = response

    def __await__(self) -> Generator[Any, None, Any]:
        return self._response._to_object_ref().__await__()


def _on_ray() -> bool:
    """Whether this process's cluster runs on Ray (without importing Ray to know)."""
    address = runtime.address()
    return address is not None and address.startswith("ray:")


set_nested_resolver(_resolve_nested)


# -- get / wait ---------------------------------------------------------------------------------

_Waitable = _Submitted


@overload
def get(refs: _Waitable, *, timeout: float | None = None) -> Any: ...
@overload
def get(refs: Sequence[_Waitable], *, timeout: float | None = None) -> list[Any]: ...


def get(refs: Any, *, timeout: float | None = None) -> Any:
    """The value of a ref (or response), or the values of a list of them, like ``ray.get``.

    Raises ``GetTimeoutError`` (a ``TimeoutError``) if not ready within ``timeout`` seconds, and
    the user's exception if the request failed.
    """
    if _ray_refs(refs):
        import ray

        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise GetTimeoutError(str(exc)) from None
    if isinstance(refs, (list, tuple)):
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        for ref in refs:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            out.append(_as_ref(ref)._result(left))
        return out
    return _as_ref(refs)._result(timeout)


def wait(
    refs: Sequence[Any], *, num_returns: int = 1, timeout: float | None = None
) -> tuple[list[Any], list[Any]]:
    """Wait until ``num_returns`` of ``refs`` are ready or ``timeout`` passes, like ``ray.wait``.

    Returns ``(ready, not_ready)``, each in the order of ``refs``.
    """
    if refs and _ray_refs(refs):
        import ray

        return ray.wait(list(refs), num_returns=num_returns, timeout=timeout)
    items = [_as_ref(r) for r in refs]
    if len({id(r) for r in items}) != len(items):
        raise ValueError("wait() got the same ref twice")
    if not 0 <= num_returns <= len(items):
        raise ValueError(f"num_returns must be between 0 and {len(items)}, got {num_returns}")
    for r in items:
        if not r._call.done.fired:
            r._check_not_blocking_owner("wait()")
    enough = threading.Event()
    lock = threading.Lock()
    count = [0]

    def one_done() -> None:
        with lock:
            count[0] += 1
            if count[0] >= num_returns:
                enough.set()

    if num_returns == 0:
        enough.set()
    for r in items:
        r._call.done.add_callback(one_done)
    enough.wait(timeout)
    ready: list[Any] = []
    not_ready: list[Any] = []
    for original, r in zip(refs, items, strict=True):
        (ready if r._call.done.fired and len(ready) < num_returns else not_ready).append(original)
    return ready, not_ready


def _ray_refs(refs: Any) -> bool:
    """Whether ``refs`` are ``ray.ObjectRef``s (by-reference calls on the Ray backend)."""
    if isinstance(refs, (list, tuple)):
        return bool(refs) and all(_is_ray_ref(r) for r in refs)
    return _is_ray_ref(refs)


def _as_ref(value: Any) -> _Submitted:
    if isinstance(value, _Submitted):
        return value
    if isinstance(value, _PendingRef):
        raise TypeError("await the async handle's remote() first: `ref = await handle.remote()`")
    raise TypeError(f"expected an ObjectRef or DeploymentResponse, got {type(value).__name__}")
