"""Request/reply and push messages for the control plane, over one ``Connection``.

Either side may call the other: a call names a method of the peer's handler object
(``rpc_<name>``, sync or async); the reply carries the value or the exception.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections.abc import Callable
from typing import Any

from serval._private.wire import protocol, transport
from serval._private.wire.messages import CALL, REPLY, Call, Message, Push, Reply
from serval._private.wire.tasks import TaskOwner
from serval._private.wire.transport import Undecodable
from serval.exceptions import SerializationError

logger = logging.getLogger(__name__)

PushHandler = Callable[[str, Any], None]

# A frame's tag names the call it belongs to, so that one that does not unpickle can still be
# answered: a call's own id with this bit set, a reply's the id of the call it answers.
_CALL_TAG = 1 << 62


class RpcPeer:
    def __init__(
        self,
        handler: object | None = None,
        on_push: PushHandler | None = None,
        on_close: Callable[[RpcPeer], None] | None = None,
    ) -> None:
        self._handler = handler
        self._on_push = on_push
        self.on_close = on_close
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self.tasks = TaskOwner("a control connection")  # the calls it serves
        self.conn: transport.Connection | None = None
        self.info: dict[str, Any] = {}  # what the other side said about itself

    def protocol_factory(self) -> transport.Connection:
        self.conn = transport.Connection(self._on_message, self._on_lost)
        return self.conn

    @classmethod
    async def connect(
        cls,
        address: str,
        handler: object | None = None,
        on_push: PushHandler | None = None,
        on_close: Callable[[RpcPeer], None] | None = None,
    ) -> RpcPeer:
        peer = cls(handler, on_push, on_close)
        await transport.dial(address, peer.protocol_factory)
        return peer

    @property
    def closed(self) -> bool:
        return self.conn is None or self.conn.closed

    async def call(self, method: str, **kwargs: Any) -> Any:
        if self.conn is None or self.conn.closed:
            raise ConnectionResetError(f"control connection closed (calling {method})")
        cid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        try:
            self.conn.send(Call(CALL, cid, method, kwargs), cid | _CALL_TAG)
            return await fut
        finally:
            self._pending.pop(cid, None)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    # -- incoming ----------------------------------------------------------------------------

    def _on_message(self, conn: transport.Connection, msg: Message | Undecodable) -> None:
        if isinstance(msg, Undecodable):
            self._undecodable(msg)
        elif type(msg) is Reply:
            fut = self._pending.get(msg.cid)
            if fut is not None and not fut.done():
                if msg.ok:
                    fut.set_result(msg.value)
                else:
                    fut.set_exception(msg.value)
        elif type(msg) is Call:
            self.tasks.spawn(self._serve(msg.cid, msg.method, msg.kwargs))
        elif type(msg) is Push and self._on_push is not None:
            self._on_push(msg.topic, msg.value)

    async def _serve(self, cid: int, method: str, kwargs: dict[str, Any]) -> None:
        try:
            fn = getattr(self._handler, f"rpc_{method}")
            value = fn(peer=self, **kwargs)
            if inspect.isawaitable(value):
                value = await value
            reply = Reply(REPLY, cid, True, value)
        except Exception as exc:
            if not isinstance(exc, ConnectionError):
                logger.debug("rpc %s failed", method, exc_info=True)
            reply = Reply(REPLY, cid, False, _portable(exc, method))
        if self.conn is None or self.conn.closed:
            return
        try:
            self.conn.send(reply, cid)
        except BaseException as exc:  # an unpicklable exception or value: say so instead
            error = RuntimeError(f"{method}: {type(exc).__name__}: {protocol.safe_str(exc)}")
            self.conn.send(Reply(REPLY, cid, False, error), cid)

    def _undecodable(self, msg: Undecodable) -> None:
        """A call or reply that did not unpickle here (it holds a class this process cannot
        import, say): answer or fail the call it belongs to, found by the frame's tag, so that
        nobody waits for ever."""
        reason = f"{type(msg.error).__name__}: {protocol.safe_str(msg.error)}"
        logger.error("undecodable control message: %s", reason)
        if msg.tag & _CALL_TAG:
            cid = msg.tag & ~_CALL_TAG
            error = SerializationError(f"the peer could not decode this call: {reason}")
            if self.conn is not None and not self.conn.closed:
                self.conn.send(Reply(REPLY, cid, False, error), cid)
            return
        fut = self._pending.get(msg.tag)
        if fut is not None and not fut.done():
            fut.set_exception(SerializationError(f"could not decode the reply: {reason}"))

    def _on_lost(self, conn: transport.Connection, exc: BaseException | None) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("control connection lost"))
        self.tasks.cancel()  # (finishing on the loop; nobody is left to answer)
        if self.on_close is not None:
            self.on_close(self)


def _portable(exc: Exception, method: str) -> Exception:
    """``exc`` as the other side can unpickle it. The controller must never need the user's
    code (it has none on its path), so an exception of a user's class, from ``check_health``
    or ``reconfigure`` say, crosses as a ``RuntimeError`` that names it."""
    module = type(exc).__module__
    if module == "builtins" or module == "serval" or module.startswith("serval."):
        return exc
    return RuntimeError(f"{method} raised {type(exc).__qualname__}: {protocol.safe_str(exc)}")
