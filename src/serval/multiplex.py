"""``@serve.multiplexed``: many models per replica, loaded on demand, least recently used out.

The decorated async loader takes a model id and returns the model. Each replica keeps at most
``max_num_models_per_replica`` models; loading a new one evicts the least recently used. The
replica reports which models it holds, so routers send a request for a model to a replica that
already has it when one can take it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from serval._private.caller import runtime
from serval._private.replica import request_context
from serval._private.telemetry import metrics

__all__ = ["get_multiplexed_model_id", "multiplexed"]

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def get_multiplexed_model_id() -> str:
    """The model id of the request being served ('' when it names none).

    Set by ``handle.options(multiplexed_model_id=...)`` or the HTTP header
    ``serve_multiplexed_model_id``.
    """
    meta = request_context.current_request()
    return str(meta.get("multiplexed_model_id", "")) if meta else ""


class _CacheMetrics:
    """Ray Serve's multiplexing metrics, in the replica's registry under its tags (nothing is
    recorded outside a replica: local testing mode has no scrape)."""

    def __init__(self) -> None:
        me = runtime.replica()
        self.tags: tuple[str, ...] | None = (
            None if me is None else (me.deployment, me.replica_id, me.app)
        )
        if self.tags is not None:
            for family in metrics.MULTIPLEX_FAMILIES:
                metrics.REGISTRY.register(family)

    def asked(self) -> None:
        if self.tags is not None:
            metrics.REGISTRY.add("serve_multiplexed_get_model_requests_counter", self.tags, 1.0)

    def changed(self, model_id: str, loaded: bool, took_s: float, now_held: int) -> None:
        if self.tags is None:
            return
        registry, tags = metrics.REGISTRY, self.tags
        kind = "load" if loaded else "unload"
        registry.observe(f"serve_multiplexed_model_{kind}_latency_ms", tags, took_s * 1000)
        registry.add(f"serve_multiplexed_models_{kind}_counter", tags, 1.0)
        registry.set("serve_num_multiplexed_models", tags, float(now_held))
        registry.set(
            "serve_registered_multiplexed_model_id", (*tags, model_id), 1.0 if loaded else 0.0
        )


class _ModelCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.loading: dict[str, asyncio.Future[Any]] = {}
        self.metrics = _CacheMetrics()

    async def get(self, model_id: str, load: Callable[[], Awaitable[Any]]) -> Any:
        self.metrics.asked()
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        pending = self.loading.get(model_id)
        if pending is not None:  # someone is loading it already: share that load
            return await asyncio.shield(pending)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.loading[model_id] = fut
        try:
            while len(self.models) >= self.capacity:
                self._evict()
            started = time.perf_counter()
            model = await load()
            took = time.perf_counter() - started
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            self.loading.pop(model_id, None)
        fut.set_result(model)
        self.models[model_id] = model
        request_context.report_models(list(self.models))
        self.metrics.changed(model_id, True, took, len(self.models))
        return model

    def _evict(self) -> None:
        started = time.perf_counter()
        model_id, model = self.models.popitem(last=False)
        logger.info("unloading model %s (least recently used)", model_id)
        request_context.report_models(list(self.models))
        del model  # the cache held the last reference the framework had (its __del__ runs)
        self.metrics.changed(model_id, False, time.perf_counter() - started, len(self.models))


def multiplexed(func: F | None = None, *, max_num_models_per_replica: int = 3) -> Any:
    """Decorate an async model loader ``async def get_model(self, model_id)``."""
    if not isinstance(max_num_models_per_replica, int) or max_num_models_per_replica < 1:
        raise ValueError("max_num_models_per_replica must be an int >= 1")

    def decorate(fn: F) -> F:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@serve.multiplexed needs an async function; {fn.__name__} is not")
        # The cache lives on the instance (not in a closure of weak references): the class
        # travels to replicas by value, and the closure must pickle.
        attr = f"_serval_models_{fn.__name__}"
        plain_cache: list[_ModelCache] = []

        def cache_for(owner: Any) -> _ModelCache:
            if owner is None:
                if not plain_cache:
                    plain_cache.append(_ModelCache(max_num_models_per_replica))
                return plain_cache[0]
            cache: _ModelCache | None = owner.__dict__.get(attr)
            if cache is None:
                cache = _ModelCache(max_num_models_per_replica)
                setattr(owner, attr, cache)
            return cache

        @functools.wraps(fn)
        async def wrapper(*args: Any) -> Any:
            if len(args) == 2:
                owner, model_id = args
            elif len(args) == 1:
                owner, model_id = None, args[0]
            else:
                raise TypeError(f"{fn.__name__} takes exactly one model id")
            if not isinstance(model_id, str) or not model_id:
                raise ValueError(f"model id must be a non-empty string, got {model_id!r}")
            return await cache_for(owner).get(model_id, lambda: fn(*args))

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate
