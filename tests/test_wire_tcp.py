"""The wire over TCP (how callers reach replicas on other nodes of a Ray cluster), on real
sockets and both loops: messages flow once both ends have proven they hold the cluster's
secret; a dialler without it, a stray client, a silent one and one that sends a pickle straight
away are dropped without a frame being read (the pickle never runs); an address names its
endpoints in order of preference, and a node's Unix socket is taken only on that node."""

from __future__ import annotations

import asyncio
import pickle
import socket
from pathlib import Path
from typing import Any

import pytest

from serval._private.wire import auth, endpoints, transport
from serval._private.wire.messages import RESULT, Result
from wire_peers import LOOPS, Inbox, run, until

SECRET = b"s" * 32


class _Marker:
    """Unpickling this writes a file: proof that a frame was read."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path(self.path).write_text, ("unpickled",))


@pytest.fixture(autouse=True)
def _secret() -> Any:
    endpoints.set_secret(SECRET)
    yield
    endpoints.set_secret(None)


async def _listener(inbox: Inbox) -> tuple[transport.TcpListener, list[transport.Connection]]:
    made: list[transport.Connection] = []

    def factory() -> transport.Connection:
        conn = transport.Connection(inbox.on_message, inbox.on_lost)
        made.append(conn)
        return conn

    return await transport.TcpListener.start("127.0.0.1", 0, factory, SECRET), made


@pytest.mark.parametrize("loop", list(LOOPS))
def test_messages_flow_both_ways_after_the_handshake(loop: str) -> None:
    async def main() -> None:
        server_inbox, client_inbox = Inbox(), Inbox()
        listener, made = await _listener(server_inbox)
        client = await transport.dial(
            listener.address, lambda: transport.Connection(client_inbox.on_message)
        )
        client.send(Result(RESULT, 1, b"x" * 300_000, 0))
        (got,) = await server_inbox.wait_for(1)
        assert isinstance(got, Result) and got.value == b"x" * 300_000
        await until(lambda: made and made[0].connected, "accepted")
        made[0].send(Result(RESULT, 2, "back", 0))
        (back,) = await client_inbox.wait_for(1)
        assert isinstance(back, Result) and back.value == "back"
        client.close()
        await listener.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_dialler_with_another_secret_is_refused(loop: str) -> None:
    async def main() -> None:
        listener, made = await _listener(Inbox())
        endpoints.set_secret(b"t" * 32)
        with pytest.raises(auth.AuthenticationError, match="secret"):
            await transport.dial(listener.address, lambda: transport.Connection(Inbox().on_message))
        await until(lambda: listener.refused == 1, "the refusal counted")
        assert made == []  # no connection ever reached the framing
        await listener.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_listener_without_the_secret_is_not_trusted(loop: str) -> None:
    async def main() -> None:
        made: list[transport.Connection] = []

        def factory() -> transport.Connection:
            made.append(transport.Connection(Inbox().on_message))
            return made[-1]

        impostor = await transport.TcpListener.start("127.0.0.1", 0, factory, b"i" * 32)
        with pytest.raises(auth.AuthenticationError, match="listener"):
            await transport.dial(impostor.address, lambda: transport.Connection(Inbox().on_message))
        assert made == []
        await impostor.aclose()

    run(loop, main)


def _raw(port: int, payload: bytes) -> bytes:
    """What a client that writes ``payload`` straight away gets back before the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:  # closed with our bytes unread: the kernel resets
            pass
        return got


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_pickle_sent_before_the_handshake_is_never_read(loop: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    frame = pickle.dumps(_Marker(str(marker)))

    async def main() -> None:
        listener, made = await _listener(Inbox())
        for payload in (frame * 4, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 64):
            answer = await asyncio.to_thread(_raw, listener.port, payload)
            assert b"\x01" not in answer[-1:]  # never admitted
        await until(lambda: listener.refused == 2, "both refused")
        assert made == [] and not marker.exists()
        await listener.aclose()

    run(loop, main)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_silent_dialler_is_dropped(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "HANDSHAKE_TIMEOUT_S", 0.2)

    async def main() -> None:
        listener, made = await _listener(Inbox())
        answer = await asyncio.to_thread(_raw, listener.port, b"")  # returns at the close
        assert answer == b""
        assert listener.refused == 1 and made == []
        await listener.aclose()

    run(loop, main)


def test_an_address_lists_endpoints_in_order_and_unix_only_on_its_node() -> None:
    endpoints.set_local_node("n1")
    try:
        both = f"{endpoints.unix_on_node('n1', '/r/a.sock')}|{endpoints.tcp('10.0.0.2', 4242)}"
        assert endpoints.choose(both) == endpoints.Endpoint("unix", path="/r/a.sock")
        endpoints.set_local_node("n2")
        assert endpoints.choose(both) == endpoints.Endpoint("tcp", host="10.0.0.2", port=4242)
        assert endpoints.choose("/plain.sock").path == "/plain.sock"
        assert endpoints.choose("tcp:[::1]:7").host == "::1"
        with pytest.raises(ConnectionRefusedError, match="reachable"):
            endpoints.choose(endpoints.unix_on_node("n1", "/r/a.sock"))
        with pytest.raises(ValueError, match="not an address"):
            endpoints.choose("http://x")
    finally:
        endpoints.set_local_node(None)


def test_no_secret_no_tcp() -> None:
    endpoints.set_secret(None)

    async def main() -> None:
        with pytest.raises(ConnectionRefusedError, match="secret"):
            await transport.dial(
                "tcp:127.0.0.1:9", lambda: transport.Connection(Inbox().on_message)
            )

    run("asyncio", main)


def test_tcp_connections_probe_a_silent_peer() -> None:
    # A node that vanishes sends no reset: keepalive probes end its connections in ~11 s.
    async def main() -> None:
        listener, made = await _listener(Inbox())
        client = await transport.dial(listener.address, lambda: transport.Connection(print))
        await until(lambda: made and made[0].connected, "accepted")
        for conn in (client, made[0]):
            sock = conn._transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        client.close()
        await listener.aclose()

    run("uvloop", main)
