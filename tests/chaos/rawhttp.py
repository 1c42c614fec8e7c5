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


def parse_response(
    buf: bytes | bytearray, eof: bool = False, head: bool = False
) -> tuple[Response, int]:
    """The first response in ``buf`` and how many bytes it took; Incomplete if it has not all
    arrived (``eof``: nothing more will, so a body delimited by the close ends here)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        raise Incomplete
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not a status line: {lines[0]!r}")
    status = int(parts[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    pos = end + 4
    response = Response(status, headers, b"")
    if head or status < 200 or status in (204, 304):
        return response, pos
    te = response.header("transfer-encoding")
    if te and "chunked" in te.lower():
        response.chunked = True
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
    """One keep-alive HTTP/1.1 connection over a plain socket (reconnects when it was closed)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        return sock

    def request(
        self,
        path: str = "/",
        method: str = "GET",
        body: bytes = b"",
        headers: Iterable[tuple[str, str]] = (),
    ) -> Response:
        if self.sock is None:
            self.sock = self._connect()
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        for k, v in headers:
            head += f"{k}: {v}\r\n"
        if body or method in ("POST", "PUT"):
            head += f"Content-Length: {len(body)}\r\n"
        try:
            self.sock.sendall(head.encode() + b"\r\n" + body)
            response = self._read(head_only=method == "HEAD")
        except BaseException:
            self.close()
            raise
        if (response.header("connection") or "").lower() == "close":
            self.close()
        return response

    def _read(self, head_only: bool) -> Response:
        assert self.sock is not None
        while True:
            try:
                response, used = parse_response(self.buf, head=head_only)
            except Incomplete:
                pass
            else:
                del self.buf[:used]
                return response
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                try:
                    response, used = parse_response(self.buf, eof=True, head=head_only)
                except Incomplete:
                    raise ConnectionError("connection closed before a whole response") from None
                if not response.complete:
                    raise ConnectionError("connection closed inside the response body")
                return response
            self.buf += chunk

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
