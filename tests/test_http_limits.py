"""The proxy's resource limits, on raw sockets against a real cluster: a connection that does
not finish its request head in time is closed (408 when it began one, silently when it sent
nothing), however slowly it trickles; a pending body that goes quiet gets a 408; a head over
the size limit gets a 431 and is not read on, even when it is endless; connections past the
cap make room by closing the idlest, never one being answered; the proxy raises its open
files limit; the options are accepted in config files. A normal client is served throughout."""

from __future__ import annotations

import contextlib
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

import serval as serve
from conftest import BackgroundThreads, poll, serval_processes
from serval import HTTPOptions
from serval._private.caller import runtime
from serval._private.proxy.server import default_max_connections
from serval.schema import ConfigError, load_config
from test_http_errors import own_cluster
from test_http_protocol import get, read_response

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
KEEP_ALIVE = 3.0
MAX_HEAD = 8192


@serve.deployment(max_ongoing_requests=100)
class Echo:
    async def __call__(self, request: Request) -> str:
        delay = float(request.query_params.get("sleep", "0"))
        body = await request.body()
        if delay:
            import asyncio

            await asyncio.sleep(delay)
        return f"{request.method} {len(body)}"


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


@pytest.fixture(scope="module")
def limited() -> Iterator[str]:
    """A cluster with short limits, serving Echo at /echo. (The tests that start clusters of
    their own come after every test of this one: starting one ends the cluster running.)"""
    with own_cluster(
        request_header_timeout_s=HEADER_TIMEOUT,
        request_body_timeout_s=BODY_TIMEOUT,
        keep_alive_timeout_s=KEEP_ALIVE,
        max_request_header_bytes=MAX_HEAD,
    ) as url:
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        yield url


@contextlib.contextmanager
def raw(url: str, timeout: float = 10) -> Iterator[socket.socket]:
    sock = socket.create_connection(address(url), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


def proxy_pid() -> int:
    address_ = runtime.address()
    assert address_ is not None
    (pid,) = [p for p, cmd in serval_processes(address_) if "serval::proxy" in cmd]
    return pid


class NormalClient(BackgroundThreads):
    """A client that keeps making ordinary requests (a new connection each time, as a load
    balancer's health checks would) and records how each went."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run)]

    def _run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                r = httpx.post(f"{self.url}/echo", content=b"abc", timeout=10)
                if r.status_code != 200 or r.text != "POST 3":
                    self.failures.append(f"{r.status_code} {r.text[:80]}")
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - start)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        assert self.latencies, "the normal client made no request"
        assert not self.failures, self.failures


# -- the request head: its time ---------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_silently(limited: str) -> None:
    with raw(limited) as sock:
        start = time.monotonic()
        assert read_until_closed(sock) == b""
        assert HEADER_TIMEOUT * 0.8 < time.monotonic() - start < HEADER_TIMEOUT + 1.5


def test_a_half_sent_head_gets_408(limited: str) -> None:
    with raw(limited) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Half: ")
        reply = read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        assert b"connection: close" in reply
        assert HEADER_TIMEOUT * 0.8 < time.monotonic() - start < HEADER_TIMEOUT + 1.5


def test_trickling_a_head_does_not_put_off_its_deadline(limited: str) -> None:
    """slowloris: a byte every 0.1 s keeps the connection busy, never the head complete."""
    with raw(limited) as sock, NormalClient(limited):
        start = time.monotonic()
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        sock.settimeout(0.1)
        received = b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - start < HEADER_TIMEOUT + 3:
                try:  # (what came is read before the next byte goes: a reset may follow it)
                    chunk = sock.recv(65536)
                    received += chunk
                    if not chunk:
                        break
                except TimeoutError:
                    pass
                sock.sendall(b"X")
        elapsed = time.monotonic() - start
        assert received.startswith(b"HTTP/1.1 408 "), received
        assert elapsed < HEADER_TIMEOUT + 1.5


def test_between_requests_the_wait_is_the_keep_alive_timeout(limited: str) -> None:
    with raw(limited) as sock:
        f = sock.makefile("rb")
        sock.sendall(get("/echo/a"))
        assert read_response(f)[0] == 200
        time.sleep(HEADER_TIMEOUT * 1.5)  # past the header timeout, within the keep-alive one
        sock.sendall(get("/echo/b"))
        assert read_response(f)[:3:2] == (200, b"GET 0")
        answered = time.monotonic()
        assert f.read() == b""  # closed, silently, once the keep-alive timeout passes
        assert KEEP_ALIVE * 0.8 < time.monotonic() - answered < KEEP_ALIVE + 1.5


def test_bare_line_ends_do_not_put_off_the_keep_alive_timeout(limited: str) -> None:
    with raw(limited) as sock:
        f = sock.makefile("rb")
        sock.sendall(get("/echo/a"))
        assert read_response(f)[0] == 200
        answered = time.monotonic()
        sock.settimeout(0.3)
        received = b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while time.monotonic() - answered < KEEP_ALIVE + 3:
                sock.sendall(b"\r\n")  # the parser skips these between requests
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                received += chunk
                if not chunk:
                    break
        assert received == b""
        assert time.monotonic() - answered < KEEP_ALIVE + 1.5


def test_a_head_begun_after_a_wait_has_the_header_timeout_from_its_first_byte(
    limited: str,
) -> None:
    with raw(limited) as sock:
        f = sock.makefile("rb")
        sock.sendall(get("/echo/a"))
        assert read_response(f)[0] == 200
        time.sleep(HEADER_TIMEOUT * 1.5)
        begun = time.monotonic()
        sock.sendall(b"GET /echo/b HTTP/1.1\r\n")
        status, headers, _ = read_response(f)
        assert status == 408 and headers["connection"] == "close"
        assert HEADER_TIMEOUT * 0.8 < time.monotonic() - begun < HEADER_TIMEOUT + 1.5


def test_a_pipelined_half_head_has_the_header_timeout_from_the_response_before(
    limited: str,
) -> None:
    with raw(limited) as sock:
        f = sock.makefile("rb")
        sock.sendall(get("/echo/a?sleep=1.5") + b"GET /echo/b HTTP/1.1\r\nHost: x\r\n")
        assert read_response(f)[:3:2] == (200, b"GET 0")  # longer than the header timeout
        answered = time.monotonic()
        assert read_response(f)[0] == 408
        assert HEADER_TIMEOUT * 0.8 < time.monotonic() - answered < HEADER_TIMEOUT + 1.5


# -- the request body: its time -----------------------------------------------------------------


def post_head(path: str, length: int) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()


def test_a_body_that_goes_quiet_gets_408(limited: str) -> None:
    with raw(limited) as sock, NormalClient(limited):
        sock.sendall(post_head("/echo", 100) + b"x" * 10)
        start = time.monotonic()
        reply = read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 408 "), reply
        assert BODY_TIMEOUT * 0.8 < time.monotonic() - start < BODY_TIMEOUT + 1.5


def test_a_slow_body_that_keeps_coming_is_served(limited: str) -> None:
    """The body timeout is a limit on silence, not on the whole body."""
    with raw(limited) as sock:
        f = sock.makefile("rb")
        sock.sendall(post_head("/echo", 6))
        for _ in range(6):  # 6 x 0.4 s: longer than the timeout in all, never silent that long
            time.sleep(BODY_TIMEOUT * 0.4)
            sock.sendall(b"y")
        assert read_response(f)[:3:2] == (200, b"POST 6")


@serve.deployment(max_ongoing_requests=10)
class Consumer:
    """Reads a body as it streams in; notes in a directory when it starts and is cancelled."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)

    async def __call__(self, request: Request) -> str:
        import asyncio

        tag = request.query_params["tag"]
        (self.dir / f"{tag}.started").touch()
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
        except asyncio.CancelledError:
            (self.dir / f"{tag}.cancelled").write_text(str(size))
            raise
        return str(size)


def test_a_streamed_upload_that_goes_quiet_gets_408_and_is_cancelled(
    limited: str, tmp_path: Path
) -> None:
    serve.run(Consumer.bind(str(tmp_path)), name="consumer", route_prefix="/consumer")
    try:
        with raw(limited) as sock:
            # Past the body window (1 MiB): the request leaves before its body is whole.
            sock.sendall(post_head("/consumer?tag=q", 10_000_000) + b"z" * 3_000_000)
            poll((tmp_path / "q.started").exists, timeout=5, what="the upload started")
            start = time.monotonic()
            reply = read_until_closed(sock)
            assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
            assert time.monotonic() - start < BODY_TIMEOUT + 1.5
        cancelled = tmp_path / "q.cancelled"
        # (written, not only created: write_text creates the file before it writes)
        size = poll(
            lambda: cancelled.exists() and cancelled.read_text(),
            timeout=5,
            what="the replica's request cancelled",
        )
        assert int(size) <= 3_000_000
    finally:
        serve.delete("consumer")


# -- the request head: its size -------------------------------------------------------------------


def test_a_head_within_the_limit_is_served_one_past_it_gets_431(limited: str) -> None:
    with raw(limited) as sock:
        f = sock.makefile("rb")
        sock.sendall(get("/echo/ok", "X-Big: " + "a" * (MAX_HEAD - 200)))
        assert read_response(f)[0] == 200
    for pieces in (1, 40):  # in one write, and in many
        request = get("/echo/big", "X-Big: " + "a" * (MAX_HEAD + 100))
        with raw(limited) as sock:
            step = len(request) // pieces + 1
            for i in range(0, len(request), step):
                sock.sendall(request[i : i + step])
            reply = read_until_closed(sock)
            assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
            assert b"connection: close" in reply


def test_an_endless_header_is_cut_off_and_does_not_stall_the_proxy(limited: str) -> None:
    """256 MB of one header value: the proxy stops reading near the limit, its memory stays
    small, and a normal client notices nothing."""
    piece = b"b" * 65536
    sent = 0
    reply = b""
    with raw(limited) as sock, NormalClient(limited) as normal:
        start = time.monotonic()
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            while sent < 256 * 1024 * 1024:
                sock.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the proxy closed it (or stopped reading it: the send blocks, then times out)
        with contextlib.suppress(OSError):
            reply = read_until_closed(sock)
        elapsed = time.monotonic() - start
        time.sleep(0.3)  # the normal client makes a few more requests after it
    assert sent < 32 * 1024 * 1024, f"the proxy took {sent} bytes of one header"
    assert elapsed < 15
    assert not reply or reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    with open(f"/proc/{proxy_pid()}/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    assert peak_kb < 200 * 1024, f"proxy peaked at {peak_kb} kB"
    slowest = max(normal.latencies)
    print(f"endless header: cut after {sent} bytes, {elapsed:.2f}s; slowest normal {slowest:.3f}s")


# -- the number of connections --------------------------------------------------------------------


def test_past_the_cap_the_idlest_connections_make_room_never_a_busy_one() -> None:
    cap = 12
    with own_cluster(max_connections=cap) as url:
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        with contextlib.ExitStack() as stack:
            busy = stack.enter_context(raw(url))
            busy.sendall(get("/echo/busy?sleep=3"))  # the oldest, but being answered
            time.sleep(0.2)
            idle = []
            for i in range(cap - 1):
                sock = stack.enter_context(raw(url))
                if i % 2:  # some between requests, some that never sent a byte
                    sock.sendall(get(f"/echo/{i}"))
                    read_response(sock.makefile("rb"))
                idle.append(sock)
                time.sleep(0.05)
            # The cap is reached: each newcomer is served, and the idlest one closes for it.
            for n in range(1, 4):
                newcomer = stack.enter_context(raw(url))  # (left open: the count stays known)
                newcomer.sendall(get("/echo/new"))
                assert read_response(newcomer.makefile("rb"))[:3:2] == (200, b"GET 0")
                closed = [i for i, s in enumerate(idle) if _closed(s)]
                assert closed == list(range(n)), closed
            status, _, body = read_response(busy.makefile("rb"))
            assert (status, body) == (200, b"GET 0")


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (it sends nothing else on an idle one)."""
    sock.settimeout(0.05)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_when_none_is_idle_a_newcomer_gets_503() -> None:
    cap = 6
    with own_cluster(max_connections=cap) as url:
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        with contextlib.ExitStack() as stack:
            busy = []
            for _ in range(cap):
                sock = stack.enter_context(raw(url))
                sock.sendall(get("/echo/busy?sleep=2"))
                busy.append(sock)
            time.sleep(0.3)
            with raw(url) as newcomer:
                reply = read_until_closed(newcomer)
            assert reply.startswith(b"HTTP/1.1 503 "), reply
            for sock in busy:
                assert read_response(sock.makefile("rb"))[0] == 200
        # once they are answered, there is room again
        assert httpx.post(f"{url}/echo", content=b"x", timeout=10).text == "POST 1"


def test_filling_the_connections_with_idle_ones_leaves_http_up() -> None:
    """fd exhaustion: far more idle connections than the cap, opened as fast as possible."""
    cap = 40
    with own_cluster(max_connections=cap) as url:
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        baseline = []
        for _ in range(20):
            start = time.monotonic()
            assert httpx.post(f"{url}/echo", content=b"abc", timeout=10).status_code == 200
            baseline.append(time.monotonic() - start)
        with contextlib.ExitStack() as stack, NormalClient(url) as normal:
            for _ in range(10 * cap):
                stack.enter_context(raw(url))
            time.sleep(0.5)
            open_now = len(list(Path(f"/proc/{proxy_pid()}/fd").iterdir()))
    baseline.sort()
    normal.latencies.sort()
    p50, base = normal.latencies[len(normal.latencies) // 2], baseline[len(baseline) // 2]
    print(f"fd exhaustion: normal p50 {p50 * 1e3:.1f} ms (baseline {base * 1e3:.1f} ms)")
    assert open_now < cap + 64


def test_the_proxy_raises_its_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(hard, 1024) if hard != resource.RLIM_INFINITY else 1024
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        with own_cluster():  # its processes inherit the lowered limit
            limits = Path(f"/proc/{proxy_pid()}/limits").read_text()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
    proxy_soft, proxy_hard = line.split()[3:5]
    assert proxy_soft == proxy_hard, line
    # and the default cap leaves room for the proxy's own descriptors
    assert default_max_connections(1024) == 1024 - 128
    assert default_max_connections(1_048_576) == 1_048_576 - 104_857
    assert default_max_connections(100) == 1


# -- the options ---------------------------------------------------------------------------------


def test_the_limits_are_options_with_sensible_defaults() -> None:
    options = HTTPOptions()
    assert options.request_header_timeout_s == 10
    assert options.request_body_timeout_s == 30
    assert options.max_request_header_bytes == 64 * 1024
    assert options.max_connections is None
    assert options.request_body_window_bytes == 1024 * 1024
    assert options.keep_alive_timeout_s == 90
    assert options.system_route_hosts == ()
    assert HTTPOptions.from_json(options.to_json()) == options
    assert HTTPOptions(system_route_hosts=["A.example"]).system_route_hosts == ("a.example",)
    bad: list[dict[str, Any]] = [
        {"request_header_timeout_s": 0},
        {"request_body_timeout_s": -1},
        {"keep_alive_timeout_s": float("inf")},
        {"max_request_header_bytes": 0},
        {"max_connections": 0},
        {"request_body_window_bytes": 1.5},
        {"system_route_hosts": "a.example"},
    ]
    for fields in bad:
        with pytest.raises(ValueError, match=next(iter(fields))):
            HTTPOptions(**fields)


def test_the_limits_are_accepted_in_config_files(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(
        """
http_options:
  port: 9123
  keep_alive_timeout_s: 5
  request_header_timeout_s: 2.5
  request_body_timeout_s: 7
  max_request_header_bytes: 16384
  max_request_body_bytes: 1000000
  max_connections: 500
  request_body_window_bytes: 262144
  system_route_hosts: [serval.internal]
applications:
  - import_path: app:thing
"""
    )
    options = load_config(str(path)).http()
    assert options == HTTPOptions(
        port=9123,
        keep_alive_timeout_s=5,
        request_header_timeout_s=2.5,
        request_body_timeout_s=7,
        max_request_header_bytes=16384,
        max_request_body_bytes=1_000_000,
        max_connections=500,
        request_body_window_bytes=262144,
        system_route_hosts=("serval.internal",),
    )
    path.write_text("http_options: {max_connections: 0}\napplications: [{import_path: a:b}]\n")
    with pytest.raises(ConfigError, match=r"http_options\.max_connections"):
        load_config(str(path))
