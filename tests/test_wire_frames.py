"""Framing: how a ``transport.Connection`` cuts the byte stream it reads into messages.

The bytes are handed to the connection the way a transport hands them to an
``asyncio.BufferedProtocol`` (``get_buffer``, fill at most that much, ``buffer_updated``), so the
tests choose exactly where each read ends: one byte at a time, several frames in one read, a
split at every boundary, arbitrary splits (hypothesis), frames larger than the reusable 64 KiB
buffer. Frames are real ones (``protocol.encode``); the socket-level behaviour of the same
connection (writes, threads, loss) is in ``test_wire_transport.py``.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serval._private.wire import protocol, transport
from serval._private.wire.messages import (
    REQUEST,
    RESULT,
    STREAM_ITEM,
    Request,
    Result,
    StreamItem,
)
from wire_peers import Inbox

SMALL = 64 * 1024  # transport's reusable buffer; frames above it get a buffer of their own


def _refuse_to_load() -> None:
    raise ImportError("No module named 'users_module'")


class Unloadable:
    """Pickles fine; fails to unpickle, as an object of a class the receiver cannot import."""

    def __reduce__(self) -> Any:
        return (_refuse_to_load, ())


def receiver() -> tuple[transport.Connection, Inbox]:
    """A connection with no transport, fed by hand (``feed``)."""
    inbox = Inbox()

    async def make() -> transport.Connection:
        return transport.Connection(inbox.on_message, inbox.on_lost)

    return asyncio.run(make()), inbox


def feed(conn: transport.Connection, data: bytes, cuts: Iterable[int] = ()) -> None:
    """Hand ``data`` to ``conn`` as reads ending at each of ``cuts`` (and at the end); like a
    transport, a read never fills more than the buffer ``get_buffer`` gave."""
    pos = 0
    for end in [*sorted(set(cuts)), len(data)]:
        while pos < end:
            buf = conn.get_buffer(-1)
            assert len(buf) > 0
            n = min(len(buf), end - pos)
            buf[:n] = data[pos : pos + n]
            conn.buffer_updated(n)
            pos += n


def frame(message: tuple[Any, ...], tag: int = 0) -> bytes:
    return b"".join(protocol.encode(message, tag))


def result(rid: int, value: Any) -> Result:
    return Result(RESULT, rid, value, 0)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def check(inbox: Inbox, sent: Sequence[tuple[Any, ...]], frames: Sequence[bytes]) -> None:
    """``inbox`` got exactly ``sent``, in order, each as its typed message, with its frame's
    size on the wire noted (streams' flow control counts it)."""
    assert len(inbox.messages) == len(sent), (len(inbox.messages), len(sent))
    for got, want in zip(inbox.messages, sent, strict=True):
        assert same(got, want), (got, want)
    assert inbox.sizes == [len(f) for f in frames]


def _mixed() -> list[tuple[Any, ...]]:
    return [
        result(1, "small"),
        Request(REQUEST, 2, "method", (1, 2.5, None), {"k": [b"v"]}, {"stream": True}),
        result(3, np.arange(250, dtype=np.int32)),  # with an out-of-band buffer
        StreamItem(STREAM_ITEM, 4, b"\x07" * 100_000),  # above SMALL
        result(5, {"after": "the large one"}),
    ]


def test_a_stream_fed_one_byte_per_read() -> None:
    sent = _mixed()
    frames = [frame(m, m[1]) for m in sent]
    conn, inbox = receiver()
    data = b"".join(frames)
    feed(conn, data, cuts=range(1, len(data)))
    check(inbox, sent, frames)


def test_many_frames_in_one_read() -> None:
    sent = [result(i, f"value {i}" * (i % 7)) for i in range(200)]
    frames = [frame(m, m.rid) for m in sent]
    conn, inbox = receiver()
    feed(conn, b"".join(frames))
    check(inbox, sent, frames)


def test_a_stream_split_at_every_boundary() -> None:
    sent = [
        result(1, "a"),
        result(2, np.array([1.5, 2.5, 3.5])),
        Request(REQUEST, 3, "m", ("x",), {}, None),
        result(4, bytearray(b"tail")),
    ]
    frames = [frame(m, m[1]) for m in sent]
    data = b"".join(frames)
    for cut in range(1, len(data)):
        conn, inbox = receiver()
        feed(conn, data, cuts=[cut])
        check(inbox, sent, frames)


# -- arbitrary frames, arbitrary splits ---------------------------------------------------------

_values = st.one_of(
    st.text(max_size=50),
    st.binary(max_size=200),
    st.integers(),
    st.lists(st.integers(), max_size=10).map(tuple),
    # out-of-band buffers, small and (rarely) larger than the small buffer
    st.integers(0, 3000).map(lambda n: np.arange(n, dtype=np.int64)),
    st.sampled_from([70_000, 140_000]).map(lambda n: b"\x01" * n),
    st.sampled_from([9_000, 20_000]).map(lambda n: np.ones(n, dtype=np.float64)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(_values, min_size=1, max_size=6),
    cut_fractions=st.lists(st.floats(0, 1), max_size=12),
)
def test_any_frames_split_anywhere(values: list[Any], cut_fractions: list[float]) -> None:
    sent = [result(i, v) for i, v in enumerate(values)]
    frames = [frame(m, m.rid) for m in sent]
    data = b"".join(frames)
    conn, inbox = receiver()
    feed(conn, data, cuts=[int(f * len(data)) for f in cut_fractions])
    check(inbox, sent, frames)


# -- large frames -------------------------------------------------------------------------------


def _frame_of_size(total: int, rid: int) -> tuple[Result, bytes]:
    """A frame exactly ``total`` bytes long (a bytes value padded to fit)."""
    guess = total - 100
    overhead = len(frame(result(rid, b"x" * guess), rid)) - guess
    for n in range(total - overhead - 16, total - overhead + 16):
        msg = result(rid, b"x" * n)
        data = frame(msg, rid)
        if len(data) == total:
            return msg, data
    raise AssertionError(f"no frame of {total} bytes")


@pytest.mark.parametrize("total", [SMALL - 1, SMALL, SMALL + 1, 5 * SMALL + 3])
def test_frames_around_and_above_the_small_buffer(total: int) -> None:
    before = result(1, "before")
    big, big_frame = _frame_of_size(total, 2)
    after = result(3, "after")
    sent = [before, big, after]
    frames = [frame(before, 1), big_frame, frame(after, 3)]
    data = b"".join(frames)
    first = len(frames[0])
    splits = {
        "whole": [],
        "the big one's header split": [first + 5],
        # a small frame and the start of the big one in one read, the rest in small reads
        "partial after a small one": [first + 100, *range(first + 100, len(data), 1000)],
        "the big one's last byte with the next frame": [len(data) - len(frames[2]) - 1],
    }
    for name, cuts in splits.items():
        conn, inbox = receiver()
        feed(conn, data, cuts)
        assert len(inbox.messages) == 3, name
        check(inbox, sent, frames)


def test_a_frame_with_more_buffers_than_the_small_buffer_holds_headers() -> None:
    """Many out-of-band buffers make a header of their own size (8 bytes each): a header
    larger than what is free in the buffer still parses."""
    arrays = tuple(np.full(3, i, dtype=np.int16) for i in range(9000))  # 72 KB of lengths
    msg = result(1, arrays)
    data = frame(msg, 1)
    nbufs = protocol.HEADER.unpack_from(data, 0)[1]
    assert nbufs == 9000
    conn, inbox = receiver()
    feed(conn, data + frame(result(2, "next"), 2), cuts=range(0, len(data), 4096))
    assert same(inbox.messages[0], msg)
    assert same(inbox.messages[1], result(2, "next"))


# -- out-of-band buffers ------------------------------------------------------------------------


def test_a_numpy_array_travels_out_of_band_and_is_not_copied() -> None:
    array = np.arange(1 << 18, dtype=np.int32)  # 1 MiB
    pieces = protocol.encode(result(7, array), 7)
    # The sender: a small pickle, and the array's own memory as the last piece.
    meta_len, nbufs, _ = protocol.HEADER.unpack_from(pieces[0], 0)
    assert nbufs == 1 and meta_len < 1024
    assert np.shares_memory(np.frombuffer(pieces[-1], dtype=np.uint8), array)
    # The receiver: the array is a view of the frame it arrived in, not a copy of it.
    data = b"".join(pieces)
    conn, inbox = receiver()
    feed(conn, data, cuts=range(0, len(data), 50_000))
    got = inbox.messages[0]
    assert isinstance(got, Result)
    value = got.value
    assert isinstance(value, np.ndarray) and np.array_equal(value, array)
    assert not value.flags.owndata
    base = value
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, bytearray)
    assert len(base.obj) == len(data)  # the frame's own buffer
    assert np.shares_memory(value, np.frombuffer(base.obj, dtype=np.uint8))


def test_a_small_frames_buffers_own_their_memory() -> None:
    """A small frame is parsed from the connection's reusable buffer; its out-of-band buffers
    must not point into it, or the next read would overwrite a delivered array."""
    conn, inbox = receiver()
    feed(conn, frame(result(1, np.full(1000, 7, dtype=np.int32)), 1))
    for i in range(30):  # more reads over the same buffer
        feed(conn, frame(result(2 + i, b"\xff" * 8000), 2 + i))
    assert len(inbox.messages) == 31
    first = inbox.messages[0]
    assert isinstance(first, Result)
    assert np.array_equal(first.value, np.full(1000, 7, dtype=np.int32))


def test_a_bytearray_arrives_intact() -> None:
    value = bytearray(range(256)) * 4096  # 1 MiB
    conn, inbox = receiver()
    feed(conn, frame(result(1, value), 1))
    got = inbox.messages[0]
    assert isinstance(got, Result)
    assert type(got.value) is bytearray and got.value == value


# -- bad frames ---------------------------------------------------------------------------------


def _bad_frames() -> dict[str, tuple[int, bytes]]:
    """Whole frames that do not decode, with their tags."""
    garbage = b"\x00 not a pickle"
    wrong_shape = pickle.dumps((RESULT, 1, "a Result has four fields"), protocol=5)
    unknown_kind = pickle.dumps((99, "x"), protocol=5)
    not_a_tuple = pickle.dumps(5, protocol=5)
    return {
        "unloadable, small": (11, frame(result(11, Unloadable()), 11)),
        "unloadable, with a buffer": (12, frame(result(12, (Unloadable(), np.ones(10))), 12)),
        "unloadable, large": (13, frame(result(13, (Unloadable(), b"z" * 100_000)), 13)),
        "garbage": (14, protocol.HEADER.pack(len(garbage), 0, 14) + garbage),
        "not a message": (15, protocol.HEADER.pack(len(wrong_shape), 0, 15) + wrong_shape),
        "unknown kind": (17, protocol.HEADER.pack(len(unknown_kind), 0, 17) + unknown_kind),
        "not a tuple": (16, protocol.HEADER.pack(len(not_a_tuple), 0, 16) + not_a_tuple),
        "the rpc call bit": (1 << 62 | 3, frame(result(3, Unloadable()), 1 << 62 | 3)),
    }


@pytest.mark.parametrize("name", list(_bad_frames()))
@pytest.mark.parametrize("split", ["one read", "byte by byte"])
def test_a_frame_that_does_not_decode_is_undecodable_and_the_next_ones_arrive(
    name: str, split: str
) -> None:
    tag, bad = _bad_frames()[name]
    before, after = result(1, "before"), result(2, np.arange(5))
    data = frame(before, 1) + bad + frame(after, 2) + frame(result(3, "last"), 3)
    conn, inbox = receiver()
    feed(conn, data, cuts=range(1, len(data)) if split == "byte by byte" else [])
    assert len(inbox.messages) == 4
    assert same(inbox.messages[0], before)
    undecodable = inbox.messages[1]
    assert isinstance(undecodable, transport.Undecodable)
    assert undecodable.tag == tag
    assert isinstance(undecodable.error, Exception)
    if name.startswith("unloadable") or name == "the rpc call bit":
        assert isinstance(undecodable.error, ImportError)
    if name == "not a message":
        assert "not a serval message" in str(undecodable.error)
    assert same(inbox.messages[2], after)
    assert same(inbox.messages[3], result(3, "last"))
    assert inbox.sizes[1] == len(bad)


def test_a_handler_that_raises_loses_no_later_message(caplog: pytest.LogCaptureFixture) -> None:
    got: list[Any] = []

    def handler(conn: transport.Connection, msg: Any) -> None:
        got.append(msg)
        if len(got) in (1, 3):  # a plain frame's handler, then a buffered frame's
            raise RuntimeError("a bug in the handler")

    async def make() -> transport.Connection:
        return transport.Connection(handler)

    conn = asyncio.run(make())
    sent = [result(1, "a"), result(2, "b"), result(3, np.arange(3)), result(4, "d")]
    with caplog.at_level(logging.ERROR, logger="serval._private.wire.transport"):
        feed(conn, b"".join(frame(m, m.rid) for m in sent))
    assert len(got) == 4
    assert all(same(g, s) for g, s in zip(got, sent, strict=True))
    failures = [r for r in caplog.records if "handling a message failed" in r.getMessage()]
    assert len(failures) == 2


@pytest.mark.parametrize("raw", [(-1,), (True, 5), (99,), ("0", 1)])
def test_a_kind_that_is_none_is_not_a_message(raw: tuple[object, ...]) -> None:
    data = pickle.dumps(raw, protocol=5)
    conn, inbox = receiver()
    feed(conn, protocol.HEADER.pack(len(data), 0, 5) + data)
    assert isinstance(inbox.messages[0], transport.Undecodable)
