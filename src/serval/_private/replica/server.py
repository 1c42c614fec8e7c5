"""The replica runtime: runs one user object and serves requests to it.

Async methods run on the replica's event loop; sync methods in a thread pool, so a slow sync
method blocks neither async methods nor the replica's own work (health checks, cancellation).
``max_ongoing_requests`` is enforced here too, as a hard limit: callers already respect it,
but several callers each see only their own share.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from serval._private.caller import runtime
from serval._private.replica import autoscaling, errors, request_context
from serval._private.replica.direct import DirectCalls
from serval._private.replica.grpc import grpc_entry
from serval._private.replica.http import (
    BodyStream,
    ResponseCollector,
    Unfinished,
    respond,
    serve_http_sync,
)
from serval._private.replica.methods import (
    FunctionDeployment,
    Kind,
    async_methods,
    check_stream,
    http_entry,
    kind,
    kind_cached,
    sync_with_context,
    with_context,
)
from serval._private.replica.outflow import Outflow, frame_bytes
from serval._private.replica.sync_runner import SyncRunner, unwrap
from serval._private.telemetry import log_files, log_setup, metrics
from serval._private.telemetry.access_log import AccessLog
from serval._private.telemetry.logs import Identity
from serval._private.wire import endpoints, layout, protocol, transport
from serval._private.wire.asgi import scope_type, unpack_scope
from serval._private.wire.control import ControllerCalls
from serval._private.wire.messages import (
    CREDIT,
    DRAINING,
    ERROR,
    REJECT,
    RESULT,
    STREAM_END,
    STREAM_ITEM,
    Cancel,
    Credit,
    Drained,
    Draining,
    Error,
    Input,
    Message,
    Reject,
    Request,
    Result,
    StreamEnd,
    StreamItem,
)
from serval._private.wire.rpc import RpcPeer
from serval._private.wire.tasks import TaskOwner
from serval._private.wire.transport import Undecodable
from serval._private.wire.types import ReplicaInit
from serval.config import AutoscalingContext, AutoscalingPolicy, DeploymentConfig
from serval.exceptions import RequestCancelledError, SerializationError

logger = logging.getLogger(__name__)

_MAX_THREADS = 512
_CONTROL_THREADS = 2
_REATTACH_DELAY_S = 0.1
# Results of these types pickle identically without cloudpickle (HTTP replies are tuples).
_PLAIN_RESULTS = frozenset({str, bytes, int, float, bool, type(None), tuple})


_clock = time.perf_counter


@dataclass(frozen=True)
class ListenAt:
    """Where a replica takes callers: a Unix socket (for its node only when ``node`` is set),
    and TCP on ``tcp_host`` too when callers may be on other nodes."""

    unix_path: str
    node: str | None = None
    tcp_host: str | None = None


def _no_call(request: Any) -> Any:
    raise TypeError("this deployment has no __call__ method to take HTTP requests")


class Replica:
    def __init__(
        self,
        address: str,
        replica_id: str,
        listen_at: ListenAt | None = None,
        keep_cwd: bool = False,
        logs_dir: str | None = None,
    ) -> None:
        self.address = address
        self.logs_dir = logs_dir  # the cluster's log directory (None: standard error only)
        self.access_log: AccessLog | None = None  # once the log file is set up
        # True when the backend gave it a working directory of its own (Ray's working_dir),
        # instead of the deployer's
        self.keep_cwd = keep_cwd
        self.replica_id = replica_id
        self.loop = asyncio.get_running_loop()
        if listen_at is None:
            listen_at = ListenAt(layout.replica_path(address, replica_id))
        self.listen_at = listen_at
        self.path = listen_at.unix_path
        self.own_address = self.path  # what callers dial (the TCP endpoint joins at start)
        self.app = ""
        self.deployment = ""
        self.config = DeploymentConfig()
        self.user: Any = None
        self.ongoing = 0
        self.finished = 0  # requests answered, for /-/metrics
        self.failed = 0  # of which the call raised (a cancellation is no failure)
        self.latency = metrics.HistogramSeries(metrics.LATENCY_BOUNDARIES_MS)
        self.unanswered = 0  # requests no reply could be sent for: the replica is unhealthy
        self.draining = False
        self._drainer: asyncio.Task[None] | None = None
        # The replica's own background work (reattaching, reporting models, draining);
        # requests' tasks belong to their connections (``_running``).
        self.tasks = TaskOwner(f"replica {replica_id}")
        self._unacked: set[transport.Connection] = set()  # callers yet to say Drained
        self._drained = asyncio.Event()
        self.stopped = asyncio.Event()  # drained: the process may exit
        # Calls waiting for a slot (read by ``direct`` under its lock, so changed under it)
        self.backlog: deque[tuple[transport.Connection, int, str, Any, Any, Any]] = deque()
        # Calls by reference: on Ray's threads, sharing the slots (``direct.lock`` guards both)
        self.direct = DirectCalls(self)
        self._methods: dict[str, tuple[Callable[..., Any], Kind]] = {}
        self._running: dict[transport.Connection, dict[int, asyncio.Future[Any]]] = {}
        self._pool: SyncRunner | None = None
        # (connection, request id) of calls whose reply a worker thread sent itself
        self._replied: set[tuple[transport.Connection, int]] = set()
        self._inputs: dict[tuple[transport.Connection, int], asyncio.Queue[Any]] = {}
        self._outflows: dict[tuple[transport.Connection, int], Outflow] = {}
        self.asgi_app: Any = None
        # What an HTTP request to a deployment without an ASGI app calls (see http_entry).
        self.http_call: Callable[[Any], Any] = _no_call
        # A sync __call__(request) and no ASGI app: HTTP requests run whole on a worker thread.
        self._sync_http = False
        self._server: asyncio.AbstractServer | None = None
        self._tcp: transport.TcpListener | None = None
        self.controller: RpcPeer | None = None
        self._reattach_task: asyncio.Task[None] | None = None
        self._policies: autoscaling.PolicyRunner | None = None  # custom autoscaling, if asked

    # -- start-up --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._listen()
        where = await endpoints.controller(self.address)
        self.controller = await RpcPeer.connect(where, handler=self)
        calls = ControllerCalls(self.controller.call)
        init = await calls.register(self.replica_id, self.own_address)
        error = await self._init_user(init)
        loop_methods = async_methods(self.user) if error is None else frozenset()
        await calls.replica_ready(self.replica_id, error, loop_methods)
        # Only now: a controller lost while starting means starting over, not reattaching.
        self.controller.on_close = self._controller_lost

    async def _listen(self) -> None:
        at = self.listen_at
        self._server = await transport.listen(self.path, self._new_connection)
        if at.node is not None:
            self.own_address = endpoints.unix_on_node(at.node, self.path)
        if at.tcp_host is not None:
            self._tcp = await transport.TcpListener.start(
                at.tcp_host, 0, self._new_connection, endpoints.secret()
            )
            self.own_address = f"{self.own_address}|{self._tcp.address}"

    def _controller_lost(self, peer: RpcPeer) -> None:
        if not self.draining:
            logger.warning("lost the controller; reattaching when it is back")
            self._reattach_task = self.tasks.spawn(self._reattach(), self.loop)

    async def _reattach(self) -> None:
        """Keep serving; reconnect the control channel to the restarted controller."""
        while not self.draining:
            try:
                where = await endpoints.controller(self.address)
                peer = await RpcPeer.connect(where, handler=self)
                await ControllerCalls(peer.call).reattach(self.replica_id)
            except (OSError, ConnectionError):
                await asyncio.sleep(_REATTACH_DELAY_S)
                continue
            except LookupError:
                logger.error("the restarted controller does not know this replica; exiting")
                os._exit(1)
            self.controller = peer
            peer.on_close = self._controller_lost
            logger.info("reattached to the controller")
            return

    async def _init_user(self, init: ReplicaInit) -> str | None:
        self.app, self.deployment = init.app, init.deployment
        self.config = init.config
        self._log_to_file()
        self.access_log = AccessLog(self.loop)  # (enabled as the log setup says)
        runtime.set_replica(
            runtime.ReplicaIdentity(self.app, self.deployment, self.replica_id), self.loop
        )
        for entry in reversed(init.sys_path):
            if entry and entry not in sys.path:
                sys.path.insert(0, entry)
        if not self.keep_cwd:
            with contextlib.suppress(OSError):
                os.chdir(init.cwd)
        self._pool = SyncRunner(
            self.loop, min(self.config.max_ongoing_requests, _MAX_THREADS), "serval-user"
        )
        self._control_pool = SyncRunner(self.loop, _CONTROL_THREADS, "serval-control")
        try:
            target, args, kwargs = pickle.loads(init.payload)
            if init.is_function:
                self.user = FunctionDeployment(target)
            else:
                self.user = await self._construct(target, args, kwargs)
            if self.config.user_config is not None:
                await self.rpc_reconfigure(None, self.config.user_config)
            from serval.ingress import asgi_app_for

            self.asgi_app = asgi_app_for(self.user)
            # (getattr: a function deployment's __call__ is an instance attribute)
            call = getattr(self.user, "__call__", None)  # noqa: B004
            if call is not None:
                self.http_call = http_entry(call)
            sync_call = call is not None and kind(call) is Kind.SYNC
            self._sync_http = self.asgi_app is None and sync_call
            if self._sync_http:
                import starlette.requests  # noqa: F401 - now, not in the first request
        except BaseException as exc:  # the caller of serve.run gets this traceback
            logger.error("replica %s of %s failed to start", self.replica_id, self.deployment)
            return "".join(traceback.format_exception(exc))
        request_context.set_servable(self.user)
        self.direct.ready.set()
        request_context.set_model_listener(self._models_changed)
        return None

    def _log_to_file(self) -> None:
        """From now on this replica logs to its own file too (as its LoggingConfig says)."""
        config = self.config.logging_config or {}
        directory = config.get("logs_dir") or self.logs_dir
        if directory is None:
            return
        identity = Identity("replica", self.replica_id, self.app, self.deployment)
        name = log_files.replica_file(self.app, self.deployment, self.replica_id)
        log_setup.configure(identity, config, directory, name, request_context.current_request)

    def _models_changed(self, model_ids: list[str]) -> None:
        if self.controller is None or self.controller.closed:
            return
        calls = ControllerCalls(self.controller.call)
        self.tasks.spawn(_quietly(calls.record_models(self.replica_id, model_ids)), self.loop)

    async def _construct(self, cls: type, args: Any, kwargs: Any) -> Any:
        if inspect.iscoroutinefunction(cls.__init__):  # type: ignore[misc]
            obj: Any = object.__new__(cls)
            await obj.__init__(*args, **kwargs)
            return obj
        # On the loop thread, as in Ray Serve: __init__ may use asyncio.get_running_loop().
        return cls(*args, **kwargs)

    # -- control RPCs ----------------------------------------------------------------------------

    async def rpc_reconfigure(self, peer: RpcPeer | None, user_config: Any) -> None:
        fn = getattr(self.user, "reconfigure", None)
        if fn is None:
            raise TypeError(
                f"deployment {self.deployment!r} has a user_config but no reconfigure() method"
            )
        await self._call_control(fn, user_config)
        self.config = self.config.with_changes(user_config=user_config)

    def rpc_metrics(self, peer: RpcPeer) -> int:
        """Requests here now: running, and waiting for a slot."""
        return self.ongoing + len(self.backlog) + self.direct.ongoing + self.direct.waiting

    async def rpc_autoscale(
        self,
        peer: RpcPeer,
        policy: AutoscalingPolicy,
        contexts: list[AutoscalingContext],
        state: bytes,
        app_level: bool,
    ) -> tuple[list[float | None], bytes]:
        """Run the application's custom autoscaling policy (``replica/autoscaling.py``)."""
        if self._policies is None:
            self._policies = autoscaling.PolicyRunner()
        return await self._policies.run(policy, contexts, state, app_level)

    async def rpc_routing_stats(self, peer: RpcPeer) -> dict[str, Any]:
        """The user's ``record_routing_stats()`` (for custom request routers), or {}."""
        fn = getattr(self.user, "record_routing_stats", None)
        if fn is None:
            return {}
        stats = await self._call_control(fn)
        if not isinstance(stats, dict):
            raise TypeError(f"record_routing_stats() must return a dict, got {stats!r}")
        return stats

    async def rpc_autoscaling_stats(self, peer: RpcPeer) -> dict[str, float]:
        """The user's custom metrics (``record_autoscaling_stats()``), for custom policies."""
        return await autoscaling.record_stats(self.user, self._call_control)

    def rpc_export_metrics(self, peer: RpcPeer) -> metrics.Snapshot:
        """The user's metrics recorded in this process, and this replica's own."""
        tags = (self.deployment, self.replica_id, self.app)
        direct = self.direct
        with direct.lock:
            values: tuple[float | metrics.HistogramValue, ...] = (
                float(self.finished + direct.finished),
                float(self.failed + direct.failed),
                float(self.ongoing + direct.ongoing),
                float(len(self.backlog) + direct.waiting),
                metrics.add_histograms(self.latency.value(), direct.latency.value()),
            )
        families = metrics.OWN_FAMILIES
        own: metrics.Snapshot = [
            (family, [(tags, value)]) for family, value in zip(families, values, strict=True)
        ]
        return own + metrics.REGISTRY.snapshot()

    async def rpc_check_health(self, peer: RpcPeer) -> None:
        if self.unanswered:
            raise RuntimeError(
                f"replica {self.replica_id} could not answer {self.unanswered} request(s); "
                "see its log"
            )
        if self.backlog and self.direct.has_room():
            # Requests wait though a slot is free: nothing will ever start them.
            raise RuntimeError(f"replica {self.replica_id} stopped starting queued requests")
        fn = getattr(self.user, "check_health", None)
        if fn is not None:
            await self._call_control(fn)

    async def _call_control(self, fn: Callable[..., Any], *args: Any) -> Any:
        """check_health and reconfigure: on threads of their own, so a replica whose request
        threads are all busy still answers its health checks."""
        if kind_cached(fn) is Kind.ASYNC:
            return await fn(*args)
        return await self._control_pool.run(fn, *args)

    async def _call_user(self, fn: Callable[..., Any], *args: Any) -> Any:
        if kind_cached(fn) is Kind.ASYNC:
            return await fn(*args)
        assert self._pool is not None
        return await self._pool.run(fn, *args)  # in a copy of the request's context

    # -- data plane ------------------------------------------------------------------------------

    def _new_connection(self) -> transport.Connection:
        conn = transport.Connection(self._on_message, self._on_lost, thread_writes=True)
        self._running[conn] = {}
        return conn

    def _on_lost(self, conn: transport.Connection, exc: BaseException | None) -> None:
        # The caller went away: cancel what it was waiting for, drop what it queued here.
        for fut in self._running.pop(conn, {}).values():
            fut.cancel()
        for key in [k for k in self._outflows if k[0] is conn]:
            self._outflows.pop(key).cancel()
        if self.backlog:
            with self.direct.lock:
                self.backlog = deque(entry for entry in self.backlog if entry[0] is not conn)
        if self._unacked:
            self._unacked.discard(conn)
            self._drain_progress()

    def _on_message(self, conn: transport.Connection, msg: Message | Undecodable) -> None:
        if isinstance(msg, Undecodable):
            self._reply_error(
                conn,
                msg.tag,
                SerializationError(
                    "the replica could not deserialize the request: "
                    f"{type(msg.error).__name__}: {protocol.safe_str(msg.error)}"
                ),
            )
            return
        if type(msg) is Request:
            rid = msg.rid
            if self.draining:
                conn.send(Reject(REJECT, rid, None, self.ongoing), rid)
            elif self._take_slot():
                self._run(conn, rid, msg.method, msg.args, msg.kwargs, msg.meta)
            else:
                with self.direct.lock:  # (``direct`` reads the backlog under its lock)
                    self.backlog.append((conn, rid, msg.method, msg.args, msg.kwargs, msg.meta))
        elif type(msg) is Credit:
            flow = self._outflows.get((conn, msg.rid))
            if flow is not None:
                flow.credit(msg.nbytes)
        elif type(msg) is Cancel:
            self._cancel(conn, msg.rid)
        elif type(msg) is Input:
            queue = self._inputs.get((conn, msg.rid))
            if queue is not None:
                queue.put_nowait(msg.message)
        elif type(msg) is Drained:
            self._unacked.discard(conn)
            self._drain_progress()

    def _cancel(self, conn: transport.Connection, rid: int) -> None:
        fut = self._running.get(conn, {}).get(rid)
        if fut is not None:
            fut.cancel()
            flow = self._outflows.get((conn, rid))
            if flow is not None:
                flow.cancel()  # a sync generator waiting for credit stops now
            return
        for entry in self.backlog:  # not started yet: it never will be
            if entry[0] is conn and entry[1] == rid:
                with self.direct.lock:
                    self.backlog.remove(entry)
                self._reply_error(
                    conn, rid, RequestCancelledError(f"{self.deployment}.{entry[2]} was cancelled")
                )
                return

    def _outflow(self, conn: transport.Connection, rid: int, label: str) -> Outflow:
        """The flow control of call ``rid``'s streamed output (made on first use)."""
        key = (conn, rid)
        flow = self._outflows.get(key)
        if flow is None:
            flow = self._outflows[key] = Outflow(self.loop, f"{self.deployment}.{label}")
        return flow

    def _run(
        self, conn: transport.Connection, rid: int, method: str, args: Any, kwargs: Any, meta: Any
    ) -> None:
        asgi = meta is not None and "asgi" in meta
        # (HTTP: the reply is a plain result, whatever was streamed before it)
        stream = not asgi and bool(meta and meta.get("stream"))
        done = partial(self._done, conn, rid, method, stream, meta, _clock())
        try:
            fut: asyncio.Future[Any]
            if asgi and self._sync_http and scope_type(args[0]) == "http":
                if meta.get("more_body"):  # a streamed body: whole first, on the loop
                    fut = self.loop.create_task(self._whole_body(conn, rid, args[1]))
                    fut.add_done_callback(
                        partial(self._serve_http_sync, conn, rid, args[0], meta, done)
                    )
                else:
                    fut = self._serve_http_sync(conn, rid, args[0], meta, done, args[1])
            elif asgi:
                fut = self.loop.create_task(self._serve_http(conn, rid, args[0], args[1], meta))
                fut.add_done_callback(done)
            else:
                fn, kind = self.method(method)
                if meta is not None and "grpc" in meta:  # from the gRPC proxy: see replica.grpc
                    fn = grpc_entry(fn, kind)
                fut = self._execute(conn, rid, fn, kind, args, kwargs, meta, done)
        except Exception as exc:
            self._finish(conn, rid, method, None, exc, False)
            return
        self._running.setdefault(conn, {})[rid] = fut

    def _execute(
        self,
        conn: transport.Connection,
        rid: int,
        fn: Callable[..., Any],
        kind: Kind,
        args: Any,
        kwargs: Any,
        meta: Any,
        done: Callable[[asyncio.Future[Any]], None],
    ) -> asyncio.Future[Any]:
        """Start ``fn``; ``done`` is called with its future when it has finished."""
        check_stream(kind, bool(meta and meta.get("stream")), self.deployment, fn)
        assert self._pool is not None
        if kind is Kind.SYNC:
            call = (meta, fn, args, kwargs)
            return self._pool.run(
                self._reply_from_thread, conn, rid, sync_with_context, call, then=done
            )
        if kind is Kind.SYNC_GEN:
            flow = self._outflow(conn, rid, getattr(fn, "__name__", "method"))
            return self._pool.run(
                self._stream_sync, conn, rid, meta, fn, args, kwargs, flow, then=done
            )
        if kind is Kind.ASYNC_GEN:
            flow = self._outflow(conn, rid, getattr(fn, "__name__", "method"))
            task = self.loop.create_task(
                self._stream_async(conn, rid, meta, fn, args, kwargs, flow)
            )
        elif meta is None:  # no request context to set: no wrapper coroutine either
            task = self.loop.create_task(fn(*args, **kwargs))
        else:
            task = self.loop.create_task(with_context(meta, fn, args, kwargs))
        task.add_done_callback(done)
        return task

    def _reply_from_thread(
        self, conn: transport.Connection, rid: int, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        """On a worker thread: run ``fn(*args)`` and, when the result is plain and this is the
        replica's only call, send the reply from here (the loop then only does the
        bookkeeping: see ``_done``). With other calls running, the loop sends it: it joins the
        replies of a tick into one write, which under load costs less than a write each."""
        value = fn(*args)
        if type(value) in _PLAIN_RESULTS and self.ongoing == 1:
            try:
                # ``ongoing`` as it will be once the loop counts this call finished
                reply = Result(RESULT, rid, value, self.ongoing - 1)
                pieces = protocol.encode(reply, rid, True)
            except BaseException:
                return value  # the loop's path reports what failed
            if len(pieces) == 1:
                self._replied.add((conn, rid))
                if conn.write_from_thread(pieces[0]):
                    return None
                self._replied.discard((conn, rid))
        return value

    async def _stream_async(
        self,
        conn: transport.Connection,
        rid: int,
        meta: Any,
        fn: Any,
        args: Any,
        kwargs: Any,
        flow: Outflow,
    ) -> None:
        request_context.set_request(meta)
        index = 0
        async for item in fn(*args, **kwargs):
            if not conn.closed:
                pieces = self._item_frame(rid, item, index, fn)
                conn.send_pieces(pieces)
                if flow.add(frame_bytes(pieces)):
                    await flow.wait()  # the caller has a window of this stream unread
            index += 1

    def _stream_sync(
        self,
        conn: transport.Connection,
        rid: int,
        meta: Any,
        fn: Any,
        args: Any,
        kwargs: Any,
        flow: Outflow,
    ) -> None:
        request_context.set_request(meta)
        sent = False
        try:
            for index, item in enumerate(fn(*args, **kwargs)):
                pieces = self._item_frame(rid, item, index, fn)
                self.loop.call_soon_threadsafe(_send_pieces, conn, pieces)
                sent = True
                flow.add_from_thread(frame_bytes(pieces))  # waits while a window is unread
        finally:
            if sent:
                _loop_caught_up(self.loop)

    def _item_frame(
        self, rid: int, item: Any, index: int, fn: Callable[..., Any]
    ) -> list[bytes | memoryview]:
        """A streamed item's frame; a ``SerializationError`` naming it if it does not pickle
        (raised where the generator runs, so the stream ends with it)."""
        try:
            return protocol.encode(StreamItem(STREAM_ITEM, rid, item), rid)
        except BaseException as err:
            name = getattr(fn, "__name__", "method")
            raise protocol.serialization_error(
                f"item {index} streamed by {self.deployment}.{name}", item, err
            ) from None

    async def _emit(self, conn: transport.Connection, rid: int, message: Any) -> None:
        """A message of a streamed HTTP response (or websocket) of request ``rid``; waits
        while the caller has a window of this response unread (a slow client)."""
        if conn.closed:
            return
        pieces = protocol.encode(StreamItem(STREAM_ITEM, rid, message), rid, True)
        conn.send_pieces(pieces)
        flow = self._outflow(conn, rid, "__call__")
        if flow.add(frame_bytes(pieces)):
            await flow.wait()

    def _serve_http_sync(
        self,
        conn: transport.Connection,
        rid: int,
        wire: Any,
        meta: Any,
        done: Callable[[asyncio.Future[Any]], None],
        body: bytes | asyncio.Future[bytes],
    ) -> asyncio.Future[Any]:
        """An HTTP request to a sync ``__call__``, on a worker thread; ``body`` is whole, or
        the finished task that gathered a streamed one."""
        running = None
        if isinstance(body, asyncio.Future):
            running = self._running.get(conn)
            if body.cancelled() or body.exception() is not None or running is None:
                done(body)  # cancelled, or the client left, while the body came
                return body
            body = body.result()
        assert self._pool is not None
        fut = self._pool.run(
            self._reply_from_thread,
            conn,
            rid,
            serve_http_sync,
            (self.http_call, wire, body, meta),
            then=done,
        )
        if running is not None:
            running[rid] = fut  # cancelling the request now cancels the thread's job
        return fut

    async def _serve_http(
        self, conn: transport.Connection, rid: int, wire: Any, body: Any, meta: Any
    ) -> Any:
        request_context.set_request(meta)
        scope = unpack_scope(wire)
        collector = ResponseCollector(partial(self._emit, conn, rid))
        inputs: asyncio.Queue[Any] | None = None
        receive = None
        if scope["type"] == "websocket":
            inputs = self._inputs[(conn, rid)] = asyncio.Queue()
            inputs.put_nowait(body)  # the websocket.connect event
            receive = inputs.get
        elif meta.get("more_body"):
            inputs = self._inputs[(conn, rid)] = asyncio.Queue()
            receive = self._body_stream(conn, rid, body, inputs).receive
        try:
            return await respond(
                self.http_call, self.asgi_app, scope, body, receive, collector, self._call_user
            )
        except Exception:
            if not collector.answered:
                raise
            return _answered_despite(collector, meta)
        finally:
            if inputs is not None:
                self._inputs.pop((conn, rid), None)

    async def _finish_http(self, conn: transport.Connection, rid: int, left: Unfinished) -> Any:
        request_context.set_request(left.meta)
        collector = ResponseCollector(partial(self._emit, conn, rid))
        try:
            return await left.finish(collector)
        except Exception:
            if not collector.answered:
                raise
            return _answered_despite(collector, left.meta)

    def _body_stream(
        self, conn: transport.Connection, rid: int, first: bytes, inputs: asyncio.Queue[Any]
    ) -> BodyStream:
        """The body of a request that streams in: tell the proxy the request has started
        (credit 0), so it sends the rest as input messages to ``inputs``."""
        stream = BodyStream(first, inputs, partial(self._send_credit, conn, rid))
        self._send_credit(conn, rid, 0)
        return stream

    async def _whole_body(self, conn: transport.Connection, rid: int, first: bytes) -> bytes:
        inputs: asyncio.Queue[Any] = asyncio.Queue()
        self._inputs[(conn, rid)] = inputs
        try:
            return await self._body_stream(conn, rid, first, inputs).read_all()
        finally:
            self._inputs.pop((conn, rid), None)

    def _send_credit(self, conn: transport.Connection, rid: int, nbytes: int) -> None:
        if not conn.closed:
            conn.send(Credit(CREDIT, rid, nbytes), rid, True)

    def method(self, name: str) -> tuple[Callable[..., Any], Kind]:
        """The user's method ``name`` and its kind (any thread may ask)."""
        found = self._methods.get(name)
        if found is None:
            fn = getattr(self.user, name, None)
            if fn is None or not callable(fn) or (name.startswith("_") and name != "__call__"):
                raise AttributeError(f"deployment {self.deployment!r} has no method {name!r}")
            found = self._methods[name] = (fn, kind(fn))
        return found

    def _done(
        self,
        conn: transport.Connection,
        rid: int,
        method: str,
        stream: bool,
        meta: Any,
        started: float,
        fut: asyncio.Future[Any],
    ) -> None:
        running = self._running.get(conn)
        if running is not None:
            running.pop(rid, None)
        if self._outflows:
            self._outflows.pop((conn, rid), None)
        if self._replied:
            key = (conn, rid)
            if key in self._replied:  # the worker thread sent the reply (even if cancelled)
                self._replied.discard(key)
                self._observe(method, meta, started, "OK")
                self._account()
                return
        if fut.cancelled():
            value = None
            exc: BaseException | None = RequestCancelledError(
                f"{self.deployment}.{method} was cancelled"
            )
        else:
            exc = fut.exception()
            if exc is not None:
                exc = unwrap(exc)
            value = None if exc is not None else fut.result()
            if type(value) is Unfinished:  # a sync __call__'s response that needs the loop
                task = self.loop.create_task(self._finish_http(conn, rid, value))
                self._running.setdefault(conn, {})[rid] = task
                task.add_done_callback(
                    partial(self._done, conn, rid, method, stream, meta, started)
                )
                return
        status = "OK" if exc is None else "ERROR"
        if isinstance(exc, RequestCancelledError):
            status = "CANCELLED"
        self._observe(method, meta, started, status)
        self._finish(conn, rid, method, value, exc, stream)

    def _observe(self, method: str, meta: Any, started: float, status: str) -> None:
        """A call has ended: its latency, and its access line (``CALL <method> OK 1.2ms``;
        ``HTTP ...`` for a request from the proxy), made later, in a batch."""
        elapsed = _clock() - started
        self.latency.observe(elapsed * 1e3)
        log = self.access_log
        if log is None or not log.enabled:
            return
        if meta:
            kind = "HTTP" if "asgi" in meta else "CALL"
            request_id, route = meta.get("request_id") or "", meta.get("route") or ""
        else:
            kind, request_id, route = "CALL", "", ""
        log.record(kind, method, status, elapsed, request_id, route, self.app)

    def _finish(
        self,
        conn: transport.Connection,
        rid: int,
        method: str,
        value: Any,
        exc: BaseException | None,
        stream: bool,
    ) -> None:
        self._account()
        if exc is not None and not isinstance(exc, RequestCancelledError):
            self.failed += 1
        if conn.closed:
            return
        if exc is not None:
            self._reply_error(conn, rid, exc)
            return
        reply = (
            StreamEnd(STREAM_END, rid, None, self.ongoing)
            if stream
            else Result(RESULT, rid, value, self.ongoing)
        )
        try:
            conn.send(reply, rid, type(value) in _PLAIN_RESULTS)
        except BaseException as err:  # whatever a __reduce__ raises, the caller hears of it
            self._reply_error(
                conn,
                rid,
                protocol.serialization_error(
                    f"the return value of {self.deployment}.{method}", value, err
                ),
            )

    def _take_slot(self) -> bool:
        """One of the ``max_ongoing_requests`` slots for a call about to ``_run``, if one is
        free (calls by reference on Ray's threads take them too: see ``direct``)."""
        with self.direct.lock:
            if not self.direct.has_room():
                return False
            self.ongoing += 1
            return True

    def _account(self) -> None:
        """A call has finished: one slot free, for the backlog first."""
        with self.direct.lock:
            self.ongoing -= 1
            self.direct.slot_freed_on_loop()
        self.finished += 1
        self.slot_freed()

    def slot_freed(self) -> None:
        """(On the loop) a slot is free: the backlog's first calls start; a drain may be over."""
        while self.backlog:
            with self.direct.lock:
                if not self.direct.has_room():
                    return
                self.ongoing += 1
                entry = self.backlog.popleft()
            self._run(*entry)
        if self.draining and self.ongoing == 0:
            self._drain_progress()

    def _reply_error(self, conn: transport.Connection, rid: int, exc: BaseException) -> None:
        """Send ``exc`` to the caller: the first of ``errors.payloads`` that pickles. Every
        request ends in an answer: a caller left waiting holds a slot of this replica for good.
        """
        for payload in errors.payloads(exc, rid):
            if conn.closed:
                return
            try:
                conn.send(Error(ERROR, rid, payload, self.ongoing), rid, payload.exc is None)
                return
            except BaseException:
                continue  # (the next, plainer one)
        self.unanswered += 1
        logger.error("request %s could not be answered at all", rid)

    # -- shutdown --------------------------------------------------------------------------------

    def rpc_drain(self, peer: RpcPeer) -> None:
        """The controller's graceful stop: finish what runs here, then exit (``stopped``)."""
        self.begin_drain()

    def begin_drain(self) -> None:
        if self._drainer is None:
            self._drainer = self.tasks.spawn(self._drain(), self.loop)

    async def _drain(self) -> None:
        """Take no new connections; tell each caller to send nothing more (``Draining``) and
        wait until every caller has said so (``Drained``: on an ordered connection, nothing of
        theirs can then still be on its way) and the requests in flight have finished. What
        arrives meanwhile is refused (``Reject``) and routed elsewhere by its caller.

        A live caller answers at once; one that cannot (its event loop is gone, or blocked)
        sends nothing more either, so it is waited for only ``graceful_shutdown_wait_loop_s``
        (Ray Serve's wait for work that may still come). Requests in flight are waited for
        up to ``graceful_shutdown_timeout_s``."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        if self._tcp is not None:
            self._tcp.close()
        self._unacked = {conn for conn in self._running if not conn.closed}
        for conn in self._unacked:
            conn.send(Draining(DRAINING))
        self.loop.call_later(self.config.graceful_shutdown_wait_loop_s, self._stop_waiting_for_acks)
        self._drain_progress()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained.wait(), self.config.graceful_shutdown_timeout_s)
        self.direct.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        destructor = getattr(type(self.user), "__del__", None)
        if destructor is not None:
            with contextlib.suppress(Exception):
                destructor(self.user)
        if self.access_log is not None:
            self.access_log.close()
        self.stopped.set()

    def _stop_waiting_for_acks(self) -> None:
        self._unacked.clear()
        self._drain_progress()

    def _drain_progress(self) -> None:
        """While draining: done once every caller has acknowledged and nothing runs."""
        if not self.draining or self._unacked or self.ongoing or self.backlog:
            return
        if self.direct.close_if_idle():  # (calls by reference: none runs, and none may now)
            self._drained.set()


def _answered_despite(collector: ResponseCollector, meta: Any) -> Any:
    """An HTTP request's app raised after the client had its whole answer (FastAPI sends its
    500, then re-raises): log it, keep the answer. (Raised before that, the error goes to the
    proxy, which answers 500, or breaks the connection off when the response had begun
    streaming: never ends it as if it were whole.)"""
    logger.exception("request %s failed after its response was sent", meta.get("request_id"))
    return collector.complete


async def _quietly(report: Awaitable[None]) -> None:
    """A report to the controller that may find it away (restarting): the next one counts."""
    try:
        await report
    except (OSError, ConnectionError) as exc:
        logger.debug("a report to the controller failed: %s", exc)


def _send_pieces(conn: transport.Connection, pieces: list[bytes | memoryview]) -> None:
    if not conn.closed:
        conn.send_pieces(pieces)


def _loop_caught_up(loop: asyncio.AbstractEventLoop) -> None:
    """From a worker thread: return once ``loop`` has run every callback this thread gave it
    before (they run in order). A sync generator's items are sent by such callbacks; its end is
    reported through the worker pool's batched completions, which may already be due on the
    loop: without this the end could overtake the last items."""
    caught_up = threading.Event()
    try:
        loop.call_soon_threadsafe(caught_up.set)
    except RuntimeError:  # the loop is closed: the process is exiting
        return
    caught_up.wait()
