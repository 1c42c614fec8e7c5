"""A request body that streams to the replica while it still arrives from the client.

The request leaves for the replica with the body so far; the rest follows as input messages
under a credit window (``Upload``). ``UploadCall`` is that request's call, through which the
replica's credits come back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from serval._private.caller.calls import Call

__all__ = ["BODY_END", "Upload", "UploadCall"]


class _Flow(Protocol):
    def pause_reading(self) -> None: ...


class _Connection(Protocol):
    @property
    def flow(self) -> _Flow: ...

    def resume_body(self) -> None: ...


class _Exchange(Protocol):
    """What an upload needs of its exchange (``http_protocol.Exchange``)."""

    @property
    def complete(self) -> bool: ...

    @property
    def call(self) -> Call | None: ...

    @property
    def conn(self) -> _Connection: ...


class UploadCall(Call):
    """The call of a request whose body streams after it (see ``Upload``)."""

    __slots__ = ("upload",)

    def __init__(
        self, upload: Upload, app: str, ingress: str, args: tuple[Any, ...], meta: dict[str, Any]
    ) -> None:
        super().__init__(app, ingress, "__call__", args, {}, meta, stream=True)
        self.upload = upload

    def credit(self, nbytes: int, send_input: Callable[[Call, Any], None]) -> None:
        self.upload.credited(nbytes, send_input)


class Upload:
    """A request body on its way to the replica while it still arrives from the client.

    The request left with the body so far; the rest follows as input messages, once the
    replica has started the request (its first credit, of 0 bytes: before that a refusal
    would send the request elsewhere, and a replica that has not started it has nowhere to
    put its input). The replica credits the bytes its app has taken; while more than a window
    is on its way uncredited, the client is not read. So this side holds at most about a
    window (plus one read) per upload, and so does the replica.
    """

    __slots__ = ("ended", "ex", "held", "send_input", "unacked", "waiting", "window")

    def __init__(self, ex: _Exchange, first: int, window: int) -> None:
        self.ex = ex
        self.window = window
        self.unacked = first  # bytes sent or waiting, not yet credited
        self.waiting: list[bytes] | None = []  # chunks until the replica starts; then None
        self.send_input: Callable[[Call, Any], None] | None = None
        self.ended = False
        self.held = False  # reading the client is paused for credit
        self._hold_if_full()

    def add(self, chunk: bytes) -> None:
        self.unacked += len(chunk)
        if self.waiting is not None:
            self.waiting.append(chunk)
        else:
            self._send({"type": "http.request", "body": chunk, "more_body": True})
        self._hold_if_full()

    def end(self) -> None:
        self.ended = True
        if self.waiting is None:
            self._send(BODY_END)

    def credited(self, nbytes: int, send_input: Callable[[Call, Any], None]) -> None:
        ex = self.ex
        if ex.complete:
            return
        self.send_input = send_input  # the replica's own connection, even once it is retired
        waiting = self.waiting
        if waiting is not None:  # the replica has started the request: send what waited
            self.waiting = None
            for chunk in waiting:
                self._send({"type": "http.request", "body": chunk, "more_body": True})
            if self.ended:
                self._send(BODY_END)
        self.unacked -= nbytes
        if self.held and self.unacked <= self.window // 2:
            self.held = False
            ex.conn.resume_body()

    def _send(self, message: dict[str, Any]) -> None:
        call = self.ex.call
        if call is not None and self.send_input is not None and not self.ex.complete:
            self.send_input(call, message)

    def _hold_if_full(self) -> None:
        if not self.held and self.unacked >= self.window:
            self.held = True
            self.ex.conn.flow.pause_reading()


BODY_END: dict[str, Any] = {"type": "http.request", "body": b"", "more_body": False}
