"""``transport.Connection`` over a real Unix socket, on both loops serval runs on (uvloop and
asyncio's): a tick's messages leave coalesced and arrive in order, messages sent before the
connection is up leave first, closing sends what was queued, and frames written from other
threads (``write_from_thread``, how a replica answers a sync call) never mix with each other or
with the loop's, even when the socket is full and a frame goes out in parts."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serval._private.wire import protocol, transport
from serval._private.wire.messages import RESULT, Result
from wire_peers import LOOPS, Inbox, LoopThread, connected_pair, run, until

pytestmark = pytest.mark.parametrize("loop", list(LOOPS))


def _value(rid: int) -> Any:
    """Each message's own value, of a size that depends on its id: mostly small, some medium,
    some large (above the receiver's 64 KiB buffer, and more than a socket buffers at once),
    some numpy arrays (out-of-band buffers)."""
    kind = rid % 8
    if kind < 4:
        return f"small {rid}" * kind
    if kind < 6:
        return bytes([rid % 251]) * 5000
    if kind == 6:
        return bytes([rid % 253]) * 300_000
    return np.full(20_000, rid, dtype=np.int64)


def _check(got: list[Any], rids: list[int]) -> None:
    assert [type(m) for m in got] == [Result] * len(rids)
    assert [m.rid for m in got] == rids
    for m in got:
        want = _value(m.rid)
        if isinstance(want, np.ndarray):
            assert np.array_equal(m.value, want), m.rid
        else:
            assert m.value == want, m.rid


def test_a_ticks_messages_leave_coalesced_and_arrive_in_order(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        inbox = Inbox()
        client, _, server = await connected_pair(str(tmp_path / "s"), inbox, Inbox())
        writes: list[int] = []
        write = client._write

        def counted(pieces: list[bytes | memoryview]) -> None:
            writes.append(len(pieces))
            write(pieces)

        client._write = counted  # type: ignore[method-assign]
        try:
            for rid in range(100):  # one tick: small messages
                client.send(Result(RESULT, rid * 8, _value(rid * 8), 0))
            await inbox.wait_for(100)
            # The first leaves at once; the rest wait for a few large writes, not 99 small.
            assert 2 <= len(writes) <= 10, writes
            for rid in range(1000, 1300):  # one tick again, of every size
                client.send(Result(RESULT, rid, _value(rid), 0))
            got = await inbox.wait_for(400)
            _check(got, [rid * 8 for rid in range(100)] + list(range(1000, 1300)))
        finally:
            client.close()
            server.close()

    run(loop, main)


def test_messages_sent_before_the_connection_is_up_leave_first(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        inbox = Inbox()
        server = await transport.listen(
            str(tmp_path / "s"), lambda: transport.Connection(inbox.on_message)
        )
        client = transport.Connection(Inbox().on_message)
        try:
            for rid in range(6):  # queued: nothing to write to yet
                client.send(Result(RESULT, rid, _value(rid), 0))
            await asyncio.sleep(0)  # the tick's flush finds no transport
            assert not client.connected
            await transport.dial(str(tmp_path / "s"), lambda: client)
            for rid in range(6, 12):
                client.send(Result(RESULT, rid, _value(rid), 0))
            _check(await inbox.wait_for(12), list(range(12)))
        finally:
            client.close()
            server.close()

    run(loop, main)


def test_closing_sends_what_was_queued_then_ends(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        inbox, client_inbox = Inbox(), Inbox()
        client, _, server = await connected_pair(str(tmp_path / "s"), inbox, client_inbox)
        try:
            for rid in range(50):
                client.send(Result(RESULT, rid, _value(rid), 0))
            client.close()  # in the same tick
            await inbox.wait_lost()
            _check(inbox.messages, list(range(50)))
            assert inbox.lost == [None]  # an orderly end, reported once
            await client.closed_future
            assert client.closed and client_inbox.lost == [None]
            with pytest.raises(ConnectionResetError):
                client.send(Result(RESULT, 99, "too late", 0))
            assert not client.write_from_thread(b"too late")
        finally:
            server.close()

    run(loop, main)


def test_the_peer_going_away_is_reported_once(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        client_inbox = Inbox()
        client, server_conn, server = await connected_pair(
            str(tmp_path / "s"), Inbox(), client_inbox, client_thread_writes=True
        )
        server_conn.close()
        server.close()
        await client_inbox.wait_lost()
        for _ in range(20):  # (a second report would come within a few loop turns)
            await asyncio.sleep(0)
        assert len(client_inbox.lost) == 1
        assert client.closed and client.closed_future.done()
        assert not await asyncio.to_thread(client.write_from_thread, b"anything")

    run(loop, main)


def test_write_from_thread_needs_thread_writes(loop: str, tmp_path: Path) -> None:
    async def main() -> None:
        inbox = Inbox()
        client, _, server = await connected_pair(str(tmp_path / "s"), inbox, Inbox())
        try:
            frame = b"".join(protocol.encode(Result(RESULT, 1, "x", 0), 1))
            assert not await asyncio.to_thread(client.write_from_thread, frame)
        finally:
            client.close()
            server.close()

    run(loop, main)


def test_frames_from_threads_and_the_loop_never_mix(loop: str, tmp_path: Path) -> None:
    """Four threads write frames of many sizes at once, falling back to the loop when a
    thread cannot write (as a replica's worker does), while the loop sends frames of its own;
    the peer reads on a loop of its own thread. Every frame arrives whole."""
    threads, per_thread, from_loop = 4, 100, 80
    path = str(tmp_path / "s")
    thread_rids = [10_000 * (t + 1) + s for t in range(threads) for s in range(per_thread)]

    with LoopThread(loop) as peer:
        inbox = peer.call(_make_inbox)

        async def serve() -> asyncio.base_events.Server:
            return await transport.listen(path, lambda: transport.Connection(inbox.on_message))

        server = peer.call(serve)

        async def main() -> None:
            client = await transport.dial(
                path, lambda: transport.Connection(Inbox().on_message, thread_writes=True)
            )
            aloop = asyncio.get_running_loop()
            start = threading.Barrier(threads)
            direct = [0] * threads

            def writer(t: int) -> None:
                start.wait()
                for seq in range(per_thread):
                    rid = 10_000 * (t + 1) + seq
                    frame = b"".join(protocol.encode(Result(RESULT, rid, _value(rid), 0), rid))
                    if client.write_from_thread(frame):
                        direct[t] += 1
                    else:
                        aloop.call_soon_threadsafe(client.send_pieces, [frame])

            async def loop_sender() -> None:
                for rid in range(from_loop):
                    client.send(Result(RESULT, rid, _value(rid), 0))
                    await asyncio.sleep(0)

            try:
                await asyncio.gather(
                    loop_sender(), *(asyncio.to_thread(writer, t) for t in range(threads))
                )
                got = await peer.acall(lambda: inbox.wait_for(threads * per_thread + from_loop))
                assert not [m for m in got if isinstance(m, transport.Undecodable)]
                assert sorted(m.rid for m in got) == [*range(from_loop), *thread_rids]
                _check(got, [m.rid for m in got])  # every value intact
                loop_rids = [m.rid for m in got if m.rid < from_loop]
                assert loop_rids == list(range(from_loop))  # the loop's own stay in order
                assert sum(direct) > 0  # (the threads did write, not only the loop)
            finally:
                client.close()

        try:
            run(loop, main)
        finally:
            peer.loop.call_soon_threadsafe(server.close)


async def _make_inbox() -> Inbox:
    return Inbox()


def test_a_frame_a_thread_could_only_partly_write_is_finished_first(
    loop: str, tmp_path: Path
) -> None:
    """The socket takes only part of a thread's frame: the loop writes the rest before any
    other frame, and no thread writes until it has."""

    async def main() -> None:
        inbox = Inbox()
        client, server_conn, server = await connected_pair(
            str(tmp_path / "s"), inbox, Inbox(), client_thread_writes=True
        )
        try:
            reader = server_conn._transport
            assert reader is not None
            reader.pause_reading()  # the socket's buffers fill and stay full
            big = np.arange(1 << 19, dtype=np.int64)  # 4 MiB: more than a socket buffers
            big_frame = b"".join(protocol.encode(Result(RESULT, 1, big, 0), 1))
            small_frame = b"".join(protocol.encode(Result(RESULT, 3, "from a thread", 0), 3))
            assert await asyncio.to_thread(client.write_from_thread, big_frame)
            assert client._tail is not None or client._transport.get_write_buffer_size()  # type: ignore[union-attr]
            # While the rest of that frame waits, a thread cannot write; the loop can queue.
            assert not await asyncio.to_thread(client.write_from_thread, small_frame)
            client.send(Result(RESULT, 2, "from the loop", 0))
            client.send_pieces([small_frame])
            reader.resume_reading()
            got = await inbox.wait_for(3)
            assert [m.rid for m in got] == [1, 2, 3]
            assert np.array_equal(got[0].value, big)
            assert got[1].value == "from the loop" and got[2].value == "from a thread"
            # All written: threads may write again.
            await asyncio.sleep(0)
            frame = b"".join(protocol.encode(Result(RESULT, 4, "again", 0), 4))
            writer = client._transport
            assert writer is not None
            await until(lambda: not writer.get_write_buffer_size(), "the write buffer empty")
            assert await asyncio.to_thread(client.write_from_thread, frame)
            assert (await inbox.wait_for(4))[3].value == "again"
        finally:
            client.close()
            server.close()

    run(loop, main)
