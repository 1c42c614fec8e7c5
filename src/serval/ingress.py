"""``@serve.ingress(app)``: serve a FastAPI (or any ASGI) app from a deployment class.

Routes declared on the class's methods (``@app.get("/x") def x(self, ...)``) are bound to the
replica's instance when the replica starts, so ``self`` is the deployment object and FastAPI
sees the remaining parameters only.
"""

from __future__ import annotations

import copyreg
import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ingress"]

C = TypeVar("C", bound=type)

ASGI_APP_ATTR = "_serval_asgi_app"


def ingress(app: Any) -> Callable[[C], C]:
    """Mark a deployment class as serving ``app`` (FastAPI, Starlette or any ASGI app), or the
    app a builder function returns (``def builder(): return FastAPI()``): as in Ray Serve, the
    builder is called in each replica, so an app that cannot travel is made where it runs."""
    if not callable(app):
        raise TypeError(f"serve.ingress expects an ASGI app such as FastAPI(), got {app!r}")
    _make_state_picklable()

    def decorator(cls: C) -> C:
        if not inspect.isclass(cls):
            raise TypeError("@serve.ingress decorates a class (put it under @serve.deployment)")
        for member in vars(cls).values():
            if inspect.isfunction(member):
                _resolve_annotations(member)
        setattr(cls, ASGI_APP_ATTR, app)
        return cls

    return decorator


def _resolve_annotations(fn: Any) -> None:
    """Turn string annotations (``from __future__ import annotations``) into the objects they
    name, here where the module is at hand: the class may travel to replicas by value, and then
    only the names its code uses come along, not those its annotations mention."""
    if not any(isinstance(a, str) for a in getattr(fn, "__annotations__", {}).values()):
        return
    try:
        fn.__annotations__ = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # a forward reference not defined yet: leave it for FastAPI to try
        return


def _make_state_picklable() -> None:
    """The app travels to replicas by value; Starlette's ``State`` resolves every attribute
    through ``__getattr__``, which recurses while unpickling. Pickle it by its contents."""
    try:
        from starlette.datastructures import State
    except ImportError:
        return
    copyreg.pickle(State, _reduce_state)


def _reduce_state(state: Any) -> tuple[Any, ...]:
    return (type(state), (dict(state._state),))


def asgi_app_for(instance: Any) -> Any | None:
    """The instance's ASGI app (built now, if a builder was given), with class-method routes
    bound to it; None if it has none."""
    app = getattr(type(instance), ASGI_APP_ATTR, None)
    if app is None:
        return None
    if _is_builder(app):
        app = app()
        if not callable(app):
            raise TypeError(f"the serve.ingress builder returned {app!r}, not an ASGI app")
    _bind_routes(app, instance)
    return app


def _is_builder(app: Any) -> bool:
    """A plain function that takes no argument (an ASGI app takes scope, receive, send)."""
    if not inspect.isfunction(app):
        return False
    params = inspect.signature(app).parameters.values()
    return not any(p.default is inspect.Parameter.empty for p in params)


def _bind_routes(app: Any, instance: Any) -> None:
    router = getattr(app, "router", None)
    routes = getattr(router, "routes", None)
    if routes is None:
        return
    for i, route in enumerate(routes):
        bound = _bound_endpoint(route, instance)
        if bound is not None:
            routes[i] = _rebuild(route, bound)


def _bound_endpoint(route: Any, instance: Any) -> Any | None:
    endpoint = getattr(route, "endpoint", None)
    if endpoint is None or not inspect.isfunction(endpoint):
        return None
    params = list(inspect.signature(endpoint).parameters)
    if not params or params[0] != "self":
        return None
    method = getattr(instance, endpoint.__name__, None)
    if method is None or getattr(method, "__func__", None) is not endpoint:
        return None
    return _bind(endpoint, instance)


def _bind(endpoint: Any, instance: Any) -> Any:
    """``endpoint`` with ``self`` filled in, as a function FastAPI can analyse: its signature
    lacks ``self`` and carries resolved annotations (string annotations, from
    ``from __future__ import annotations``, resolve in the endpoint's own module)."""
    try:
        sig = inspect.signature(endpoint, eval_str=True)
    except (NameError, TypeError, SyntaxError):
        sig = inspect.signature(endpoint)
    if inspect.iscoroutinefunction(endpoint):

        async def bound(*args: Any, **kwargs: Any) -> Any:
            return await endpoint(instance, *args, **kwargs)

    else:

        def bound(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            return endpoint(instance, *args, **kwargs)

    functools.update_wrapper(bound, endpoint)
    bound.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])  # type: ignore[attr-defined]
    return bound


def _rebuild(route: Any, endpoint: Any) -> Any:
    """A new route of the same type and settings, with ``endpoint`` (FastAPI analyses the
    endpoint's signature when a route is made, so the route must be made again)."""
    params = inspect.signature(type(route).__init__).parameters
    kwargs = {
        name: getattr(route, name)
        for name in params
        if name not in ("self", "endpoint") and hasattr(route, name)  # else: the default
    }
    if "path" in kwargs and hasattr(route, "path"):
        kwargs["path"] = route.path
    return type(route)(endpoint=endpoint, **kwargs)
