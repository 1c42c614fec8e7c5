"""The caller's router (``caller/router.py``) against in-process replicas.

Nothing on the request path is mocked: the router dials each replica's Unix socket through
``transport.dial`` as it does in serval, and every replica here is a small asyncio server
speaking ``wire/messages.py`` through ``transport.Connection`` (``FakeReplica``). The test
decides when, and with what, each replica answers, so the router's choice (power of two
choices by load), its limits (``max_ongoing_requests`` per replica, ``max_queued_requests``),
its queue, and its handling of refusals, draining, released and lost calls are checked as a
user would see them: where requests arrive, and how each call ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from serval._private.caller.calls import Call
from serval._private.caller.router import Router
from serval._private.wire import transport
from serval._private.wire.messages import (
    CANCEL,
    CREDIT,
    CREDIT_EVERY,
    DRAINED,
    DRAINING,
    ERROR,
    REJECT,
    REQUEST,
    RESULT,
    STREAM_END,
    STREAM_ITEM,
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
from wire_peers import LOOPS, run, until

pytestmark = pytest.mark.parametrize("loop", list(LOOPS))

WAIT = 5.0  # seconds any one thing may take before the test fails


class FakeReplica:
    """A replica in this process: it takes requests and holds them until the test answers.
    Everything it receives is kept in order (``received``); ``held`` are the requests it has
    not answered; ``most`` the most it ever held at once."""

    def __init__(self, replica_id: str, path: Path, model_ids: frozenset[str] = frozenset()):
        self.info = ReplicaInfo(replica_id, str(path), model_ids)
        self.received: list[Message | transport.Undecodable] = []
        self.held: dict[int, tuple[transport.Connection, Request]] = {}
        self.most = 0
        self.conns: list[transport.Connection] = []
        self.lost = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> FakeReplica:
        self.server = await transport.listen(self.info.address, self._accept)
        return self

    def _accept(self) -> transport.Connection:
        conn = transport.Connection(self._on_message, self._on_lost)
        self.conns.append(conn)
        return conn

    def _on_message(self, conn: transport.Connection, msg: Message | transport.Undecodable) -> None:
        self.received.append(msg)
        if type(msg) is Request:
            self.held[msg.rid] = (conn, msg)
            self.most = max(self.most, len(self.held))

    def _on_lost(self, conn: transport.Connection, exc: BaseException | None) -> None:
        self.lost += 1

    # -- what it got ---------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        return [m for m in self.received if type(m) is Request]

    def args(self) -> list[Any]:
        """The first argument of every request it got, in order (the tests number calls)."""
        return [r.args[0] for r in self.requests]

    def kinds(self) -> list[int]:
        return [m.kind for m in self.received if not isinstance(m, transport.Undecodable)]

    async def wait_requests(self, count: int) -> list[Request]:
        await until(lambda: len(self.requests) >= count, f"{count} requests at {self.info}")
        return self.requests

    def rid_of(self, arg: Any) -> int:
        (rid,) = [r.rid for r in self.requests if r.args[0] == arg]
        return rid

    # -- answers -------------------------------------------------------------------------------

    def _take(self, arg: Any) -> tuple[transport.Connection, Request]:
        rid = self.rid_of(arg)
        return self.held.pop(rid)

    def reply(self, arg: Any, value: Any = None, ongoing: int | None = None) -> None:
        """Answer the request whose first argument is ``arg`` (by default with ``arg``)."""
        conn, req = self._take(arg)
        value = arg if value is None else value
        left = len(self.held) if ongoing is None else ongoing
        conn.send(Result(RESULT, req.rid, value, left), req.rid)

    def fail(self, arg: Any, payload: ErrorPayload) -> None:
        conn, req = self._take(arg)
        conn.send(Error(ERROR, req.rid, payload, len(self.held)), req.rid)

    def reject(self, arg: Any) -> None:
        conn, req = self._take(arg)
        conn.send(Reject(REJECT, req.rid, None, len(self.held)), req.rid)

    def drain(self) -> None:
        for conn in self.conns:
            if not conn.closed:
                conn.send(Draining(DRAINING))

    def kill(self) -> None:
        """Die: every connection drops, nothing listens any more."""
        if self.server is not None:
            self.server.close()
        for conn in self.conns:
            conn.close()
        self.held.clear()

    def close(self) -> None:
        self.kill()


def info(*replicas: FakeReplica, max_ongoing: int = 100, max_queued: int = -1) -> DeploymentInfo:
    return DeploymentInfo("app", "dep", max_ongoing, max_queued, tuple(r.info for r in replicas))


def call(n: Any, meta: dict[str, Any] | None = None, stream: bool = False) -> Call:
    return Call("app", "dep", "__call__", (n,), {}, meta, stream)


async def outcome(c: Call) -> Any:
    """The call's value, or the exception it ended with (returned, not raised)."""
    try:
        return await asyncio.wait_for(c.result_async(), WAIT)
    except (ServalError, ValueError, RuntimeError) as exc:
        return exc


def on_loop(
    loop: str, tmp_path: Path, count: int, test: Callable[..., Coroutine[Any, Any, None]]
) -> None:
    """Run ``test(*replicas)`` with ``count`` fake replicas started, and stop them after."""

    async def main() -> None:
        replicas = [
            await FakeReplica(f"r{i}", tmp_path / f"r{i}.sock").start() for i in range(count)
        ]
        try:
            await test(*replicas)
        finally:
            for r in replicas:
                r.close()

    run(loop, main)


async def close_router(router: Router) -> None:
    """Close every connection of ``router`` and wait for its connect tasks."""
    slots = [*router.slots.values(), *router.retiring.values()]
    for slot in slots:
        slot.close()
    await asyncio.gather(*(s._connect_task for s in slots), return_exceptions=True)


async def connected(router: Router) -> None:
    await until(
        lambda: all(s.conn.connected for s in router.slots.values()), "connections to replicas"
    )


# -- the choice ---------------------------------------------------------------------------------


def test_two_replicas_share_the_load(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica, b: FakeReplica) -> None:
        router = Router(info(a, b))
        try:
            calls = [call(i) for i in range(10)]
            for c in calls:
                router.submit(c)  # of two, the less loaded: they take turns
            await a.wait_requests(5)
            await b.wait_requests(5)
            assert len(a.requests) == len(b.requests) == 5
            for r in (a, b):
                for arg in r.args():
                    r.reply(arg)
            assert [await outcome(c) for c in calls] == list(range(10))
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 2, test)


def test_the_load_a_replica_reports_steers_the_choice(loop: str, tmp_path: Path) -> None:
    """A replica busy with other callers' requests says so in its replies: this router then
    prefers the others, though it has nothing in flight anywhere."""

    async def test(a: FakeReplica, b: FakeReplica, c: FakeReplica) -> None:
        # Each replica answers with its own load (other callers' requests); calls go out one at
        # a time until every replica has answered once.
        background = {"r0": 0, "r1": 10, "r2": 20}
        router = Router(info(a, b, c))
        try:
            for n in range(100):
                if all(r.requests for r in (a, b, c)):
                    break
                router.submit(call(f"warm {n}"))
                await until(lambda: any(r.held for r in (a, b, c)), "the warm-up request")
                (got,) = [r for r in (a, b, c) if r.held]
                got.reply(f"warm {n}", ongoing=background[got.info.replica_id])
                slot = router.slots[got.info.replica_id]
                await until(lambda s=slot: not s.calls, "the reply")
            warm = {r.info.replica_id: len(r.requests) for r in (a, b, c)}
            assert {s.info.replica_id: s.load for s in router.slots.values()} == {
                "r0": 0,
                "r1": 10,
                "r2": 20,
            }
            calls = [call(i) for i in range(10)]
            for x in calls:
                router.submit(x)
            await until(
                lambda: len(a.requests) + len(b.requests) == warm["r0"] + warm["r1"] + 10,
                "the ten requests",
            )
            # The most loaded is never one of the two chosen from: each pair has a lighter one.
            assert len(c.requests) == warm["r2"]
            for r in (a, b):
                for _, req in list(r.held.values()):
                    r.reply(req.args[0], ongoing=background[r.info.replica_id])
            assert [await outcome(x) for x in calls] == list(range(10))
            # Of two, the one reporting less takes every call until it holds as many itself.
            router.update(info(a, b))
            before = len(a.requests), len(b.requests)
            more = [call(f"more {i}") for i in range(10)]
            for x in more:
                router.submit(x)
            await until(lambda: len(a.requests) == before[0] + 10, "ten more at r0")
            assert len(b.requests) == before[1]
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 3, test)


def test_multiplexed_models_go_where_they_are_loaded(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica, b: FakeReplica, c: FakeReplica) -> None:
        a.info = ReplicaInfo(a.info.replica_id, a.info.address, frozenset({"m1"}))
        b.info = ReplicaInfo(b.info.replica_id, b.info.address, frozenset({"m2"}))
        router = Router(info(a, b, c, max_ongoing=3))
        try:
            m1 = [call(f"m1-{i}", {"multiplexed_model_id": "m1"}) for i in range(3)]
            m2 = [call(f"m2-{i}", {"multiplexed_model_id": "m2"}) for i in range(2)]
            for x in m1 + m2:
                router.submit(x)
            await a.wait_requests(3)
            await b.wait_requests(2)
            assert a.args() == ["m1-0", "m1-1", "m1-2"] and b.args() == ["m2-0", "m2-1"]
            assert c.requests == []
            # The replica holding m1 is full: the next m1 request goes where there is room.
            extra = call("m1-extra", {"multiplexed_model_id": "m1"})
            router.submit(extra)
            await until(lambda: "m1-extra" in b.args() + c.args(), "m1-extra elsewhere")
            assert len(a.requests) == 3
            # A model nobody holds: anywhere with room, by load (c is the idlest by far).
            other = call("m3", {"multiplexed_model_id": "m3"})
            router.submit(other)
            await until(lambda: "m3" in b.args() + c.args(), "m3 where there is room")
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 3, test)


# -- limits and the queue ------------------------------------------------------------------------


def test_limits_queue_and_back_pressure(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica, b: FakeReplica) -> None:
        queued_told = []
        router = Router(info(a, b, max_ongoing=2, max_queued=3), lambda: queued_told.append(1))
        try:
            calls = [call(i) for i in range(7)]
            for c in calls:
                router.submit(c)
            await a.wait_requests(2)
            await b.wait_requests(2)
            assert len(router.queue) == 3 and queued_told == [1]  # told once, when it began
            # The queue is full: the next call is refused at once, naming the limit.
            refused = call("one too many")
            router.submit(refused)
            assert refused.done.fired
            error = await outcome(refused)
            assert isinstance(error, BackPressureError)
            assert error.num_queued == 3 and error.max_queued == 3 and "app.dep" in str(error)
            # Replies free slots: the queue leaves in order, each to the replica with room.
            sent = a.args() + b.args()
            assert sorted(sent) == [0, 1, 2, 3]
            a.reply(a.args()[0])
            await a.wait_requests(3)
            assert a.args()[2] == 4 and len(router.queue) == 2
            b.reply(b.args()[0])
            b.reply(b.args()[1])
            await b.wait_requests(4)
            assert b.args()[2:] == [5, 6] and not router.queue
            while a.held or b.held:
                for r in (a, b):
                    for _, req in list(r.held.values()):
                        r.reply(req.args[0])
                await asyncio.sleep(0)
            assert [await outcome(c) for c in calls] == list(range(7))
            assert a.most <= 2 and b.most <= 2  # never more than max_ongoing_requests
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 2, test)


def test_many_calls_never_exceed_the_limit(loop: str, tmp_path: Path) -> None:
    """Two hundred calls over three replicas that answer as they can: each replica holds at
    most max_ongoing_requests at any time, and every call gets its own answer."""

    async def test(*replicas: FakeReplica) -> None:
        router = Router(info(*replicas, max_ongoing=4))
        try:
            calls = [call(i) for i in range(200)]
            for c in calls:
                router.submit(c)
            answered = 0
            while answered < 200:
                await until(lambda: any(r.held for r in replicas), "a request to answer")
                for r in replicas:
                    for _, req in list(r.held.values())[:2]:  # answer part of what is held
                        r.reply(req.args[0])
                        answered += 1
                await asyncio.sleep(0)
            assert [await outcome(c) for c in calls] == list(range(200))
            assert [r.most for r in replicas] == [4, 4, 4]
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 3, test)


def test_release_frees_a_slot_and_the_late_reply_still_arrives(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica) -> None:
        router = Router(info(a, max_ongoing=1))
        try:
            slow, waiting = call("slow"), call("waiting")
            router.submit(slow)
            router.submit(waiting)
            await a.wait_requests(1)
            assert list(router.queue) == [waiting]
            # The caller of "slow" gave up waiting: its slot is free here.
            assert router.release(slow) is True
            assert router.release(slow) is False  # (once)
            newcomer = call("newcomer")  # before the queue moves: it must not overtake
            router.submit(newcomer)
            assert list(router.queue) == [waiting, newcomer]
            router.dispatch()
            await a.wait_requests(2)
            assert a.args() == ["slow", "waiting"] and list(router.queue) == [newcomer]
            a.reply("waiting")
            assert await outcome(waiting) == "waiting"
            await a.wait_requests(3)
            a.reply("newcomer")
            assert await outcome(newcomer) == "newcomer"
            a.reply("slow")  # late, but it still resolves its call
            assert await outcome(slow) == "slow"
            assert router.release(call("never sent")) is False
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 1, test)


def test_cancel_queued_and_sent_calls(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica) -> None:
        router = Router(info(a, max_ongoing=1))
        try:
            sent, queued, last = call("sent"), call("queued"), call("last")
            for c in (sent, queued, last):
                router.submit(c)
            await a.wait_requests(1)
            router.cancel(queued)  # never leaves
            assert isinstance(await outcome(queued), RequestCancelledError)
            router.cancel(sent)  # the replica is told
            assert isinstance(await outcome(sent), RequestCancelledError)
            await until(lambda: CANCEL in a.kinds(), "the cancellation at the replica")
            cancel = next(m for m in a.received if getattr(m, "kind", None) == CANCEL)
            assert cancel.rid == a.rid_of("sent")
            # The replica answers the cancelled request (it stopped it): the slot frees.
            a.fail("sent", ErrorPayload(None, "RequestCancelledError", "cancelled", ""))
            await a.wait_requests(2)
            assert a.args() == ["sent", "last"]
            a.reply("last")
            assert await outcome(last) == "last"
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 1, test)


# -- draining and refusals -----------------------------------------------------------------------


def test_a_reject_requeues_the_call_first_in_line(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica, b: FakeReplica) -> None:
        router = Router(info(a, max_ongoing=1))
        try:
            calls = [call(i) for i in range(3)]
            for c in calls:
                router.submit(c)
            await a.wait_requests(1)
            a.reject(0)  # a draining replica refuses: not run, to be routed elsewhere
            await until(lambda: len(router.queue) == 3, "the refused call back in the queue")
            assert list(router.queue) == calls  # first in line again
            router.update(info(a, b, max_ongoing=1))  # a new replica takes over
            await b.wait_requests(1)
            assert b.args() == [0]
            for i in range(3):
                await b.wait_requests(i + 1)
                b.reply(i)
            assert [await outcome(c) for c in calls] == [0, 1, 2]
            assert a.args() == [0]  # the refusing replica got nothing more
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 2, test)


def test_draining_is_answered_and_nothing_more_goes_there(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica, b: FakeReplica) -> None:
        router = Router(info(a, b))
        try:
            await connected(router)
            a.drain()
            await until(lambda: DRAINED in a.kinds(), "Drained from the router")
            assert a.kinds() == [DRAINED]
            calls = [call(i) for i in range(6)]
            for c in calls:
                router.submit(c)
            await b.wait_requests(6)
            assert a.requests == []
            for i in range(6):
                b.reply(i)
            assert [await outcome(c) for c in calls] == list(range(6))
            # The last replica drains too: calls wait (they do not fail) for the next one.
            b.drain()
            await until(lambda: DRAINED in b.kinds(), "Drained from the router")
            waiting = call("waiting")
            router.submit(waiting)
            assert list(router.queue) == [waiting]
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 2, test)


def test_requests_sent_before_draining_arrive_before_drained(loop: str, tmp_path: Path) -> None:
    """The connection is ordered: once the replica has Drained, no request of this caller is
    still on its way (what the replica's drain relies on)."""

    async def test(a: FakeReplica) -> None:
        router = Router(info(a))
        try:
            await connected(router)
            a.drain()
            for i in range(5):  # sent before the router has heard of the draining
                router.submit(call(i))
            await until(lambda: DRAINED in a.kinds(), "Drained from the router")
            assert a.kinds() == [REQUEST] * 5 + [DRAINED]
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 1, test)


def test_a_retired_replica_finishes_its_calls_then_is_closed(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica, b: FakeReplica) -> None:
        router = Router(info(a))
        try:
            first = call("first")
            router.submit(first)
            await a.wait_requests(1)
            router.update(info(b))  # a rolling update replaced a with b
            assert "r0" in router.retiring and "r0" not in router.slots
            later = call("later")
            router.submit(later)
            await b.wait_requests(1)
            b.reply("later")
            a.reply("first")  # the retired replica still answers what it had
            assert await outcome(first) == "first" and await outcome(later) == "later"
            await until(lambda: a.lost == 1, "the retired replica's connection closed")
            assert "r0" not in router.retiring
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 2, test)


# -- lost replicas -------------------------------------------------------------------------------


def test_a_lost_replica_fails_its_calls_in_flight(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica, b: FakeReplica) -> None:
        router = Router(info(a, max_ongoing=1))
        try:
            inflight, queued = call("in flight"), call("queued")
            router.submit(inflight)
            router.submit(queued)
            await a.wait_requests(1)
            a.kill()
            error = await outcome(inflight)
            assert isinstance(error, ReplicaDiedError) and "r0" in str(error)
            assert "r0" not in router.slots
            assert list(router.queue) == [queued]  # not failed: it waits for a replica
            router.update(info(b, max_ongoing=1))
            await b.wait_requests(1)
            b.reply("queued")
            assert await outcome(queued) == "queued"
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 2, test)


def test_calls_to_a_replica_never_reached_are_rerouted(loop: str, tmp_path: Path) -> None:
    """A replica that cannot be reached (its socket is gone) never got the calls sent to it
    before its connection was up: they go to another replica, and succeed."""

    async def test(b: FakeReplica) -> None:
        gone = FakeReplica("gone", tmp_path / "nobody-listens.sock")
        router = Router(info(gone, b, max_ongoing=1))
        try:
            calls = [call(0), call(1)]
            for c in calls:  # one to each: neither connection is up yet
                router.submit(c)
            assert {c.replica for c in calls} == {"gone", "r0"}
            await b.wait_requests(1)
            b.reply(b.args()[0])
            await b.wait_requests(2)
            b.reply(b.args()[1])
            assert sorted([await outcome(c) for c in calls]) == [0, 1]
            assert "gone" not in router.slots
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 1, test)


# -- replies -------------------------------------------------------------------------------------


def test_errors_arrive_as_the_users_exception(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica) -> None:
        router = Router(info(a))
        try:
            own, foreign = call("own"), call("foreign")
            router.submit(own)
            router.submit(foreign)
            await a.wait_requests(2)
            tb = 'Traceback (most recent call last):\n  File "model.py", line 3\n'
            a.fail("own", ErrorPayload(ValueError("bad input"), "ValueError", "bad input", tb))
            a.fail("foreign", ErrorPayload(None, "users.ModelError", "no weights", tb))
            error = await outcome(own)
            assert type(error) is ValueError and str(error) == "bad input"
            assert isinstance(error.__cause__, RemoteTraceback) and "model.py" in str(
                error.__cause__
            )
            error = await outcome(foreign)  # its class did not cross: named, with its message
            assert isinstance(error, UserCodeError)
            assert (error.type_name, error.message) == ("users.ModelError", "no weights")
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 1, test)


def _refuse_to_load() -> None:
    raise ImportError("No module named 'users_module'")


class Unloadable:
    def __reduce__(self) -> Any:
        return (_refuse_to_load, ())


def test_a_reply_that_does_not_unpickle_fails_only_its_call(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica) -> None:
        router = Router(info(a, max_ongoing=1))
        try:
            bad, good = call("bad"), call("good")
            router.submit(bad)
            router.submit(good)
            await a.wait_requests(1)
            a.reply("bad", value=Unloadable())
            error = await outcome(bad)
            assert isinstance(error, SerializationError)
            assert "dep.__call__" in str(error) and "users_module" in str(error)
            await a.wait_requests(2)  # the slot was freed
            a.reply("good")
            assert await outcome(good) == "good"
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 1, test)


def test_a_message_a_replica_does_not_send_fails_its_call(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica) -> None:
        router = Router(info(a))
        try:
            odd, fine = call("odd"), call("fine")
            router.submit(odd)
            router.submit(fine)
            await a.wait_requests(2)
            conn, req = a._take("odd")
            conn.send(Request(REQUEST, req.rid, "x", (), {}, None), req.rid)  # not a reply
            error = await outcome(odd)
            assert type(error) is ServalError and "could not handle the reply" in str(error)
            a.reply("fine")  # the connection is still good
            assert await outcome(fine) == "fine"
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 1, test)


def test_a_stream_arrives_in_order_and_credits_the_replica(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica) -> None:
        router = Router(info(a))
        try:
            streamed = call("stream", stream=True)
            router.submit(streamed)
            (req,) = await a.wait_requests(1)
            conn = a.held[req.rid][0]
            item = b"\x05" * 60_000
            count = 2 * CREDIT_EVERY // len(item) + 3  # more than two credits' worth
            for i in range(count):
                conn.send(StreamItem(STREAM_ITEM, req.rid, (i, item)), req.rid)
            stream = streamed.stream
            assert stream is not None
            got = []
            for _ in range(count):
                got.append(await asyncio.wait_for(stream.next_async(), WAIT))
            assert [i for i, _ in got] == list(range(count))
            assert all(body == item for _, body in got)

            def credits() -> list[Any]:
                return [m for m in a.received if getattr(m, "kind", None) == CREDIT]

            # Credits leave as items are taken; a request sent now arrives after all of them.
            router.submit(call("marker"))
            await a.wait_requests(2)
            credits = credits()
            assert len(credits) == 2 and all(c.rid == req.rid for c in credits)
            assert all(c.nbytes >= CREDIT_EVERY for c in credits)  # whole frames, in batches
            assert sum(c.nbytes for c in credits) <= count * (len(item) + 200)
            del a.held[req.rid]
            conn.send(StreamEnd(STREAM_END, req.rid, None, 0), req.rid)
            with pytest.raises(StopAsyncIteration):
                await asyncio.wait_for(stream.next_async(), WAIT)
            assert await outcome(streamed) is None
            a.reply("marker")
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 1, test)


# -- the deployment's end, and calls from threads ------------------------------------------------


def test_deleting_the_deployment_fails_what_waits(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica) -> None:
        router = Router(info(a, max_ongoing=1))
        try:
            sent, queued = call("sent"), call("queued")
            router.submit(sent)
            router.submit(queued)
            await a.wait_requests(1)
            router.delete()
            assert isinstance(await outcome(queued), DeploymentUnavailableError)
            late = call("late")
            router.submit(late)
            assert isinstance(await outcome(late), DeploymentUnavailableError)
            a.reply("sent")  # what was on its way still ends normally
            assert await outcome(sent) == "sent"
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 1, test)


def test_a_thread_sends_its_own_call_or_hands_it_over_in_order(loop: str, tmp_path: Path) -> None:
    async def test(a: FakeReplica) -> None:
        aloop = asyncio.get_running_loop()
        router = Router(info(a, max_ongoing=1))
        try:
            await connected(router)

            def from_thread(c: Call) -> bool:
                if router.submit_from_thread(c):
                    return True
                aloop.call_soon_threadsafe(router.handed_over_routed, c)
                return False

            first = call("first")
            assert await asyncio.to_thread(from_thread, first)  # sent by the thread itself
            await a.wait_requests(1)
            assert first.is_assigned and first.replica == "r0"
            # The replica is full: the thread hands its calls to the loop, which keeps them
            # in the thread's order.
            second, third = call("second"), call("third")

            def two() -> list[bool]:
                return [from_thread(second), from_thread(third)]

            assert await asyncio.to_thread(two) == [False, False]
            await until(lambda: len(router.queue) == 2, "the handed-over calls queued")
            assert list(router.queue) == [second, third] and router.handed_over == 0
            # A call a thread cannot send itself (its frame is in several pieces: a large
            # argument) is handed over; the thread's next call, though there is room, must be
            # too, or it would overtake it.
            a.reply("first")
            await until(lambda: len(a.requests) == 2, "second sent")
            large, small = call(b"\x00" * 100_000), call("small")
            router.update(info(a, max_ongoing=10))  # room for all: "third" leaves too
            await a.wait_requests(3)

            def large_then_small() -> list[bool]:
                sent = [router.submit_from_thread(large), router.submit_from_thread(small)]
                assert router.handed_over == 2
                for c in (large, small):
                    aloop.call_soon_threadsafe(router.handed_over_routed, c)
                return sent

            assert await asyncio.to_thread(large_then_small) == [False, False]
            await a.wait_requests(5)
            assert a.args()[3:] == [b"\x00" * 100_000, "small"]
            for _, req in list(a.held.values()):
                a.reply(req.args[0])
            assert await outcome(large) == b"\x00" * 100_000 and await outcome(small) == "small"
            results = await asyncio.to_thread(
                lambda: [c.result_sync(WAIT) for c in (first, second, third)]
            )
            assert results == ["first", "second", "third"]
            assert a.args()[:3] == ["first", "second", "third"]
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 1, test)


def test_threads_and_the_loop_submitting_at_once(loop: str, tmp_path: Path) -> None:
    """Four threads send calls (by themselves when they can, else through the loop) while the
    loop submits its own: every call reaches a replica once, within the limit, and ends with
    its own answer."""

    async def test(a: FakeReplica, b: FakeReplica) -> None:
        aloop = asyncio.get_running_loop()
        router = Router(info(a, b, max_ongoing=8))
        try:
            await connected(router)
            per_thread = 50
            start = threading.Barrier(4)
            by_thread = [[call(f"t{t}-{i}") for i in range(per_thread)] for t in range(4)]
            by_loop = [call(f"loop-{i}") for i in range(50)]

            def work(calls: list[Call]) -> list[Any]:
                start.wait()
                for c in calls:
                    if not router.submit_from_thread(c):
                        aloop.call_soon_threadsafe(router.handed_over_routed, c)
                return [c.result_sync(WAIT * 2) for c in calls]

            async def answer() -> None:
                total = 4 * per_thread + len(by_loop)
                answered = 0
                while answered < total:
                    await until(lambda: a.held or b.held, "requests to answer")
                    for r in (a, b):
                        for _, req in list(r.held.values()):
                            r.reply(req.args[0])
                            answered += 1
                    await asyncio.sleep(0)

            async def loop_calls() -> None:
                for c in by_loop:
                    router.submit(c)
                    await asyncio.sleep(0)

            results = await asyncio.gather(
                answer(), loop_calls(), *(asyncio.to_thread(work, calls) for calls in by_thread)
            )
            for t, got in enumerate(results[2:]):
                assert got == [f"t{t}-{i}" for i in range(per_thread)]
            assert [await outcome(c) for c in by_loop] == [f"loop-{i}" for i in range(50)]
            sent = a.args() + b.args()
            assert len(sent) == len(set(sent)) == 250
            assert a.most <= 8 and b.most <= 8
        finally:
            await close_router(router)

    on_loop(loop, tmp_path, 2, test)
