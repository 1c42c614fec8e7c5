"""A framed, message-oriented connection over a Unix domain socket.

One ``Connection`` carries many messages in both directions. Receiving uses
``asyncio.BufferedProtocol`` so that a large frame is read straight into its own buffer, which
the decoded message then references (no second copy). Sends made during one event-loop tick are
coalesced into a single ``writelines``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import threading
from collections.abc import Callable

from serval._private.wire import auth, endpoints, protocol
from serval._private.wire.messages import Message, view
from serval._private.wire.tasks import TaskOwner

logger = logging.getLogger(__name__)

_NO_BUFFERS: list[int] = []
_SMALL = 64 * 1024  # frames above this are read into a buffer of their own
_MIN_FREE = 16 * 1024
# A tick's messages leave in writes of at most this many pieces: the peer starts on the first
# ones while this side still produces the rest (one write per tick made the two take turns).
_FLUSH_AT = 16

MessageHandler = Callable[["Connection", "Message | Undecodable"], None]
LostHandler = Callable[["Connection", "BaseException | None"], None]


class Connection(asyncio.BufferedProtocol):
    def __init__(
        self,
        on_message: MessageHandler,
        on_lost: LostHandler | None = None,
        thread_writes: bool = False,
    ) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(_SMALL)
        self._filled = 0
        self._big: bytearray | None = None
        self._big_filled = 0
        self._big_shape: tuple[int, int, list[int]] = (0, 0, [])
        self._outbox: list[bytes | memoryview] = []
        self._flush_scheduled = False
        self.closed = False
        # The size on the wire of the message being delivered (for streams' flow control).
        self.frame_size = 0
        self.closed_future: asyncio.Future[None] = self._loop.create_future()
        # Writes from other threads (see write_from_thread): a lock every write holds, a
        # descriptor of our own (the transport's may be closed and its number reused while a
        # thread writes), and bytes a thread could not finish, which must leave first.
        self._thread_writes = thread_writes
        self._wlock: threading.Lock | None = None
        self._wfd = -1
        self._tail: bytes | memoryview | None = None

    @property
    def connected(self) -> bool:
        return self._transport is not None

    # -- sending -----------------------------------------------------------------------------

    def send(self, message: Message, tag: int = 0, plain: bool = False) -> None:
        """Queue ``message``; raises if it does not pickle (nothing is queued then)."""
        self.send_pieces(protocol.encode(message, tag, plain))

    def send_pieces(self, pieces: list[bytes | memoryview]) -> None:
        if self.closed:
            raise ConnectionResetError("connection is closed")
        if not self._flush_scheduled and self._transport is not None:
            # The first message of a loop tick goes out at once (latency); the rest of the
            # tick's messages wait for one coalesced write at its end (throughput).
            self._write(pieces)
        else:
            self._outbox.extend(pieces)
            if len(self._outbox) >= _FLUSH_AT and self._transport is not None:
                self._write_outbox()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._transport is None or self.closed or not self._outbox:
            return
        self._write_outbox()

    def _write_outbox(self) -> None:
        out, self._outbox = self._outbox, []
        self._write(out)

    def _write(self, pieces: list[bytes | memoryview]) -> None:
        transport = self._transport
        assert transport is not None
        lock = self._wlock
        if lock is None:
            if len(pieces) == 1:
                transport.write(pieces[0])
            else:
                transport.writelines(pieces)
            return
        with lock:
            if self._tail is not None:
                pieces = [self._tail, *pieces]
                self._tail = None
            transport.writelines(pieces)

    def _write_tail(self) -> None:
        if self._transport is not None and not self.closed and self._tail is not None:
            self._write([])

    def write_from_thread(self, frame: bytes | memoryview) -> bool:
        """Write one whole frame from a thread other than the loop's, at once; False when it
        cannot go now (nothing was written then: send it through the loop instead).

        A replica's worker thread answers a sync call this way, saving the wake-up of the
        loop before the caller hears back. Every write to the socket holds ``_wlock``, and a
        thread writes only when the transport has nothing buffered, so frames never mix.
        """
        lock = self._wlock
        if lock is None:
            return False
        with lock:
            transport = self._transport
            if self.closed or transport is None or self._tail is not None:
                return False
            if transport.is_closing() or transport.get_write_buffer_size():
                return False
            try:
                n = os.write(self._wfd, frame)
            except OSError:  # would block, or the connection is going: the loop decides
                return False
            if n < len(frame):  # the rest leaves first, from the loop
                self._tail = frame[n:]
                self._loop.call_soon_threadsafe(self._write_tail)
        return True

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._flush()
            self._transport.close()

    # -- asyncio protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        if self._thread_writes:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self._wfd = os.dup(sock.fileno())
                self._wlock = threading.Lock()
        if self._outbox and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def connection_lost(self, exc: BaseException | None) -> None:
        lock = self._wlock
        if lock is not None:
            with lock:  # no thread is writing to _wfd while it closes
                self.closed = True
                os.close(self._wfd)
                self._wfd = -1
        self.closed = True
        self._outbox.clear()
        if not self.closed_future.done():
            self.closed_future.set_result(None)
        if self._on_lost is not None:
            self._on_lost(self, exc)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_filled :]
        if len(self._buf) - self._filled < _MIN_FREE:
            # A fresh buffer, never an in-place resize: the transport may still hold a view.
            grown = bytearray(max(len(self._buf) * 2, self._filled + _MIN_FREE))
            grown[: self._filled] = self._buf[: self._filled]
            self._buf = grown
        return memoryview(self._buf)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_filled += nbytes
            if self._big_filled == len(self._big):
                frame, (hlen, mlen, blens) = self._big, self._big_shape
                self._big = None
                self.frame_size = len(frame)
                self._deliver(memoryview(frame), hlen, mlen, blens)
            return
        self._filled += nbytes
        self._parse()

    def _parse(self) -> None:
        buf, end, pos = self._buf, self._filled, 0
        while end - pos >= protocol.HEADER.size:
            meta_len, nbufs, tag = protocol.HEADER.unpack_from(buf, pos)
            hlen = protocol.HEADER.size + protocol.BUFLEN.size * nbufs
            if end - pos < hlen:
                break
            if nbufs:
                blens = [
                    protocol.BUFLEN.unpack_from(buf, pos + protocol.HEADER.size + 8 * i)[0]
                    for i in range(nbufs)
                ]
                total = hlen + meta_len + sum(blens)
            else:
                blens = _NO_BUFFERS
                total = hlen + meta_len
            have = end - pos
            if have >= total:
                self.frame_size = total
                if nbufs:
                    # Copy out of the reusable buffer: decoded buffers must own their memory.
                    frame = bytearray(buf[pos : pos + total])
                    self._deliver(memoryview(frame), hlen, meta_len, blens)
                else:  # the common small message: unpickle straight from the buffer
                    self._deliver_plain(buf[pos + hlen : pos + total], tag)
                pos += total
                if self.closed:
                    return
                continue
            if total > _SMALL:
                big = bytearray(total)
                big[:have] = buf[pos:end]
                self._big, self._big_filled, self._big_shape = big, have, (hlen, meta_len, blens)
                pos = end
            break
        rest = end - pos
        if rest and pos:
            buf[:rest] = buf[pos:end]
        self._filled = rest

    def _deliver(self, frame: memoryview, hlen: int, mlen: int, blens: list[int]) -> None:
        message: Message | Undecodable
        try:
            message = view(protocol.loads(frame, hlen, mlen, blens))
        except Exception as exc:
            # Framing is separate from pickling, so the stream stays usable; the handler learns
            # of it as an undecodable message carrying the frame's tag (the request id).
            tag = protocol.HEADER.unpack_from(frame, 0)[2]
            message = Undecodable(tag, exc)
        try:
            self._on_message(self, message)
        except Exception:  # a handler's bug must not lose the messages after this one
            logger.exception("handling a message failed")

    def _deliver_plain(self, pickled: bytearray, tag: int) -> None:
        message: Message | Undecodable
        try:
            message = view(pickle.loads(pickled))
        except Exception as exc:
            message = Undecodable(tag, exc)
        try:
            self._on_message(self, message)
        except Exception:  # (as in _deliver)
            logger.exception("handling a message failed")

    def eof_received(self) -> bool | None:
        return None


class Undecodable:
    """Stands in for a message that arrived whole but did not unpickle."""

    def __init__(self, tag: int, error: BaseException) -> None:
        self.tag = tag
        self.error = error


async def dial(address: str, factory: Callable[[], Connection]) -> Connection:
    """Connect to ``address`` (see ``endpoints``) with the connection ``factory`` makes: a Unix
    socket's path, or TCP once both ends have proven they hold the cluster's secret."""
    loop = asyncio.get_running_loop()
    endpoint = endpoints.choose(address)
    if endpoint.kind == "unix":
        _, conn = await loop.create_unix_connection(factory, endpoint.path)
        return conn
    secret = endpoints.secret()
    sock = socket.socket(_family(endpoint.host), socket.SOCK_STREAM)
    try:
        _tune_tcp(sock)
        await loop.sock_connect(sock, (endpoint.host, endpoint.port))
        await auth.connect(sock, secret)
        _, conn = await loop.create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    return conn


async def listen(path: str, factory: Callable[[], Connection]) -> asyncio.base_events.Server:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket of an earlier process with this name
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o600)
    server = await loop.create_unix_server(factory, sock=sock, backlog=1024)
    return server


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# A peer on a machine that vanished sends nothing, not even a reset: probe an idle TCP
# connection after 5 s, every 2 s, and drop it after 3 unanswered probes (about 11 s), so
# that calls in flight to a lost node fail (ReplicaDiedError) instead of waiting for ever.
_KEEPALIVE = (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3))


def _tune_tcp(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE:
        option = getattr(socket, name, None)
        if option is not None:  # (Linux has them all; other systems some)
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class TcpListener:
    """A TCP endpoint that hands a connection to ``factory``'s protocol only once its dialler
    has proven it holds ``secret`` (``auth``): until then the socket is read by the handshake
    alone, a few fixed-size fields, and never by the framing."""

    def __init__(self, sock: socket.socket, factory: Callable[[], Connection], secret: bytes):
        self._sock = sock
        self._factory = factory
        self._secret = secret
        self.host, self.port = sock.getsockname()[:2]
        self.tasks = TaskOwner(f"the TCP listener on port {self.port}")
        self.refused = 0  # connections whose dialler failed the handshake
        self._accepting = self.tasks.spawn(self._accept_loop())

    @classmethod
    async def start(
        cls, host: str, port: int, factory: Callable[[], Connection], secret: bytes
    ) -> TcpListener:
        sock = socket.socket(_family(host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return cls(sock, factory, secret)

    @property
    def address(self) -> str:
        return endpoints.tcp(self.host, self.port)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of descriptors, say: wait, do not spin
                logger.warning("accepting a TCP connection failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self.tasks.spawn(self._admit(sock))

    async def _admit(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            _tune_tcp(sock)
            await auth.accept(sock, self._secret)
            await loop.connect_accepted_socket(self._factory, sock)
        except (TimeoutError, OSError) as exc:
            self.refused += 1
            logger.warning("refused a TCP connection: %s", exc or type(exc).__name__)
            sock.close()
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self._sock.close()
        self.tasks.cancel()

    async def aclose(self) -> None:
        self._sock.close()
        await self.tasks.close()
