"""``@serve.batch``: callers send one item each; the decorated function sees them as a list.

Ray Serve's semantics: requests queue up; a batch is formed when ``max_batch_size`` items wait
or ``batch_wait_timeout_s`` has passed since the oldest waiting item arrived; at most
``max_concurrent_batches`` batches run at once. The function returns one result per input, in
order. If it raises, every caller of that batch gets the exception and later batches still run.

With ``batch_size_fn`` (Ray Serve's), a batch's size is what that function says of its items
(total tokens, graph nodes...) instead of their count: the batch closes, and goes at once, when
it reaches ``max_batch_size`` or when the next waiting item would take it past that; an item
too large to fit even alone fails its caller with a ``RuntimeError``, as does one for which
``batch_size_fn`` raises (with that exception), without closing the batch it was measured
with. Items keep their order.

Queues are created lazily, on the event loop of the first call, one per instance for methods.
Nothing made at decoration time holds a loop, a lock or a task, so a class using ``@batch``
can be pickled (by value, with cloudpickle) and shipped to a replica process.

A batch function may also be an async generator (Ray Serve's streaming batches): each step
yields one output per input, in order, and each caller iterates its own stream of outputs.
``StopIteration`` (the class or an instance) in a caller's place ends that caller's stream;
the generator's end ends every stream; if it raises, every open stream raises. Once every
caller has stopped listening, the generator is closed at its next step.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import inspect
import itertools
import math
import weakref
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    MutableMapping,
)
from typing import Any, Protocol, TypeGuard, TypeVar, overload

from serval._private.replica import request_context

__all__ = ["BatchedFunction", "BatchedMethod", "BatchedStream", "BatchedStreamMethod", "batch"]

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")
S_contra = TypeVar("S_contra", contravariant=True)
T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)

# Key of the dict, in a decorated method's instance, that holds that instance's queues.
_QUEUES_ATTR = "__serval_batch_queues__"
# The shortest wait for a batch to fill: the resolution of the event loop's timers.
_MIN_SLEEP_S = 0.001


class _BatchControls(Protocol):
    def set_max_batch_size(self, new_max_batch_size: int) -> None: ...

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None: ...


class BatchedFunction(_BatchControls, Protocol[T_contra, R_co]):
    """A batched function (or a batched method, bound): called with one item, awaits one result."""

    def __call__(self, item: T_contra, /) -> Coroutine[Any, Any, R_co]: ...


class BatchedMethod(_BatchControls, Protocol[S_contra, T_contra, R_co]):
    """A batched method, as found on its class; bound to an instance it is a BatchedFunction."""

    def __call__(self, instance: S_contra, item: T_contra, /) -> Coroutine[Any, Any, R_co]: ...

    @overload
    def __get__(
        self, instance: None, owner: type[Any], /
    ) -> BatchedMethod[S_contra, T_contra, R_co]: ...

    @overload
    def __get__(
        self, instance: S_contra, owner: type[Any] | None = None, /
    ) -> BatchedFunction[T_contra, R_co]: ...


class BatchedStream(_BatchControls, Protocol[T_contra, R_co]):
    """A streaming batched function (or method, bound): called with one item, iterates the
    outputs the batch generator yields for it."""

    def __call__(self, item: T_contra, /) -> AsyncIterator[R_co]: ...


class BatchedStreamMethod(_BatchControls, Protocol[S_contra, T_contra, R_co]):
    """A streaming batched method, as found on its class."""

    def __call__(self, instance: S_contra, item: T_contra, /) -> AsyncIterator[R_co]: ...

    @overload
    def __get__(
        self, instance: None, owner: type[Any], /
    ) -> BatchedStreamMethod[S_contra, T_contra, R_co]: ...

    @overload
    def __get__(
        self, instance: S_contra, owner: type[Any] | None = None, /
    ) -> BatchedStream[T_contra, R_co]: ...


class _BatchDecorator(Protocol):
    @overload
    def __call__(
        self, func: Callable[[list[T]], Awaitable[Iterable[R]]], /
    ) -> BatchedFunction[T, R]: ...

    @overload
    def __call__(
        self, func: Callable[[S, list[T]], Awaitable[Iterable[R]]], /
    ) -> BatchedMethod[S, T, R]: ...

    @overload
    def __call__(
        self, func: Callable[[list[T]], AsyncIterator[Iterable[R]]], /
    ) -> BatchedStream[T, R]: ...

    @overload
    def __call__(
        self, func: Callable[[S, list[T]], AsyncIterator[Iterable[R]]], /
    ) -> BatchedStreamMethod[S, T, R]: ...


SizeFn = Callable[[list[Any]], int]


@dataclasses.dataclass
class _Settings:
    max_batch_size: int
    batch_wait_timeout_s: float
    max_concurrent_batches: int
    batch_size_fn: SizeFn | None = None


@dataclasses.dataclass(slots=True)
class _Request:
    item: Any
    # The result of a plain batch. For a streaming one: done once the stream has ended or its
    # caller stopped listening; the outputs go to ``outputs``.
    future: asyncio.Future[Any]
    arrived: float
    outputs: asyncio.Queue[tuple[int, Any]] | None = None


# What a streaming request's queue carries: (_ITEM, output), (_END, None), (_ERROR, exception).
_ITEM, _END, _ERROR = 0, 1, 2
_STOP_MARKERS = (StopIteration, StopAsyncIteration)


class _BatchQueue:
    """Waiting requests of one batched function (or one instance's method) on one event loop."""

    def __init__(
        self,
        call: Callable[[list[Any]], Any],
        settings: _Settings,
        name: str,
        streaming: bool,
        model_id: str = "",
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._call = call
        # The multiplexed model id every request here names ("": none): batches are split by
        # model, and get_multiplexed_model_id() in the batch returns it, as in Ray Serve.
        self._model_id = model_id
        self._streaming = streaming
        self._settings = settings  # shared with the decorator, so set_* apply at once
        self._name = name
        self._pending: deque[_Request] = deque()
        self._running = 0
        self._runner: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()  # the loop itself keeps only weak refs
        # With batch_size_fn: how many waiting requests, from the front, are known to fit in
        # one batch, and whether the batch they make is closed (full, or the next one does not
        # fit). Measured as requests arrive; forgotten when the front of the queue changes.
        self._fits = 0
        self._closed = False

    async def submit(self, item: Any) -> Any:
        request = _Request(item, self.loop.create_future(), self.loop.time())
        self._pending.append(request)
        self._on_arrival()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._withdraw(request)
            raise

    async def stream(self, item: Any) -> AsyncGenerator[Any, None]:
        """The outputs of a streaming batch function for ``item``."""
        outputs: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        request = _Request(item, self.loop.create_future(), self.loop.time(), outputs)
        self._pending.append(request)
        self._on_arrival()
        try:
            while True:
                kind, value = await outputs.get()
                if kind == _ITEM:
                    yield value
                elif kind == _END:
                    return
                else:
                    raise value
        finally:
            # Ended, or the caller stopped listening: no batch needs to produce for it.
            if not request.future.done():
                request.future.cancel()
            self._withdraw(request)

    def poke(self) -> None:
        """Make the runner look again: a batch filled or finished."""
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def settings_changed(self) -> None:
        self._forget_sizes()  # measured against the old max_batch_size
        self.poke()

    def _on_arrival(self) -> None:
        if self._runner is None or self._runner.done():
            # A fresh context: a batch serves many requests, so it must not run with (and leak)
            # the request context of whichever caller happened to start the runner.
            context = contextvars.Context()
            if self._model_id:
                context.run(request_context.set_request, {"multiplexed_model_id": self._model_id})
            self._runner = self.loop.create_task(self._run(), context=context)
        elif self._settings.batch_size_fn is None:
            if len(self._pending) == self._settings.max_batch_size:
                self.poke()
        elif self._batch_closed():
            self.poke()

    def _withdraw(self, request: _Request) -> None:
        # The caller went away before its batch started: it must not take a place in one.
        try:
            self._pending.remove(request)
        except ValueError:
            return  # already taken into a batch, whose result will be dropped
        self._forget_sizes()

    def _forget_sizes(self) -> None:
        self._fits = 0
        self._closed = False

    def _batch_closed(self) -> bool:
        """With batch_size_fn: measure the waiting requests from the front until the batch
        they make is closed; whether it is. A request that cannot go in any batch is failed
        and leaves the queue here."""
        size_fn = self._settings.batch_size_fn
        assert size_fn is not None
        limit = self._settings.max_batch_size
        pending = self._pending
        while not self._closed and self._fits < len(pending):
            at = self._fits
            try:
                size = _measured(size_fn, [r.item for r in itertools.islice(pending, at + 1)])
                # An item that does not fit: alone, would it? (if not, it never will)
                alone = size if at == 0 or size <= limit else _measured(size_fn, [pending[at].item])
            except Exception as exc:  # batch_size_fn failed on this request's item
                _fail(pending[at], exc)
                del pending[at]
                continue
            if size <= limit:
                self._fits = at + 1
                self._closed = size == limit
            elif alone > limit:
                _fail(
                    pending[at],
                    RuntimeError(
                        f"Size of item is greater than max_batch_size ({alone} > {limit}) in "
                        f"@serve.batch function {self._name}: increase max_batch_size or check "
                        "the batch_size_fn."
                    ),
                )
                del pending[at]
            else:
                self._closed = True  # the next request would take the batch past the limit
        return self._closed

    async def _run(self) -> None:
        # Runs only while requests wait, so an idle queue owns no task at all.
        while self._pending:
            delay = self._time_to_next_batch()
            if delay > 0:
                # uvloop rounds timers to whole milliseconds, so a shorter sleep returns at
                # once and the loop would spin until the deadline: overshoot it a little instead.
                await self._sleep(max(delay, _MIN_SLEEP_S))
                continue
            batch = self._take_batch()
            if batch:
                self._start_batch(batch)

    def _time_to_next_batch(self) -> float:
        settings = self._settings
        if self._running >= settings.max_concurrent_batches:
            return math.inf  # woken when a batch finishes
        if settings.batch_size_fn is None:
            if len(self._pending) >= settings.max_batch_size:
                return 0.0
        elif self._batch_closed() or not self._pending:  # (measuring may fail them all)
            return 0.0
        # Measured from the oldest arrival: requests that queued behind a running batch have
        # already waited, so they go as soon as a slot frees up.
        return self._pending[0].arrived + settings.batch_wait_timeout_s - self.loop.time()

    async def _sleep(self, delay: float) -> None:
        wakeup = self._wakeup = self.loop.create_future()
        timer = None if math.isinf(delay) else self.loop.call_later(delay, _resolve, wakeup)
        try:
            await wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    def _take_batch(self) -> list[_Request]:
        pending = self._pending
        if self._settings.batch_size_fn is not None:
            # Exactly the requests measured to fit (up to where the batch closes, or all).
            self._batch_closed()
            taken = [pending.popleft() for _ in range(self._fits)]
            self._forget_sizes()
            return [request for request in taken if not request.future.done()]
        batch: list[_Request] = []
        while pending and len(batch) < self._settings.max_batch_size:
            request = pending.popleft()
            if not request.future.done():  # cancelled, but its caller has not withdrawn it yet
                batch.append(request)
        return batch

    def _start_batch(self, batch: list[_Request]) -> None:
        self._running += 1
        run = self._execute_stream if self._streaming else self._execute
        task = self.loop.create_task(run(batch))
        self._batches.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        self._running -= 1
        self.poke()

    async def _execute(self, batch: list[_Request]) -> None:
        try:
            returned = await self._call([request.item for request in batch])
            results = _check_results(returned, len(batch), self._name)
        except Exception as exc:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
        except BaseException:  # cancelled (the loop is closing): nobody will get a result
            for request in batch:
                request.future.cancel()
            raise
        else:
            for request, result in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(result)

    async def _execute_stream(self, batch: list[_Request]) -> None:
        steps = self._call([request.item for request in batch])
        try:
            async for step in steps:
                outputs = _check_results(step, len(batch), self._name)
                for request, output in zip(batch, outputs, strict=True):
                    if request.future.done():  # its stream has ended, or nobody listens
                        continue
                    if _is_stop(output):
                        _end_stream(request, _END, None)
                    else:
                        assert request.outputs is not None
                        request.outputs.put_nowait((_ITEM, output))
                if all(request.future.done() for request in batch):
                    break  # nobody left to produce for
        except Exception as exc:
            for request in batch:
                _end_stream(request, _ERROR, exc)
        except BaseException:  # cancelled (the loop is closing)
            for request in batch:
                _end_stream(request, _ERROR, asyncio.CancelledError())
            raise
        finally:
            await steps.aclose()  # runs the generator's cleanup if it was left early
            for request in batch:
                _end_stream(request, _END, None)


def _measured(size_fn: SizeFn, items: list[Any]) -> float:
    size = size_fn(items)
    if isinstance(size, bool) or not isinstance(size, int | float) or math.isnan(size):
        raise TypeError(f"batch_size_fn must return a number, got {size!r}")
    return size


def _fail(request: _Request, exc: BaseException) -> None:
    """Fail a request that never joined a batch."""
    if request.outputs is not None:
        _end_stream(request, _ERROR, exc)
    elif not request.future.done():
        request.future.set_exception(exc)


def _is_stop(output: Any) -> bool:
    # Identity, not ==: an output may be an array, whose == is elementwise.
    return any(output is marker for marker in _STOP_MARKERS) or isinstance(output, _STOP_MARKERS)


def _end_stream(request: _Request, kind: int, value: Any) -> None:
    if not request.future.done():
        request.future.set_result(None)
        assert request.outputs is not None
        request.outputs.put_nowait((kind, value))


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _check_results(returned: object, expected: int, name: str) -> list[Any]:
    # str, bytes and mappings have a length but are not one result per input: almost surely a bug.
    if isinstance(returned, str | bytes | Mapping) or not _sized_iterable(returned):
        raise TypeError(
            f"@serve.batch function {name} must return a list with one result per input "
            f"(expected length {expected}), but it returned a {type(returned).__name__}"
        )
    results = list(returned)
    if len(results) != expected:
        raise ValueError(
            f"@serve.batch function {name} returned {len(results)} results for a batch of "
            f"{expected} inputs: expected length {expected}, actual length {len(results)}"
        )
    return results


def _sized_iterable(value: object) -> TypeGuard[Iterable[Any]]:
    return hasattr(value, "__len__") and isinstance(value, Iterable)


class _Batcher:
    """One per decorated function: its settings, and its queues (per instance, per loop)."""

    def __init__(self, fn: Callable[..., Any], settings: _Settings, is_method: bool):
        self.fn = fn
        self.settings = settings
        self.is_method = is_method
        self.streaming = inspect.isasyncgenfunction(fn)
        self.name = getattr(fn, "__qualname__", repr(fn))
        self._reset_runtime_state()

    def _reset_runtime_state(self) -> None:
        self._function_queues: dict[None, _BatchQueue] = {}
        self._live: weakref.WeakSet[_BatchQueue] = weakref.WeakSet()

    def __getstate__(self) -> dict[str, Any]:
        # Queues hold a loop, futures and tasks of one process; the receiver makes its own.
        keep = ("fn", "settings", "is_method", "streaming", "name")
        return {key: self.__dict__[key] for key in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime_state()

    async def submit(self, instance: Any, item: Any) -> Any:
        return await self._queue_for(instance).submit(item)

    def stream(self, instance: Any, item: Any) -> AsyncGenerator[Any, None]:
        return self._queue_for(instance).stream(item)

    def set_max_batch_size(self, new_max_batch_size: int) -> None:
        _check_count("max_batch_size", new_max_batch_size)
        self.settings.max_batch_size = new_max_batch_size
        self._poke_all()

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None:
        _check_timeout(new_batch_wait_timeout_s)
        self.settings.batch_wait_timeout_s = new_batch_wait_timeout_s
        self._poke_all()

    def _poke_all(self) -> None:
        # A waiting batch may now be full, or its wait over. A queue lives on one loop, so it is
        # poked from that loop (set_* may be called from a thread, e.g. a sync method).
        for queue in list(self._live):
            if not queue.loop.is_closed():
                queue.loop.call_soon_threadsafe(queue.settings_changed)

    def _queue_for(self, instance: Any) -> _BatchQueue:
        queues, key = self._queues_of(instance)
        meta = request_context.current_request()
        model_id = str(meta.get("multiplexed_model_id") or "") if meta else ""
        if model_id:  # a queue per model: requests for different models never share a batch
            key = (key, model_id)
        queue = queues.get(key)
        if queue is None or queue.loop is not asyncio.get_running_loop():
            call = functools.partial(self.fn, instance) if self.is_method else self.fn
            queue = _BatchQueue(call, self.settings, self.name, self.streaming, model_id)
            queues[key] = queue
            self._live.add(queue)
        return queue

    def _queues_of(self, instance: Any) -> tuple[MutableMapping[Any, _BatchQueue], Any]:
        if not self.is_method:
            return self._function_queues, None
        try:
            # Kept on the instance, so they live and die with it, even if it is unhashable.
            queues: dict[_Batcher, _BatchQueue] = vars(instance).setdefault(_QUEUES_ATTR, {})
        except TypeError:
            raise TypeError(
                f"@serve.batch method {self.name} keeps its queue on the instance, but "
                f"{type(instance).__name__} has no __dict__ (add '__dict__' to its __slots__)"
            ) from None
        return queues, self


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_timeout(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"batch_wait_timeout_s must be a number of seconds, got {value!r}")
    if not value >= 0:  # also rejects NaN
        raise ValueError(f"batch_wait_timeout_s must be >= 0, got {value}")


def _positional_arity(fn: Callable[..., Any]) -> int:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = inspect.signature(fn).parameters.values()
    return sum(1 for p in params if p.kind in kinds and p.default is inspect.Parameter.empty)


def _check_function(fn: object) -> bool:
    """Reject what cannot be batched; return whether fn is a method (takes self, then the list)."""
    if not callable(fn):
        raise TypeError(
            f"@serve.batch decorates an async function or method, got {fn!r}; "
            "pass settings by keyword, e.g. @serve.batch(max_batch_size=8)"
        )
    name = getattr(fn, "__qualname__", repr(fn))
    if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
        raise TypeError(
            f"@serve.batch needs an async function (async def); {name} is not one. "
            "Make it `async def`, taking a list and returning a list of the same length "
            "(or, to stream, yielding such lists)."
        )
    arity = _positional_arity(fn)
    if arity not in (1, 2):
        raise TypeError(
            f"@serve.batch: {name} must take exactly one list argument (after self for a "
            f"method), but it has {arity} required positional parameters"
        )
    return arity == 2


def _decorate(fn: Any, settings: _Settings) -> Any:
    batcher = _Batcher(fn, settings, _check_function(fn))
    expected = 2 if batcher.is_method else 1

    def check(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if kwargs or len(args) != expected:
            raise TypeError(
                f"{batcher.name} is batched with @serve.batch: call it with one item "
                f"(one positional argument), got {len(args) - expected + 1} positional "
                f"and {len(kwargs)} keyword arguments"
            )

    async def batched(*args: Any, **kwargs: Any) -> Any:
        check(args, kwargs)
        return await batcher.submit(args[0] if batcher.is_method else None, args[-1])

    async def batched_stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        check(args, kwargs)
        outputs = batcher.stream(args[0] if batcher.is_method else None, args[-1])
        try:
            async for output in outputs:
                yield output
        finally:  # at once, not when the collector gets to it: the batch learns we left
            await outputs.aclose()

    wrapper: Any = batched_stream if batcher.streaming else batched
    functools.update_wrapper(wrapper, fn)
    # Plain function attributes: a bound method forwards attribute lookups to its function,
    # so `self.handle_batch.set_max_batch_size(5)` works as in Ray Serve.
    wrapper.__dict__.update(
        set_max_batch_size=batcher.set_max_batch_size,
        set_batch_wait_timeout_s=batcher.set_batch_wait_timeout_s,
        _serval_batcher=batcher,
    )
    return wrapper


@overload
def batch(
    _func: Callable[[list[T]], Awaitable[Iterable[R]]],
    /,
    *,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: SizeFn | None = None,
) -> BatchedFunction[T, R]: ...


@overload
def batch(
    _func: Callable[[S, list[T]], Awaitable[Iterable[R]]],
    /,
    *,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: SizeFn | None = None,
) -> BatchedMethod[S, T, R]: ...


@overload
def batch(
    _func: Callable[[list[T]], AsyncIterator[Iterable[R]]],
    /,
    *,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: SizeFn | None = None,
) -> BatchedStream[T, R]: ...


@overload
def batch(
    _func: Callable[[S, list[T]], AsyncIterator[Iterable[R]]],
    /,
    *,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: SizeFn | None = None,
) -> BatchedStreamMethod[S, T, R]: ...


@overload
def batch(
    _func: None = None,
    /,
    *,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: SizeFn | None = None,
) -> _BatchDecorator: ...


def batch(
    _func: Any = None,
    /,
    *,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: SizeFn | None = None,
) -> Any:
    """Batch calls to an async function or method that takes a list and returns a list.

    Usable bare (``@batch``) or with settings (``@batch(max_batch_size=32)``). Callers pass one
    item and await one result; if the function is an async generator yielding lists, each
    caller iterates its own outputs instead (``StopIteration`` in its place ends them). The
    decorated function has ``set_max_batch_size(n)`` and
    ``set_batch_wait_timeout_s(t)`` to change its settings at run time; on a method they are
    shared by all instances of the class (one per replica in a deployment).

    ``batch_size_fn(items) -> int`` measures a batch by its items instead of their number:
    ``max_batch_size`` is then a limit on that measure (see the module's docstring).
    """
    _check_count("max_batch_size", max_batch_size)
    _check_timeout(batch_wait_timeout_s)
    _check_count("max_concurrent_batches", max_concurrent_batches)
    if batch_size_fn is not None and not callable(batch_size_fn):
        raise TypeError(f"batch_size_fn must be a callable or None, got {batch_size_fn!r}")
    settings = _Settings(
        max_batch_size, float(batch_wait_timeout_s), max_concurrent_batches, batch_size_fn
    )
    if _func is None:
        # Each function decorated by this decorator gets its own copy of the settings.
        return lambda fn: _decorate(fn, dataclasses.replace(settings))
    return _decorate(_func, settings)
