"""Caller-side routing of one deployment's requests to its replicas.

Power of two choices over the replicas with room (in-flight below ``max_ongoing_requests``), by
the in-flight count this router knows, corrected by the count each replica reports in its
replies. Requests beyond every replica's limit wait here, bounded by ``max_queued_requests``.
A replica whose connection drops is removed at once: its unsent requests are routed again,
its in-flight ones fail with ``ReplicaDiedError``.

A router belongs to one event loop, but a thread that makes a blocking call may route and
send its own request (``submit_from_thread``), sparing the loop a wake-up on the way out.
``Router.lock`` makes that safe: whatever chooses a replica, adds a call to a replica's table
or changes the table of replicas holds it. A reply only pops its call (one atomic dict
operation), so it needs no lock: a replica's in-flight count is the size of that dict.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from serval._private.caller.calls import Call, NestedResponse, nested_resolver
from serval._private.caller.request_routers import CustomRouting
from serval._private.wire import messages, protocol, transport
from serval._private.wire.messages import (
    DRAINED,
    REQUEST,
    Credit,
    Drained,
    Draining,
    Error,
    ErrorPayload,
    Message,
    Reject,
    Request,
    Result,
    StreamEnd,
    StreamItem,
)
from serval._private.wire.tasks import TaskOwner
from serval._private.wire.transport import Undecodable
from serval._private.wire.types import DeploymentInfo, ReplicaInfo
from serval.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RemoteTraceback,
    ReplicaDiedError,
    RequestCancelledError,
    SerializationError,
    ServalError,
    UserCodeError,
)

logger = logging.getLogger(__name__)

_rids = itertools.count(1)


class ReplicaSlot:
    """One replica as seen from this router: its connection and the calls it holds."""

    def __init__(self, router: Router, info: ReplicaInfo) -> None:
        self.router = router
        self.info = info
        self.reported = 0
        self.calls: dict[int, Call] = {}  # in flight, by request id
        # In flight, but no longer counted against max_ongoing_requests: their callers' waits
        # timed out (see Router.release). A reply still finds them here.
        self.released: dict[int, Call] = {}
        self.unsent: list[Call] = []  # sent before the connection was up
        self.dead = False
        self.draining = False  # the replica refused work: it is shutting down
        self.conn = transport.Connection(self._on_message, self._on_lost, thread_writes=True)
        self.loop = asyncio.get_running_loop()
        self._connect_task = router.tasks.spawn(self._connect(), self.loop)

    async def _connect(self) -> None:
        try:
            await transport.dial(self.info.address, lambda: self.conn)
        except OSError as exc:
            logger.debug("cannot reach replica %s: %s", self.info.replica_id, exc)
            self._on_lost(self.conn, exc)
            return
        self.unsent.clear()

    @property
    def load(self) -> int:
        # Released calls may still be running there: they count when choosing between two.
        return max(len(self.calls) + len(self.released), self.reported)

    def send(self, call: Call) -> None:
        """Send ``call`` from the loop (``Router.lock`` held)."""
        try:
            rid, pieces = _request(call)
        except NestedResponse:
            self.router.resolve_then_submit(call)
            return
        except BaseException as exc:  # an argument's __reduce__ may raise anything
            call.set_exception(_args_error(call, exc))
            return
        self.calls[rid] = call
        call.replica = self.info.replica_id
        if not self.conn.connected:
            self.unsent.append(call)
        self.conn.send_pieces(pieces)
        call.mark_assigned()

    def send_from_thread(self, call: Call, rid: int, frame: bytes | memoryview) -> bool:
        """Send ``call``, pickled as ``frame``, from a thread that is not the loop's
        (``Router.lock`` held); False, and nothing sent, when the connection cannot take it
        from a thread now."""
        if not self.conn.connected:
            return False
        # In the table before the bytes leave: the reply may come back at once.
        self.calls[rid] = call
        call.replica = self.info.replica_id
        if self.conn.write_from_thread(frame):
            return True
        del self.calls[rid]  # nothing left, so no reply can have come
        call.replica = None
        return False

    def cancel(self, call: Call) -> None:
        if (call.rid in self.calls or call.rid in self.released) and not self.conn.closed:
            self.conn.send(messages.Cancel(messages.CANCEL, call.rid))

    def _credit(self, call: Call, nbytes: int) -> None:
        """``call``'s consumer (any thread) took ``nbytes`` more of its stream: the replica may
        send more. Sent from the loop."""
        if asyncio._get_running_loop() is self.loop:
            self._send_credit(call, nbytes)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to credit
                self.loop.call_soon_threadsafe(self._send_credit, call, nbytes)

    def _send_credit(self, call: Call, nbytes: int) -> None:
        if (call.rid in self.calls or call.rid in self.released) and not self.conn.closed:
            self.conn.send(messages.Credit(messages.CREDIT, call.rid, nbytes), call.rid, True)

    def send_input(self, call: Call, message: Any) -> None:
        if call.rid in self.calls and not self.conn.closed:
            self.conn.send(messages.Input(messages.INPUT, call.rid, message), call.rid)

    def close(self) -> None:
        self.conn.close()
        if not self._connect_task.done():
            self._connect_task.cancel()

    # -- replies -------------------------------------------------------------------------------

    def _on_message(self, conn: transport.Connection, msg: Message | Undecodable) -> None:
        try:
            if type(msg) is Result:  # the common case, first
                self.reported = msg.ongoing
                call = self.calls.pop(msg.rid, None)
                if call is None and self.released:
                    call = self.released.pop(msg.rid, None)
                self._finished()
                if call is not None:
                    call.set_result(msg.value)
                return
            self._on_other_message(msg)
        except Exception as exc:  # the call still gets an answer, and the others theirs
            self._message_failed(msg, exc)

    def _on_other_message(self, msg: Message | Undecodable) -> None:
        if isinstance(msg, Undecodable):
            call = self._pop(msg.tag)
            if call is not None:
                self._finished()
                call.set_exception(
                    SerializationError(
                        f"could not deserialize the reply of {call.label}: "
                        f"{type(msg.error).__name__}: {protocol.safe_str(msg.error)}"
                    )
                )
            return
        if type(msg) is StreamItem:
            call = self.calls.get(msg.rid) or self.released.get(msg.rid)
            if call is not None and call.stream is not None:
                if call.stream.on_taken is None:  # its first item: credit this replica from now
                    call.stream.on_taken = partial(self._credit, call)
                call.stream.put(msg.item, self.conn.frame_size)
            return
        if type(msg) is Draining:  # it stops: send nothing more, and say so
            self.draining = True
            self.conn.send(Drained(DRAINED))
            return
        if type(msg) is Credit:  # an HTTP upload's flow control (http_protocol._Upload)
            call = self.calls.get(msg.rid)
            if call is not None:
                call.credit(msg.nbytes, self.send_input)
            return
        if type(msg) not in (Error, StreamEnd, Reject):
            raise TypeError(f"a replica does not send {type(msg).__name__} messages")
        assert isinstance(msg, (Error, StreamEnd, Reject))
        call = self._pop(msg.rid)
        self.reported = msg.ongoing
        if type(msg) is Reject:
            self.draining = True
            if call is not None:
                self.router.requeue(call)
            return
        self._finished()
        if call is None:
            return
        if type(msg) is StreamEnd:
            assert call.stream is not None
            call.stream.close()
            call.set_result(None)
        elif type(msg) is Error:
            call.set_exception(rebuild_error(msg.error))

    def _pop(self, rid: int) -> Call | None:
        call = self.calls.pop(rid, None)
        if call is None and self.released:
            call = self.released.pop(rid, None)
        return call

    def _message_failed(self, msg: Any, exc: Exception) -> None:
        """Handling a reply raised: fail its call (if it can be told), keep the connection."""
        logger.error("could not handle a reply from replica %s", self.info.replica_id, exc_info=exc)
        rid = msg.tag if isinstance(msg, Undecodable) else getattr(msg, "rid", None)
        call = self._pop(rid) if type(rid) is int else None
        if call is None:
            return
        call.set_exception(
            ServalError(
                f"could not handle the reply of {call.label}: "
                f"{type(exc).__name__}: {protocol.safe_str(exc)}"
            )
        )
        with contextlib.suppress(Exception):
            self._finished()

    def release(self, call: Call) -> bool:
        """Stop counting ``call`` against this replica's ``max_ongoing_requests`` here (its
        caller gave up waiting); its reply is still delivered. ``Router.lock`` held."""
        if self.calls.pop(call.rid, None) is None:
            return False
        self.released[call.rid] = call
        return True

    def _finished(self) -> None:
        if self.router.slots.get(self.info.replica_id) is not self:
            if not self.calls and not self.released:  # removed from the table and now idle
                if self.router.retiring.get(self.info.replica_id) is self:
                    del self.router.retiring[self.info.replica_id]
                self.close()
            return
        self.router.dispatch()

    def _on_lost(self, conn: transport.Connection, exc: BaseException | None) -> None:
        with self.router.lock:  # no thread adds a call to the table once it is swapped out
            if self.dead:
                return
            self.dead = True
            calls, self.calls = self.calls, {}
            calls.update(self.released)
            self.released = {}
        unsent = {id(c) for c in self.unsent}
        reroute = []
        for call in calls.values():
            if id(call) in unsent:
                reroute.append(call)
            else:
                call.set_exception(
                    ReplicaDiedError(
                        f"replica {self.info.replica_id} died (or closed its connection) while "
                        f"serving {call.label}"
                    )
                )
        self.router.replica_lost(self, reroute)


def rebuild_error(payload: ErrorPayload) -> BaseException:
    """Turn the replica's error payload back into the user's exception, traceback attached."""
    exc = payload.exc
    if exc is None:
        return UserCodeError(payload.type_name, payload.message, payload.traceback)
    if payload.traceback:
        exc.__cause__ = RemoteTraceback(payload.traceback)
    return exc


def _request(call: Call) -> tuple[int, list[bytes | memoryview]]:
    """A new request id for ``call`` and its request frame; raises if an argument does not
    pickle."""
    call.rid = rid = next(_rids)
    msg = Request(REQUEST, rid, call.method, call.args, call.kwargs, call.meta)
    return rid, protocol.encode(msg, rid, call.plain)


def _args_error(call: Call, exc: BaseException) -> SerializationError:
    try:
        where, value, cause = protocol.find_unpicklable(call.args, call.kwargs)
    except LookupError:
        return SerializationError(f"could not serialize the request to {call.label}: {exc!r}")
    return protocol.serialization_error(f"{where} of {call.label}", value, cause)


class Router:
    def __init__(
        self,
        info: DeploymentInfo,
        on_queued: Callable[[], None] | None = None,
        tasks: TaskOwner | None = None,
    ) -> None:
        self.info = info
        # Its replicas' connects belong to its client (or to itself, standing alone).
        self.tasks = tasks if tasks is not None else TaskOwner(f"router of {info.app}.{info.name}")
        self.slots: dict[str, ReplicaSlot] = {}
        # Gone from the table but still serving calls sent before: a cancellation or more
        # input for those must still reach them (a rolling update retires replicas this way).
        self.retiring: dict[str, ReplicaSlot] = {}
        self.queue: deque[Call] = deque()
        self.deleted = False
        self._on_queued = on_queued  # told when requests start waiting (for the autoscaler)
        # Re-entrant: a reply's callbacks may route again on the same thread. Nothing that
        # holds it waits for another thread.
        self.lock = threading.RLock()
        # Calls a thread handed to the loop and the loop has not routed yet: while there are
        # any, threads hand theirs over too, so that one thread's calls leave in order.
        self.handed_over = 0
        self.custom: CustomRouting | None = None  # a custom request router, if it has one
        self.update(info)

    @property
    def label(self) -> str:
        return f"{self.info.app}.{self.info.name}"

    def deleted_error(self) -> DeploymentUnavailableError:
        return DeploymentUnavailableError(f"deployment {self.label} was deleted")

    @property
    def waiting(self) -> int:
        """Calls waiting here to be routed (what the autoscaler counts as queued)."""
        return len(self.queue) + (self.custom.waiting if self.custom is not None else 0)

    def update(self, info: DeploymentInfo) -> None:
        with self.lock:
            self.info = info
            self._set_custom(info)
            wanted = {r.replica_id: r for r in info.replicas}
            for rid in list(self.slots):
                if rid not in wanted:
                    # Gone from the table: no more work; in-flight calls finish on their own.
                    slot = self.slots.pop(rid)
                    if not slot.calls and not slot.released:
                        slot.close()
                    else:
                        self.retiring[rid] = slot
            for rid, rinfo in wanted.items():
                known = self.slots.get(rid)
                if known is None:
                    self.slots[rid] = ReplicaSlot(self, rinfo)
                elif known.info != rinfo:
                    known.info = rinfo
            self.dispatch()
            if self.custom is not None:
                self.custom.replicas_changed()

    def _set_custom(self, info: DeploymentInfo) -> None:
        config = info.request_router
        if config is None or config.is_default():
            self.custom = None
        elif self.custom is None or self.custom.config != config:
            self.custom = CustomRouting(self, config)  # (one that cannot load fails its calls)

    def delete(self) -> None:
        """The deployment is gone: fail what waits here."""
        with self.lock:
            self.deleted = True
            waiting, self.queue = self.queue, deque()
        for call in waiting:
            call.set_exception(self.deleted_error())

    def submit(self, call: Call) -> None:
        if self.deleted:
            call.set_exception(self.deleted_error())
            return
        if self.custom is not None:
            self._submit_custom(call, self.custom)
            return
        with self.lock:
            if not self.queue:
                slot = self._choose(call)
                if slot is not None:
                    slot.send(call)
                    return
            limit = self.info.max_queued_requests
            if limit != -1 and len(self.queue) >= limit:
                call.set_exception(BackPressureError(self.label, len(self.queue), limit))
                return
            self.queue.append(call)
        if len(self.queue) == 1 and self._on_queued is not None:
            self._on_queued()

    def _submit_custom(self, call: Call, custom: CustomRouting) -> None:
        limit = self.info.max_queued_requests
        if limit != -1 and custom.waiting >= limit:
            call.set_exception(BackPressureError(self.label, custom.waiting, limit))
            return
        custom.submit(call)
        if custom.waiting == 1 and self._on_queued is not None:
            self._on_queued()

    def submit_from_thread(self, call: Call) -> bool:
        """Route and send ``call`` on the calling thread, which is not the loop's, when that
        is simple: the deployment has a replica with room, connected, whose connection has
        nothing waiting to go, and nothing queues here. False otherwise, with nothing done
        but counting the call as handed over: the caller then hands it to the loop, which
        ends with ``handed_over_routed``."""
        try:
            rid, pieces = _request(call)
        except BaseException:  # the loop's path reports it, naming the argument
            pieces = []
        with self.lock:
            simple = not (self.deleted or self.queue or self.handed_over or self.custom)
            if len(pieces) == 1 and simple:
                slot = self._choose(call)
                if slot is not None and slot.send_from_thread(call, rid, pieces[0]):
                    call.mark_assigned()
                    return True
            self.handed_over += 1
            return False

    def resolve_then_submit(self, call: Call) -> None:
        """``call``'s arguments hold responses not ready to send: resolve them, then route it
        again (``lock`` held: the resolution runs in a task of its own)."""
        resolve = nested_resolver()
        if call.resolved or resolve is None:
            call.set_exception(
                SerializationError(
                    f"a DeploymentResponse inside an argument of {call.label} could not be "
                    "resolved there (it is resolved in lists, tuples, dicts, sets and "
                    "dataclasses); await it first"
                )
            )
            return
        call.resolved = True
        self.tasks.spawn(self._resolve_then_submit(call, resolve))

    async def _resolve_then_submit(self, call: Call, resolve: Callable[[Call], Any]) -> None:
        try:
            await resolve(call)
        except BaseException as exc:  # an argument's own failure is this call's failure
            call.set_exception(exc)
            return
        self.submit(call)

    def handed_over_routed(self, call: Call) -> None:
        """On the loop: route a call a thread handed over (see ``submit_from_thread``)."""
        with self.lock:  # routed before any later call of a thread can go on its own
            self.handed_over -= 1
            self.submit(call)

    def release(self, call: Call) -> bool:
        """``call``'s caller gave up waiting for it (its ``result(timeout_s=)`` expired):
        from now on it does not count against its replica's ``max_ongoing_requests`` at this
        router, so a replica that never answers cannot hold this caller's slots for good. The
        replica still enforces the limit itself (more work waits there), and a late reply is
        still delivered. True if a slot was freed (then ``dispatch`` on the loop)."""
        with self.lock:
            slot = self.slot_of(call)
            return slot is not None and slot.release(call)

    def slot_of(self, call: Call) -> ReplicaSlot | None:
        """The replica ``call`` was sent to, in the table or retiring from it."""
        if call.replica is None:
            return None
        return self.slots.get(call.replica) or self.retiring.get(call.replica)

    def cancel(self, call: Call) -> None:
        with self.lock:
            if call.replica is None:
                try:
                    self.queue.remove(call)
                except ValueError:
                    pass
            else:
                slot = self.slot_of(call)
                if slot is not None:
                    slot.cancel(call)
        call.set_exception(RequestCancelledError(f"request to {call.label} was cancelled"))

    def send_input(self, call: Call, message: Any) -> None:
        slot = self.slot_of(call)
        if slot is not None:
            slot.send_input(call, message)

    def dispatch(self) -> None:
        if self.custom is not None:  # (a slot may be free: the custom router tries again)
            self.custom.slot_freed()
        if not self.queue:  # the common case: nothing waits, no lock to take
            return
        with self.lock:
            while self.queue:
                slot = self._choose(self.queue[0])
                if slot is None:
                    return
                slot.send(self.queue.popleft())

    def _choose(self, call: Call) -> ReplicaSlot | None:
        """A replica with room for ``call`` (``lock`` held), or None."""
        limit = self.info.max_ongoing_requests
        meta = call.meta
        model = meta.get("multiplexed_model_id") if meta else None
        if len(self.slots) == 1 and not model:  # the common single-replica case, no lists
            (only,) = self.slots.values()
            ok = len(only.calls) < limit and not only.dead and not only.draining
            return only if ok else None
        free = [
            s for s in self.slots.values() if len(s.calls) < limit and not s.dead and not s.draining
        ]
        if not free:
            return None
        if model:
            holding = [s for s in free if model in s.info.model_ids]
            if holding:
                free = holding
        if len(free) == 1:
            return free[0]
        a, b = random.sample(free, 2)
        return a if a.load <= b.load else b

    def requeue(self, call: Call) -> None:
        """A call a draining replica refused: first in line again."""
        with self.lock:
            self._first_in_line(call)
            self.dispatch()

    def replica_lost(self, slot: ReplicaSlot, reroute: list[Call]) -> None:
        with self.lock:
            if self.slots.get(slot.info.replica_id) is slot:
                del self.slots[slot.info.replica_id]
            if self.retiring.get(slot.info.replica_id) is slot:
                del self.retiring[slot.info.replica_id]
            for call in reversed(reroute):
                self._first_in_line(call)
            self.dispatch()

    def _first_in_line(self, call: Call) -> None:
        """Route ``call`` again, before the calls waiting here; or fail it if the deployment
        is gone (its replicas refuse work as they drain: nothing would ever take it)."""
        call.replica = None
        if call.done.fired:
            return
        if self.deleted:
            call.set_exception(self.deleted_error())
        else:
            self.queue.appendleft(call)
