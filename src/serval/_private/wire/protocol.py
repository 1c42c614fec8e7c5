"""Frames and payloads of the local wire.

A frame is ``<meta_len:u32><nbufs:u16><tag:u64>``, then ``nbufs`` lengths ``<len:u64>``, the
pickle (protocol 5) of the message, then its out-of-band buffers. The tag repeats the request id
of data-plane messages, so a message that fails to unpickle can still be answered with an error.
Large numpy arrays (and other objects that pickle through ``pickle.PickleBuffer``) travel as
those buffers, so neither side copies them into the pickle stream; ``bytes`` and
``bytearray`` go in the pickle itself (one copy).

Messages (``messages``) travel as plain tuples whose first item is their kind. cloudpickle is
used for every dump because it ships classes defined in ``__main__`` or in a function by
value; the load side is the standard ``pickle.loads``.
"""

from __future__ import annotations

import pickle
import struct
import traceback
from typing import Any

import cloudpickle

from serval.exceptions import SerializationError

HEADER = struct.Struct("<IHQ")
BUFLEN = struct.Struct("<Q")


def encode(message: tuple[Any, ...], tag: int = 0, plain: bool = False) -> list[bytes | memoryview]:
    """A message (see ``messages``) as the pieces of its frame: pickled as the plain tuple it
    is, not as its ``NamedTuple`` class."""
    return dumps(tuple(message), tag, plain)


def dumps(obj: Any, tag: int = 0, plain: bool = False) -> list[bytes | memoryview]:
    """Encode ``obj`` as the pieces of one frame (header, pickle, buffers).

    ``plain=True`` is for messages known to hold only builtin types (HTTP scopes and
    responses, control messages): the C pickler alone, several times faster than cloudpickle.
    """
    buffers: list[pickle.PickleBuffer] = []
    if plain:
        try:
            meta = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        except Exception:  # not so plain after all (a local class, a lambda): by value
            buffers.clear()
            meta = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    else:
        meta = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    if not buffers:
        return _frame(meta, tag)
    raws = [b.raw() for b in buffers]
    head = HEADER.pack(len(meta), len(raws), tag) + b"".join(BUFLEN.pack(r.nbytes) for r in raws)
    return [head, meta, *raws]


def _frame(meta: bytes, tag: int) -> list[bytes | memoryview]:
    if len(meta) < _JOIN_BELOW:
        return [HEADER.pack(len(meta), 0, tag) + meta]
    return [HEADER.pack(len(meta), 0, tag), meta]  # a large pickle is not copied to join


_JOIN_BELOW = 64 * 1024


def loads(frame: memoryview, header_len: int, meta_len: int, buf_lens: list[int]) -> Any:
    """Decode one complete frame; buffers keep referencing ``frame`` (no copy)."""
    start = header_len + meta_len
    buffers = []
    for n in buf_lens:
        buffers.append(frame[start : start + n])
        start += n
    return pickle.loads(frame[header_len : header_len + meta_len], buffers=buffers)


def describe(value: Any) -> str:
    """A short, safe description of a value for error messages."""
    try:
        text = repr(value)
    except BaseException:  # a broken __repr__ must not hide the real error
        text = f"<{type(value).__qualname__} object>"
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} (type {type(value).__module__}.{type(value).__qualname__})"


def safe_str(exc: BaseException) -> str:
    """``str(exc)``, or a stand-in when the exception's ``__str__`` itself raises."""
    try:
        return str(exc)
    except BaseException:
        return f"<{type(exc).__qualname__}: str() failed>"


def describe_error(exc: BaseException) -> tuple[str, str, str]:
    """(type name, message, traceback text) of ``exc``, whatever its methods raise."""
    try:
        tb = "".join(traceback.format_exception(exc))
    except BaseException:
        tb = ""
    return type(exc).__qualname__, safe_str(exc), tb


def serialization_error(what: str, value: Any, exc: BaseException) -> SerializationError:
    return SerializationError(
        f"could not serialize {what}: {describe(value)}: {type(exc).__name__}: {safe_str(exc)}"
    )


def find_unpicklable(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, Any, BaseException]:
    """After a failed dump, find which argument is to blame (slow path only)."""
    for i, arg in enumerate(args):
        try:
            cloudpickle.dumps(arg, protocol=5, buffer_callback=lambda b: None)
        except BaseException as exc:
            return f"argument {i}", arg, exc
    for key, arg in kwargs.items():
        try:
            cloudpickle.dumps(arg, protocol=5, buffer_callback=lambda b: None)
        except BaseException as exc:
            return f"keyword argument {key!r}", arg, exc
    raise LookupError("every argument pickles on its own")
