"""A raw HTTP/1.1 client for the chaos suite: keep-alive requests over a plain socket, and
arbitrary bytes sent on a fresh connection with everything that comes back (responses, a close
or a reset) — what a hostile or broken client would see."""

from __future__ import annotations

import contextlib
import select
import socket
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes
    chunked: bool = False
    complete: bool = True  # False: the connection ended inside the body

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


class Incomplete(Exception):
    pass


def parse_head(buf: bytes | bytearray) -> tuple[Response, int]:
    """The status line and headers at the start of ``buf`` (a Response without its body), and
    where the body starts; Incomplete if the head has not all arrived."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        raise Incomplete
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not a status line: {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    response = Response(int(parts[1]), headers, b"")
    te = response.header("transfer-encoding")
    response.chunked = bool(te and "chunked" in te.lower())
    return response, end + 4


def _bodyless(response: Response, head: bool) -> bool:
    return head or response.status < 200 or response.status in (204, 304)


def parse_response(
    buf: bytes | bytearray, eof: bool = False, head: bool = False
) -> tuple[Response, int]:
    """The first response in ``buf`` and how many bytes it took; Incomplete if it has not all
    arrived (``eof``: nothing more will, so a body delimited by the close ends here)."""
    response, pos = parse_head(buf)
    if _bodyless(response, head):
        return response, pos
    if response.chunked:
        body = bytearray()
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return _cut(response, body, eof, len(buf))
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            if size == 0:
                if buf.find(b"\r\n", line_end + 2) < 0:  # the trailer's end
                    return _cut(response, body, eof, len(buf))
                response.body = bytes(body)
                return response, buf.find(b"\r\n", line_end + 2) + 2
            if len(buf) < line_end + 2 + size + 2:
                body += buf[line_end + 2 : line_end + 2 + size]
                return _cut(response, body, eof, len(buf))
            body += buf[line_end + 2 : line_end + 2 + size]
            pos = line_end + 2 + size + 2
    length = response.header("content-length")
    if length is not None:
        n = int(length)
        if len(buf) - pos < n:
            return _cut(response, bytearray(buf[pos:]), eof, len(buf))
        response.body = bytes(buf[pos : pos + n])
        return response, pos + n
    if not eof:
        raise Incomplete
    response.body = bytes(buf[pos:])
    return response, len(buf)


def _cut(response: Response, body: bytearray, eof: bool, used: int) -> tuple[Response, int]:
    if not eof:
        raise Incomplete
    response.body = bytes(body)
    response.complete = False
    return response, used


class HttpConn:
    """One keep-alive HTTP/1.1 connection over a plain socket (reconnects when it was closed).
    Responses are read as they arrive (a large chunked body is not parsed again per read)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    @classmethod
    def over(cls, sock: socket.socket) -> HttpConn:
        """Read responses from a socket the caller wrote its request on (and still owns)."""
        conn = cls(0, timeout=sock.gettimeout() or 60.0)
        conn.sock = sock
        return conn

    def connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = bytearray()
        return self.sock

    def request(
        self,
        path: str = "/",
        method: str = "GET",
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
    ) -> Response:
        sock = self.connect()
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        for k, v in headers:
            head += f"{k}: {v}\r\n"
        if body or method in ("POST", "PUT"):
            head += f"Content-Length: {len(body)}\r\n"
        try:
            sock.sendall(head.encode() + b"\r\n" + body)
            response = self.read_response(head_only=method == "HEAD")
        except BaseException:
            self.close()
            raise
        if (response.header("connection") or "").lower() == "close":
            self.close()
        return response

    def read_response(self, head_only: bool = False) -> Response:
        while True:
            try:
                response, pos = parse_head(self.buf)
                break
            except Incomplete:
                if not self._fill():
                    raise ConnectionError("connection closed before a whole response") from None
        del self.buf[:pos]
        if _bodyless(response, head_only):
            return response
        if response.chunked:
            response.body = self._chunked_body()
            return response
        length = response.header("content-length")
        if length is None:  # delimited by the close
            while self._fill():
                pass
            response.body, self.buf = bytes(self.buf), bytearray()
            return response
        n = int(length)
        while len(self.buf) < n:
            self._need()
        response.body = bytes(self.buf[:n])
        del self.buf[:n]
        return response

    def _chunked_body(self) -> bytes:
        body = bytearray()
        while True:
            while (line_end := self.buf.find(b"\r\n")) < 0:
                self._need()
            size = int(bytes(self.buf[:line_end]).split(b";")[0], 16)
            del self.buf[: line_end + 2]
            if size == 0:
                while True:  # trailer fields, up to an empty line
                    while (line_end := self.buf.find(b"\r\n")) < 0:
                        self._need()
                    del self.buf[: line_end + 2]
                    if line_end == 0:
                        return bytes(body)
            while len(self.buf) < size + 2:
                self._need()
            body += self.buf[:size]
            del self.buf[: size + 2]

    def _fill(self) -> bool:
        """Read more into the buffer; False at the end of the stream."""
        assert self.sock is not None
        chunk = self.sock.recv(1 << 20)
        self.buf += chunk
        return bool(chunk)

    def _need(self) -> None:
        if not self._fill():
            raise ConnectionError("connection closed inside the response body")

    def detach(self) -> None:
        """Forget the socket without closing it (its owner will)."""
        self.sock = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class Exchange:
    """What came back for some raw bytes sent on a fresh connection."""

    responses: list[Response]
    leftover: bytes  # received bytes that are not a whole response
    eof: bool  # the server closed (FIN)
    reset: bool  # the server reset the connection
    timed_out: bool  # neither within the time allowed
    send_error: str = ""
    elapsed: float = 0.0

    @property
    def closed(self) -> bool:
        return self.eof or self.reset

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    def summary(self) -> str:
        end = "reset" if self.reset else "closed" if self.eof else "open" if self.timed_out else "?"
        extra = f", {len(self.leftover)} stray bytes" if self.leftover else ""
        return f"{self.statuses or 'no response'}, {end}{extra}"


def exchange(
    port: int,
    data: bytes,
    timeout: float = 2.0,
    shut_wr: bool = False,
    piece: int = 0,
    stop_when_answered: bool = False,
) -> Exchange:
    """Send ``data`` on a new connection (in pieces of ``piece`` bytes if given, stopping early
    if ``stop_when_answered`` and the server has answered), optionally half-close, then read
    until the server closes or ``timeout`` seconds pass."""
    start = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received = bytearray()
    eof = reset = False
    send_error = ""
    try:
        view = memoryview(data)
        step = piece or len(data) or 1
        for i in range(0, len(data), step):
            if stop_when_answered and select_readable(sock, 0):
                break
            try:
                sock.sendall(view[i : i + step])
            except OSError as exc:  # the server stopped reading and closed
                send_error = f"{type(exc).__name__}: {exc}"
                break
        if shut_wr and not send_error:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select_readable(sock, left):
                break
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                reset = True
                break
            except OSError:
                reset = True
                break
            if not chunk:
                eof = True
                break
            received += chunk
    finally:
        sock.close()
    responses = []
    pos = 0
    while pos < len(received):
        try:
            response, used = parse_response(received[pos:], eof=eof or reset)
        except (Incomplete, ValueError):
            break
        responses.append(response)
        pos += used
    return Exchange(
        responses,
        bytes(received[pos:]),
        eof,
        reset,
        timed_out=not (eof or reset),
        send_error=send_error,
        elapsed=time.monotonic() - start,
    )


def select_readable(sock: socket.socket, timeout: float) -> bool:
    # poll, not select: a flood scenario holds thousands of sockets, so fds pass 1024
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


def http_p50(
    port: int, path: str, n: int, timeout: float = 10.0, duration_s: float = 0.0
) -> tuple[float, int]:
    """The p50 (s) of sequential GETs on one keep-alive connection, and how many were not a
    200: ``n`` of them, or as many as fit in ``duration_s`` if that is given."""
    conn = HttpConn(port, timeout=timeout)
    times, bad = [], 0
    end = time.monotonic() + duration_s
    try:
        while len(times) < n if not duration_s else time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                ok = conn.request(path).status == 200
            except OSError:
                ok = False
            times.append(time.perf_counter() - t0)
            bad += not ok
    finally:
        conn.close()
    return statistics.median(times), bad
