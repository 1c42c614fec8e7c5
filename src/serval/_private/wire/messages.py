"""Every message of the wire and the control plane, defined once.

Each kind of message is a ``NamedTuple`` below whose first field is its kind. Senders build
one and send it; ``transport.Connection`` pickles it as the plain tuple it also is (a plain
tuple pickles in a fraction of the time a ``NamedTuple`` takes, which pickles as a reference to
its class), and the receiving ``Connection`` lays the class back over the tuple it got
(``view``: no copy of the items) before its handler reads it, by name.

Data plane, caller → replica: ``Request``, ``Cancel``, ``Input``, ``Credit``, ``Drained``.
Replica → caller: ``Result``, ``Error``, ``StreamItem``, ``StreamEnd``, ``Reject``,
``Credit``, ``Draining``; the replies that end a call carry the replica's number of ongoing
requests, which routers use to correct their counts. Control plane, either direction:
``Call``, ``Reply``, ``Push``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = [
    "CALL",
    "CANCEL",
    "CREDIT",
    "DRAINED",
    "DRAINING",
    "ERROR",
    "INPUT",
    "PUSH",
    "REJECT",
    "REPLY",
    "REQUEST",
    "RESULT",
    "STREAM_END",
    "STREAM_ITEM",
    "Call",
    "Cancel",
    "Credit",
    "Drained",
    "Draining",
    "Error",
    "ErrorPayload",
    "Input",
    "Message",
    "Push",
    "Reject",
    "Reply",
    "Request",
    "Result",
    "StreamEnd",
    "StreamItem",
    "view",
]

REQUEST = 0
CANCEL = 1
RESULT = 2
ERROR = 3
STREAM_ITEM = 4
STREAM_END = 5
INPUT = 6
REJECT = 7
CREDIT = 8
DRAINING = 9
CALL = 10
REPLY = 11
PUSH = 12
DRAINED = 13

Meta = dict[str, Any]

# Flow control of streamed output (``Credit``, caller -> replica): a producer has at most
# STREAM_WINDOW bytes of frames sent and not credited (one item may pass it); a consumer
# credits once it has taken CREDIT_EVERY bytes.
STREAM_WINDOW = 1 << 20
CREDIT_EVERY = STREAM_WINDOW // 4


class Request(NamedTuple):
    """Run ``method(*args, **kwargs)``; ``meta``: the request's context (HTTP, streaming,
    multiplexed model id, request id), or None."""

    kind: int
    rid: int
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    meta: Meta | None


class Cancel(NamedTuple):
    kind: int
    rid: int


class Input(NamedTuple):
    """More input for a running request: a websocket's messages, a streamed body's parts."""

    kind: int
    rid: int
    message: dict[str, Any]


class Credit(NamedTuple):
    """Flow control. Replica → caller: the app took ``nbytes`` more of the request's streamed
    body (0: the request has started, its body may follow). Caller → replica: the caller took
    ``nbytes`` more of the call's streamed output."""

    kind: int
    rid: int
    nbytes: int


class Result(NamedTuple):
    kind: int
    rid: int
    value: Any
    ongoing: int


class ErrorPayload(NamedTuple):
    """A failed call's exception: itself when it survives pickling (else None), and always its
    type's name, message and the replica's traceback."""

    exc: BaseException | None
    type_name: str
    message: str
    traceback: str


class Error(NamedTuple):
    kind: int
    rid: int
    error: ErrorPayload
    ongoing: int


class StreamItem(NamedTuple):
    kind: int
    rid: int
    item: Any


class StreamEnd(NamedTuple):
    kind: int
    rid: int
    value: None
    ongoing: int


class Reject(NamedTuple):
    """Not run: the replica is draining; the caller routes the request elsewhere."""

    kind: int
    rid: int
    value: None
    ongoing: int


class Draining(NamedTuple):
    """The replica is stopping: send it nothing more, and say so with ``Drained``. The
    connection is ordered, so once the replica has a caller's ``Drained`` no request of that
    caller can still be on its way (those before it are refused with ``Reject``)."""

    kind: int


class Drained(NamedTuple):
    kind: int


class Call(NamedTuple):
    """A control call: ``rpc_<method>(**kwargs)`` of the peer's handler."""

    kind: int
    cid: int
    method: str
    kwargs: dict[str, Any]


class Reply(NamedTuple):
    kind: int
    cid: int
    ok: bool
    value: Any  # the result, or the exception when not ok


class Push(NamedTuple):
    kind: int
    topic: str
    value: Any


Message = (
    Request
    | Cancel
    | Input
    | Credit
    | Result
    | Error
    | StreamItem
    | StreamEnd
    | Reject
    | Draining
    | Drained
    | Call
    | Reply
    | Push
)

# kind -> (class, number of fields); a list, as kinds are small numbers
_SHAPES: list[tuple[type[Any], int] | None] = [None] * (DRAINED + 1)
for _kind, _cls in (
    (REQUEST, Request),
    (CANCEL, Cancel),
    (INPUT, Input),
    (CREDIT, Credit),
    (RESULT, Result),
    (ERROR, Error),
    (STREAM_ITEM, StreamItem),
    (STREAM_END, StreamEnd),
    (REJECT, Reject),
    (DRAINING, Draining),
    (DRAINED, Drained),
    (CALL, Call),
    (REPLY, Reply),
    (PUSH, Push),
):
    _SHAPES[_kind] = (_cls, len(_cls._fields))
_new = tuple.__new__


def view(raw: tuple[Any, ...]) -> Message:
    """The message ``raw`` is, read by name; raises if it is none (the peer is not serval's,
    or not this version of it)."""
    kind = raw[0]
    shape = _SHAPES[kind] if type(kind) is int and 0 <= kind <= DRAINED else None
    if shape is None or len(raw) != shape[1]:
        raise ValueError(f"not a serval message: kind {kind!r}, {len(raw)} fields")
    message: Message = _new(shape[0], raw)
    return message
