"""The control plane's calls (``wire/rpc.py``) over a real Unix socket: calls and replies
matched by id under concurrency and in both directions, exceptions that cross with their type
(or, for a class the other side may not have, as a RuntimeError naming it), pushes, a lost
connection that fails pending calls and stops what was being served for it, and a call or a
reply that does not unpickle on the other side (a class that process cannot import) answered
with an error naming the reason, instead of leaving the caller waiting for ever."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from serval._private.wire import transport
from serval._private.wire.messages import PUSH, Push
from serval._private.wire.rpc import RpcPeer
from serval.exceptions import DeploymentNotFoundError, SerializationError
from wire_peers import LOOPS, run, until


def _refuse_to_load() -> None:
    raise ImportError("No module named 'users_module'")


class Unloadable:
    """Pickles fine; fails to unpickle, as an object of a class the receiver cannot import."""

    def __reduce__(self) -> Any:
        return (_refuse_to_load, ())


class Handler:
    def rpc_echo(self, peer: RpcPeer, value: Any) -> Any:
        return value

    def rpc_unloadable(self, peer: RpcPeer) -> Any:
        return Unloadable()


async def _pair(tmp_path: Path) -> tuple[RpcPeer, Any]:
    server_peers: list[RpcPeer] = []

    def new_peer() -> transport.Connection:
        peer = RpcPeer(Handler())
        server_peers.append(peer)
        return peer.protocol_factory()

    server = await transport.listen(str(tmp_path / "rpc.sock"), new_peer)
    client = await RpcPeer.connect(str(tmp_path / "rpc.sock"))
    return client, server


def test_a_call_the_peer_cannot_decode_is_answered(tmp_path: Path) -> None:
    async def main() -> None:
        client, server = await _pair(tmp_path)
        try:
            with pytest.raises(SerializationError, match="could not decode this call"):
                await asyncio.wait_for(client.call("echo", value=Unloadable()), 5)
            assert await asyncio.wait_for(client.call("echo", value=7), 5) == 7
        finally:
            client.close()
            server.close()

    asyncio.run(main())


def test_a_reply_the_caller_cannot_decode_fails_the_call(tmp_path: Path) -> None:
    async def main() -> None:
        client, server = await _pair(tmp_path)
        try:
            with pytest.raises(SerializationError, match="could not decode the reply"):
                await asyncio.wait_for(client.call("unloadable"), 5)
            assert await asyncio.wait_for(client.call("echo", value="after"), 5) == "after"
        finally:
            client.close()
            server.close()

    asyncio.run(main())


# -- calls, replies, errors, pushes and loss, on both loops ---------------------------------------


class UsersError(Exception):
    """An exception of a class the controller would not have (defined outside serval)."""


class BrokenStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class Service:
    """The serving side's handler: methods sync and async, slow, failing and hanging."""

    def __init__(self) -> None:
        self.hanging = 0
        self.cancelled = 0

    def rpc_echo(self, peer: RpcPeer, value: Any) -> Any:
        return value

    async def rpc_later(self, peer: RpcPeer, value: Any, delay: float) -> Any:
        await asyncio.sleep(delay)
        return value

    async def rpc_ask_back(self, peer: RpcPeer, value: Any) -> Any:
        """Calls the caller while its own call is open (both directions on one connection)."""
        return ("back", await peer.call("echo", value=value))

    def rpc_fail(self, peer: RpcPeer, kind: str) -> None:
        errors: dict[str, Exception] = {
            "value": ValueError("bad value"),
            "key": KeyError("missing"),
            "serval": DeploymentNotFoundError("no deployment 'x'"),
            "users": UsersError("the user's own"),
            "broken str": BrokenStr(),
        }
        raise errors[kind]

    async def rpc_fail_later(self, peer: RpcPeer) -> None:
        await asyncio.sleep(0)
        raise TypeError("async and failing")

    def rpc_unpicklable(self, peer: RpcPeer) -> Any:
        return threading.Lock()

    async def rpc_hang(self, peer: RpcPeer) -> None:
        self.hanging += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def rpc_push(self, peer: RpcPeer, topics: list[str]) -> int:
        assert peer.conn is not None
        for n, topic in enumerate(topics):
            peer.conn.send(Push(PUSH, topic, n))
        return len(topics)


class Served:
    """A listening control endpoint and the peers it accepted."""

    def __init__(self) -> None:
        self.service = Service()
        self.peers: list[RpcPeer] = []
        self.closed: list[RpcPeer] = []
        self.server: asyncio.base_events.Server | None = None

    async def start(self, path: str) -> Served:
        def accept() -> transport.Connection:
            peer = RpcPeer(self.service, on_close=self.closed.append)
            self.peers.append(peer)
            return peer.protocol_factory()

        self.server = await transport.listen(path, accept)
        return self

    def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for peer in self.peers:
            peer.close()


def _on(loop: str, tmp_path: Path, test: Any, **client_args: Any) -> None:
    async def main() -> None:
        served = await Served().start(str(tmp_path / "c.sock"))
        client = await RpcPeer.connect(str(tmp_path / "c.sock"), **client_args)
        try:
            await test(client, served)
        finally:
            client.close()
            served.close()

    run(loop, main)


LOOP_KINDS = pytest.mark.parametrize("loop", list(LOOPS))


@LOOP_KINDS
def test_concurrent_calls_get_their_own_replies(loop: str, tmp_path: Path) -> None:
    async def test(client: RpcPeer, served: Served) -> None:
        # Replies come back in the reverse order of the calls.
        calls = [client.call("later", value=i, delay=(50 - i) * 0.001) for i in range(50)]
        calls += [client.call("echo", value=f"at once {i}") for i in range(50)]
        got = await asyncio.gather(*calls)
        assert got == list(range(50)) + [f"at once {i}" for i in range(50)]

    _on(loop, tmp_path, test)


@LOOP_KINDS
def test_calls_cross_in_both_directions_at_once(loop: str, tmp_path: Path) -> None:
    async def test(client: RpcPeer, served: Served) -> None:
        got = await asyncio.gather(*(client.call("ask_back", value=i) for i in range(20)))
        assert got == [("back", i) for i in range(20)]

    _on(loop, tmp_path, test, handler=Service())


@LOOP_KINDS
def test_an_exception_crosses_with_its_type(loop: str, tmp_path: Path) -> None:
    async def test(client: RpcPeer, served: Served) -> None:
        with pytest.raises(ValueError, match="bad value"):
            await client.call("fail", kind="value")
        with pytest.raises(KeyError, match="missing"):
            await client.call("fail", kind="key")
        with pytest.raises(DeploymentNotFoundError, match="no deployment 'x'"):
            await client.call("fail", kind="serval")
        with pytest.raises(TypeError, match="async and failing"):
            await client.call("fail_later")
        with pytest.raises(AttributeError, match="rpc_no_such_method"):
            await client.call("no_such_method")
        # A class the other side may not have crosses as a RuntimeError that names it.
        with pytest.raises(RuntimeError, match="fail raised UsersError: the user's own"):
            await client.call("fail", kind="users")
        with pytest.raises(
            RuntimeError, match=r"fail raised BrokenStr: <BrokenStr: str\(\) failed>"
        ):
            await client.call("fail", kind="broken str")
        # A result that does not pickle: an error saying so, not a call left waiting.
        with pytest.raises(RuntimeError, match="unpicklable: TypeError: cannot pickle"):
            await client.call("unpicklable")
        assert await client.call("echo", value="still serving") == "still serving"

    _on(loop, tmp_path, test)


@LOOP_KINDS
def test_pushes_arrive_in_order_among_replies(loop: str, tmp_path: Path) -> None:
    pushed: list[tuple[str, Any]] = []

    async def test(client: RpcPeer, served: Served) -> None:
        assert await client.call("push", topics=["table", "table", "config"]) == 3
        # The pushes were sent before the reply, on the same connection: all here already.
        assert pushed == [("table", 0), ("table", 1), ("config", 2)]

    _on(loop, tmp_path, test, on_push=lambda topic, value: pushed.append((topic, value)))


@LOOP_KINDS
def test_a_lost_connection_fails_pending_calls_and_stops_served_ones(
    loop: str, tmp_path: Path
) -> None:
    closed: list[RpcPeer] = []

    async def test(client: RpcPeer, served: Served) -> None:
        pending = [asyncio.ensure_future(client.call("hang")) for _ in range(3)]
        await until(lambda: served.service.hanging == 3, "the three calls served")
        for peer in served.peers:
            peer.close()  # the serving side goes away
        for fut in pending:
            with pytest.raises(ConnectionResetError, match="control connection lost"):
                await asyncio.wait_for(fut, 5)
        assert closed == [client] and client.closed
        with pytest.raises(ConnectionResetError, match="closed"):
            await client.call("echo", value=1)
        # The serving side cancelled what it was running for the lost peer.
        await until(lambda: served.service.cancelled == 3, "the served calls cancelled")
        assert served.closed == served.peers

    _on(loop, tmp_path, test, on_close=closed.append)


@LOOP_KINDS
def test_the_caller_closing_stops_what_the_other_side_runs_for_it(
    loop: str, tmp_path: Path
) -> None:
    async def test(client: RpcPeer, served: Served) -> None:
        pending = asyncio.ensure_future(client.call("hang"))
        await until(lambda: served.service.hanging == 1, "the call served")
        client.close()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(pending, 5)
        await until(lambda: served.service.cancelled == 1, "the served call cancelled")
        (peer,) = served.peers
        assert served.closed == [peer] and peer.closed

    _on(loop, tmp_path, test)
