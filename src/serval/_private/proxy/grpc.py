"""The gRPC proxy: a ``grpc.aio`` server beside uvicorn in the proxy process, on the same
event loop and the same ``ClusterClient``, as Ray Serve's gRPC proxy behaves.

Which methods exist comes from the user's ``grpc_servicer_functions`` (grpcio-tools'
``add_<Service>Servicer_to_server``): each is called once with a stand-in servicer and a
recorder in place of the server, which keeps the method handlers it is given; they say how a
request is deserialized and whether the method streams. A request is then routed:

- to an application by the ``application`` metadata key (when absent and exactly one app is
  deployed, to that one; else NOT_FOUND), to its ingress deployment, as Ray Serve does: only
  apps with a route prefix have an ingress the proxies route to;
- to the deployment's method named as the gRPC method (``/pkg.Service/Predict`` ->
  ``Predict``), with the request message, and a ``RayServegRPCContext`` when the method takes
  ``grpc_context`` (see ``replica.grpc``); unary-unary, and unary-stream (the method is a
  generator). Client streaming is answered UNIMPLEMENTED.

The replica serializes the response; its bytes go out as they are, with what the method set on
its context (code, details, trailing metadata, compression) and ``request_id`` in the trailing
metadata. Errors become status codes, never a traceback: a user exception INTERNAL with its
type and message (or the code the method set before raising), back pressure
RESOURCE_EXHAUSTED, no replica to take it UNAVAILABLE, ``request_timeout_s`` passed
DEADLINE_EXCEEDED. Ray Serve's ``/ray.serve.RayServeAPIService/Healthz`` and
``ListApplications`` are served here (their messages are encoded by hand: the proxy needs no
protobuf; ``serval.generated`` has them for clients).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, NoReturn

import grpc
import grpc.aio

from serval._private.caller.calls import Call
from serval._private.caller.client import ClusterClient
from serval._private.telemetry.ingress import RequestMetrics
from serval._private.wire.protocol import safe_str
from serval.config import HTTPOptions, gRPCOptions
from serval.exceptions import (
    BackPressureError,
    DeploymentNotFoundError,
    DeploymentUnavailableError,
    ReplicaDiedError,
    RequestCancelledError,
    UserCodeError,
    gRPCStatusError,
)
from serval.grpc_util import RayServegRPCContext

__all__ = ["GrpcProxy", "start_grpc"]

logger = logging.getLogger("serval.proxy")

SERVE_API = "/ray.serve.RayServeAPIService/"
HEALTHZ = SERVE_API + "Healthz"
LIST_APPLICATIONS = SERVE_API + "ListApplications"
HEALTHY_MESSAGE = "success"
DRAINING_MESSAGE = "This node is being drained."
# Status details travel in HTTP/2 trailers, whose size is limited (8 KiB by default).
_MAX_DETAILS = 4096
_SEND_LIMIT = 2**31 - 1  # grpc's own ceiling: responses come from the cluster's replicas
_ID_PREFIX = uuid.uuid4().hex[:16]
_ids = itertools.count(1)
_OK, _CANCELLED = grpc.StatusCode.OK, grpc.StatusCode.CANCELLED
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_NAMES = {code: code.name for code in grpc.StatusCode}  # (an enum's .name is a slow property)


async def start_grpc(
    client: ClusterClient,
    options: HTTPOptions,
    draining: Callable[[], bool],
    recorded: RequestMetrics,
    reuse_port: bool = False,
) -> grpc.aio.Server:
    """Listen for gRPC on ``options.host`` and ``options.grpc_options.port`` and serve the
    cluster's apps there, counting requests into ``recorded``; raises (ImportError,
    RuntimeError, ...) when that cannot be."""
    grpc_options = options.grpc_options
    assert grpc_options is not None and grpc_options.enabled
    methods = load_methods(grpc_options)
    proxy = GrpcProxy(client, grpc_options, methods, draining, recorded)
    server = grpc.aio.server(
        handlers=(proxy,),
        options=[
            # Ports are shared only where the cluster asks (several Ray nodes on one machine);
            # grpc would share them by default, hiding a port another server already holds.
            ("grpc.so_reuseport", int(reuse_port)),
            ("grpc.max_receive_message_length", options.max_request_body_bytes),
            ("grpc.max_send_message_length", _SEND_LIMIT),
        ],
    )
    # Methods the generated code registers by name are served by name too: grpc then finds
    # their handler without a call of the generic one per request (the floor's path).
    if hasattr(server, "add_registered_method_handlers"):  # (grpcio >= 1.62)
        for service, names in methods.services.items():
            handlers = {name: proxy.service_of(f"/{service}/{name}") for name in names}
            server.add_registered_method_handlers(service, handlers)
    host = f"[{options.host}]" if ":" in options.host else options.host
    address = f"{host}:{grpc_options.port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's way of saying the port cannot be had
        raise OSError(f"cannot listen on {address} for gRPC: {exc}") from None
    await server.start()
    logger.info("gRPC proxy listening on %s", address)
    return server


# -- the user's services ----------------------------------------------------------------------


class _Recorder:
    """Stands in for the server an ``add_<Service>Servicer_to_server`` function adds to."""

    def __init__(self) -> None:
        self.generic: list[Any] = []  # grpc.GenericRpcHandler
        self.registered: dict[str, Any] = {}  # "/pkg.Service/Method" -> grpc.RpcMethodHandler
        self.services: dict[str, list[str]] = {}  # "pkg.Service" -> its registered methods

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            self.registered[f"/{service}/{name}"] = handler
            self.services.setdefault(service, []).append(name)


class _NoServicer:
    """The servicer handed to ``add_..._to_server``: its methods are never called (requests go
    to the deployments), only looked up."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def never(*args: Any) -> None:
            raise RuntimeError(f"gRPC method {name} is served by a deployment, not here")

        return never


def load_methods(options: gRPCOptions) -> _Recorder:
    """Import and call every servicer function; what they registered. The driver's code
    path (``options.sys_path``) is searched after the proxy's own."""
    for entry in options.sys_path:
        if entry and entry not in sys.path:
            sys.path.append(entry)
    recorder = _Recorder()
    for path in options.grpc_servicer_functions:
        add = import_servicer_function(path)
        add(_NoServicer(), recorder)
    return recorder


def import_servicer_function(path: str) -> Callable[..., Any]:
    """``module.attr`` (or ``module:attr``) of ``grpc_servicer_functions``, imported; an
    ImportError saying which and why when it cannot be."""
    module, attr = path.split(":", 1) if ":" in path else path.rpartition(".")[::2]
    if not module or not attr:
        raise ImportError(f"grpc_servicer_functions: {path!r} is not 'module.function'")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:
        raise ImportError(
            f"grpc_servicer_functions: cannot import {path!r}: {type(exc).__name__}: "
            f"{safe_str(exc)}"
        ) from None
    if not callable(obj):
        raise ImportError(f"grpc_servicer_functions: {path!r} is not a function")
    result: Callable[..., Any] = obj
    return result


# -- serving -----------------------------------------------------------------------------------


class GrpcProxy(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The server's one handler: Ray Serve's service, and every user method, routed."""

    def __init__(
        self,
        client: ClusterClient,
        options: gRPCOptions,
        methods: _Recorder,
        draining: Callable[[], bool],
        recorded: RequestMetrics,
    ) -> None:
        self.client = client
        self.options = options
        self.methods = methods
        self.draining = draining
        self.recorded = recorded  # route and application: the app; method: the path
        self._handlers: dict[str, Any] = {
            HEALTHZ: grpc.unary_unary_rpc_method_handler(self._healthz),
            LIST_APPLICATIONS: grpc.unary_unary_rpc_method_handler(self._list_applications),
        }

    def service(self, handler_call_details: Any) -> Any:
        path: str = handler_call_details.method
        found = self._handlers.get(path)
        if found is None:
            user = self._user_handler(path, handler_call_details)
            if user is None:
                return None  # grpc answers UNIMPLEMENTED
            found = self._handlers[path] = self._routed(path, user)
        return found

    def service_of(self, path: str) -> Any:
        """The routed handler of a registered method (``path``: ``/pkg.Service/Method``)."""
        found = self._handlers.get(path)
        if found is None:
            found = self._handlers[path] = self._routed(path, self.methods.registered[path])
        return found

    def _user_handler(self, path: str, details: Any) -> Any:
        found = self.methods.registered.get(path)
        if found is not None:
            return found
        for generic in self.methods.generic:
            found = generic.service(details)
            if found is not None:
                return found
        return None

    def _routed(self, path: str, user: Any) -> Any:
        method = path.rsplit("/", 1)[-1]
        if user.request_streaming:
            unsupported = partial(self._client_streaming, method)
            if user.response_streaming:
                return grpc.stream_stream_rpc_method_handler(unsupported)
            return grpc.stream_unary_rpc_method_handler(unsupported)
        if user.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                partial(self._stream, method, path), request_deserializer=user.request_deserializer
            )
        return grpc.unary_unary_rpc_method_handler(
            partial(self._unary, method, path), request_deserializer=user.request_deserializer
        )

    def _ended(self, path: str, call: Call | None, code: grpc.StatusCode, began: float) -> None:
        """A call answered: its metrics (its app is its route, as in Ray Serve)."""
        recorded = self.recorded
        if call is None:
            app = deployment = ""
        else:
            app, deployment = call.app, call.deployment
            recorded.ongoing -= 1
        recorded.record(app, path, app, deployment, _NAMES[code], time.time() - began)

    # -- Ray Serve's own service ---------------------------------------------------------------

    async def _healthz(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        began = time.time()
        draining = self.draining()
        if draining:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(DRAINING_MESSAGE)
        self._ended(HEALTHZ, None, _UNAVAILABLE if draining else _OK, began)
        return _strings((DRAINING_MESSAGE if draining else HEALTHY_MESSAGE,))

    async def _list_applications(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        began = time.time()
        draining = self.draining()
        if draining:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(DRAINING_MESSAGE)
        self._ended(LIST_APPLICATIONS, None, _UNAVAILABLE if draining else _OK, began)
        return _strings(self._apps())

    def _apps(self) -> list[str]:
        return sorted({app for app, _ in self.client.routes.values()})

    # -- the applications' methods -------------------------------------------------------------

    def _call(
        self, method: str, request: Any, context: grpc.aio.ServicerContext, stream: bool
    ) -> tuple[Call | None, str, str | None]:
        """The call for ``request`` (None: no such app) and its request id; the reason it
        has no call."""
        app_name = request_id = model = None
        for key, value in context.invocation_metadata() or ():
            if key == "application":
                app_name = value
            elif key == "request_id":
                request_id = value
            elif key == "multiplexed_model_id":
                model = value
        request_id = request_id or f"{_ID_PREFIX}{next(_ids):016x}"
        target = self._target(app_name)
        if target is None:
            said = f"Application {app_name!r} not found." if app_name else "Application"
            if not app_name:
                said += " metadata not set."
            return None, request_id, f"{said} Ping {LIST_APPLICATIONS} for available applications."
        app, ingress = target
        meta: dict[str, Any] = {"grpc": True, "request_id": request_id, "route": app}
        if model:
            meta["multiplexed_model_id"] = model
        if stream:
            meta["stream"] = True
        call = Call(app, ingress, method, (request, RayServegRPCContext(context)), {}, meta, stream)
        # The message's class is importable (its servicer function imported it) and the
        # context is serval's: plain pickle, without cloudpickle's per-object hooks.
        call.plain = True
        return call, request_id, None

    def _target(self, app_name: str | None) -> tuple[str, str] | None:
        """(app, ingress deployment) for the ``application`` metadata value."""
        targets = self.client.routes.values()
        if app_name:
            for app, ingress in targets:
                if app == app_name:
                    return app, ingress
            return None
        apps = {app: ingress for app, ingress in targets}
        return next(iter(apps.items())) if len(apps) == 1 else None

    async def _unary(
        self, method: str, path: str, request: Any, context: grpc.aio.ServicerContext
    ) -> bytes:
        began = time.time()
        call, request_id, missing = self._call(method, request, context, stream=False)
        code = _first_code(call)
        try:
            live = await self._start(call, missing, request_id, context)
            try:
                async with asyncio.timeout(self.options.request_timeout_s):
                    await live.done.wait_local(self.client.loop)
                data, returned = live.outcome()
            except asyncio.CancelledError:
                self._cancel(live)
                raise
            except Exception as exc:
                self._cancel(live)
                code, details = self._status(exc, live)
                await _abort(context, code, details, request_id)
            code = _apply(context, returned, request_id)
            result: bytes = data
            return result
        finally:
            self._ended(path, call, code, began)

    async def _stream(
        self, method: str, path: str, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        began = time.time()
        call, request_id, missing = self._call(method, request, context, stream=True)
        code = _first_code(call)
        try:
            live = await self._start(call, missing, request_id, context)
            stream = live.stream
            assert stream is not None
            loop = self.client.loop
            timeout = self.options.request_timeout_s
            # (a deadline checked around each wait for an item, never across a yield: a
            # timeout scope left open at a yield would cancel whatever grpc runs meanwhile)
            deadline = None if timeout is None else loop.time() + timeout
            returned: RayServegRPCContext | None = None
            sent = False
            try:
                while True:
                    try:
                        if deadline is None:
                            item = await stream.next_async(loop)
                        else:
                            async with asyncio.timeout_at(deadline):
                                item = await stream.next_async(loop)
                    except StopAsyncIteration:
                        break
                    if type(item) is bytes:
                        sent = True
                        yield item
                    else:  # the method's context: the stream's last item
                        returned = item
                live.outcome()
            except (asyncio.CancelledError, GeneratorExit):  # the client went away
                self._cancel(live)
                raise
            except Exception as exc:
                self._cancel(live)
                code, details = self._status(exc, live)
                await _abort(context, code, details, request_id)
            if returned is not None:
                code = _apply(context, returned, request_id, compress=not sent)
            else:
                code = _OK
                context.set_trailing_metadata((("request_id", request_id),))
        finally:
            self._ended(path, call, code, began)

    async def _start(
        self,
        call: Call | None,
        missing: str | None,
        request_id: str,
        context: grpc.aio.ServicerContext,
    ) -> Call:
        """Send ``call`` on its way; a method no app serves is answered NOT_FOUND here."""
        if call is None:
            await _abort(context, grpc.StatusCode.NOT_FOUND, missing or "", request_id)
        self.recorded.ongoing += 1
        self.client.submit(call)
        return call

    def _cancel(self, call: Call) -> None:
        if not call.done.fired:
            self.client.cancel(call)

    async def _client_streaming(self, method: str, requests: Any, context: Any) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method}: client-streaming gRPC methods are not supported by serval",
        )

    def _status(self, exc: BaseException, call: Call) -> tuple[grpc.StatusCode, str]:
        """The status a failed call is answered with; the failures that are not the
        request's own are logged, with their traceback, here only."""
        if isinstance(exc, TimeoutError):
            return grpc.StatusCode.DEADLINE_EXCEEDED, (
                f"Request timed out after {self.options.request_timeout_s}s."
            )
        if isinstance(exc, BackPressureError):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, safe_str(exc)
        if isinstance(exc, (DeploymentUnavailableError, DeploymentNotFoundError)):
            return grpc.StatusCode.UNAVAILABLE, safe_str(exc)
        if isinstance(exc, ReplicaDiedError):
            logger.warning("gRPC request %s: %s", call.meta and call.meta["request_id"], exc)
            return grpc.StatusCode.UNAVAILABLE, safe_str(exc)
        if isinstance(exc, RequestCancelledError):
            return grpc.StatusCode.CANCELLED, safe_str(exc)
        if isinstance(exc, gRPCStatusError):
            details = exc.grpc_details or _message(exc.original_exception)
            return exc.grpc_code, details
        logger.error(
            "gRPC request %s to %s.%s failed: %s",
            call.meta and call.meta["request_id"],
            call.app,
            call.label,
            _message(exc),
            exc_info=exc,
        )
        return grpc.StatusCode.INTERNAL, _message(exc)


def _message(exc: BaseException) -> str:
    """``Type: message`` of a user's exception (never its traceback)."""
    if isinstance(exc, UserCodeError):
        return f"{exc.type_name}: {exc.message}"
    text = safe_str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _apply(
    context: grpc.aio.ServicerContext,
    returned: RayServegRPCContext,
    rid: str,
    compress: bool = True,
) -> grpc.StatusCode:
    """What the method set on its context, onto the response (its status code the one
    returned); ``request_id`` added to the
    trailing metadata unless the method set one. ``compress``: nothing is sent yet, so the
    compression set can still apply (a stream's context comes after its items: grpc fails a
    call whose compression changes once messages went out)."""
    code = returned.code()
    if code is not None:
        context.set_code(code)
    else:
        code = _OK
    details = returned.details()
    if details:
        context.set_details(_clip(details))
    trailing = returned.trailing_metadata()
    if not any(key == "request_id" for key, _ in trailing):
        trailing.append(("request_id", rid))
    context.set_trailing_metadata(tuple(trailing))
    compression = returned.compression()
    if compression is not None and compress:
        context.set_compression(compression)
    return code


def _first_code(call: Call | None) -> grpc.StatusCode:
    """A call's code unless it ends otherwise: NOT_FOUND for no call; else CANCELLED (the
    client went away, or its deadline) until it is answered."""
    return grpc.StatusCode.NOT_FOUND if call is None else _CANCELLED


async def _abort(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, rid: str
) -> NoReturn:
    await context.abort(code, _clip(details), (("request_id", rid),))
    raise AssertionError("grpc's abort returned")  # (it raises, to end the handler)


def _clip(details: str) -> str:
    if len(details) <= _MAX_DETAILS:
        return details
    return details[: _MAX_DETAILS - 15] + "... [truncated]"


def _strings(values: Any) -> bytes:
    """A protobuf message whose field 1 is a (repeated) string: Ray Serve's
    ``HealthzResponse.message`` and ``ListApplicationsResponse.application_names``."""
    out = bytearray()
    for value in values:
        data = value.encode()
        out.append(0x0A)  # field 1, length-delimited
        size = len(data)
        while size > 0x7F:
            out.append((size & 0x7F) | 0x80)
            size >>= 7
        out.append(size)
        out += data
    return bytes(out)
