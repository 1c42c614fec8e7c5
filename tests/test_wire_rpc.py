"""The control plane's calls over a real Unix socket: a call or a reply that does not unpickle
on the other side (a class that process cannot import) is answered with an error naming the
reason, instead of leaving the caller waiting for ever."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from serval._private.wire import transport
from serval._private.wire.rpc import RpcPeer
from serval.exceptions import SerializationError


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
