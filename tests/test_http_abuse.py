"""Requests a hostile client (or a page in a browser) might send: without exactly one Host
(400, RFC 9112 3.2), to the system routes under a name that is not the proxy's (DNS
rebinding: 403), smuggling and malformed framing, oversize heads, floods of pipelined
requests. Each one is answered with a 4xx or not at all, never a traceback; the proxy process
stays the same one and a normal client is served throughout. ``/-/metrics`` gathers the
replicas' metrics at most once a second, however many scrape."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import socket
from collections.abc import Iterator

import httpx
import pytest
from starlette.requests import Request

import serval as serve
from conftest import poll
from serval import HTTPOptions
from serval._private.proxy.app import ProxyApp
from test_http_errors import own_cluster
from test_http_limits import NormalClient, proxy_pid


@serve.deployment(max_ongoing_requests=100)
class Echo:
    def __init__(self) -> None:
        self.hits = serve.metrics.Counter("abuse_hits", "Handle calls.")

    async def __call__(self, request: Request) -> str:
        body = await request.body()
        return f"{request.method} {len(body)}"

    def hit(self) -> None:
        self.hits.inc()


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The module's cluster (a later test's own cluster ends it: those come last)."""
    with own_cluster(max_request_header_bytes=8192) as base:
        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        yield base


def send(url: str, payload: bytes, timeout: float = 3) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    received = b""
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):  # (kept open, or reset: what came)
            pass
    return received


def statuses(reply: bytes) -> list[int]:
    """The statuses of the responses in ``reply`` (whose bodies never hold a status line)."""
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]


# -- Host ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_head", "status"),
    [
        (b"GET /echo HTTP/1.1\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n", 400),
        (b"GET /-/healthz HTTP/1.1\r\n\r\n", 400),
        (b"GET /echo HTTP/1.0\r\n\r\n", 200),
        (b"GET /echo HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400),
        (b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", 200),
    ],
)
def test_http_1_1_needs_exactly_one_host(url: str, request_head: bytes, status: int) -> None:
    reply = send(url, request_head)
    assert statuses(reply) == [status], reply
    if status == 400:
        assert b"connection: close" in reply and b"Host" in reply


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.0.0.1:8000", True),
        ("[::1]:8000", True),
        ("localhost", True),
        ("LocalHost:8000", True),
        ("app.localhost", True),
        ("10.1.2.3", True),
        ("evil.example", False),
        ("evil.example:8000", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example", False),
        ("[::1", False),
    ],
)
def test_system_routes_answer_only_the_proxy_s_own_host(url: str, host: str, allowed: bool) -> None:
    for path in ("/-/routes", "/-/metrics"):
        r = httpx.get(f"{url}{path}", headers={"host": host}, timeout=10)
        assert r.status_code == (200 if allowed else 403), (path, host, r.text)
        if not allowed:
            assert "system_route_hosts" in r.text
    # the health check and the applications' routes answer any Host
    assert httpx.get(f"{url}/-/healthz", headers={"host": host}, timeout=10).status_code == 200
    assert httpx.get(f"{url}/echo", headers={"host": host}, timeout=10).text == "GET 0"


# -- malformed, smuggled and abusive requests ------------------------------------------------------

ABUSE = {
    "cl-and-te": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
    "two-lengths": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Content-Length: 30\r\n\r\nabc",
    "te-obfuscated": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
    "negative-length": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "huge-length": b"POST /echo HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 99999999999999999999\r\n\r\n",
    "bad-chunk-size": b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffffff\r\n",
    "nul-in-header": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "space-before-colon": b"GET /echo HTTP/1.1\r\nHost : x\r\n\r\n",
    "lf-only": b"GET /echo HTTP/1.1\nHost: x\n\n",
    "non-ascii-path": b"GET /\xc3\xa9\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "oversize-head": b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
    "many-headers": b"GET /echo HTTP/1.1\r\nHost: x\r\n" + b"X-N: 1\r\n" * 3000 + b"\r\n",
    "upgrade-nowhere": b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
    b"dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    "pipelined-flood": b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n" * 500,
    "absolute-uri": b"GET http://evil.example/-/routes HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    # an absolute-form target without a path (the fuzzer's find: its path is None, a 500)
    "absolute-uri-no-path": b"HEAD http://127.0.0.1E HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
}


def test_abusive_requests_get_4xx_and_the_proxy_serves_on(url: str) -> None:
    pid = proxy_pid()
    with NormalClient(url):
        for name, payload in ABUSE.items():
            reply = send(url, payload)
            got = statuses(reply)
            assert all(s < 500 for s in got), (name, reply[:300])
            assert b"Traceback" not in reply and b'File "' not in reply, name
            if name == "pipelined-flood":
                assert got == [200] * 500
            else:
                assert len(got) == 1 and 400 <= got[0] < 500, (name, reply[:300])
    assert proxy_pid() == pid, "the proxy restarted"


def test_the_proxy_serves_on_under_many_abusers_at_once(url: str) -> None:
    pid = proxy_pid()
    with NormalClient(url), concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda p: send(url, p), list(ABUSE.values()) * 6))
    for reply in replies:
        assert all(s < 500 for s in statuses(reply)), reply[:300]
    assert proxy_pid() == pid


# -- /-/metrics: one gathering for many scrapes -------------------------------------------------


def _hits(text: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("abuse_hits_total")
    )


def test_scrapes_within_a_second_share_the_replicas_snapshot(url: str) -> None:
    handle = serve.get_app_handle("echo")
    handle.hit.remote().result(timeout_s=10)

    def scrape() -> str:
        r = httpx.get(f"{url}/-/metrics", timeout=10)
        assert r.status_code == 200
        return r.text

    poll(lambda: _hits(scrape()) >= 1, timeout=10, what="the first hit in a scrape")
    before = scrape()
    handle.hit.remote().result(timeout_s=10)
    # Right away: the replicas' part is the one gathered a moment ago...
    assert _hits(scrape()) == _hits(before)
    # ... and a second later, a new one.
    poll(lambda: _hits(scrape()) == _hits(before) + 1, timeout=5, what="a fresh gathering")


def test_concurrent_scrapes_make_one_gathering() -> None:
    """The sharing itself, against a stand-in for the controller (pure logic)."""

    class Controller:
        """A stand-in for the cluster client: its loop, and a controller that gathers."""

        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self.loop = loop
            self.gatherings = 0
            self.controller = self

        async def collect_metrics(self, node: str | None = None) -> list[object]:
            self.gatherings += 1
            await asyncio.sleep(0.1)
            return []

    async def scenario() -> list[int]:
        client = Controller(asyncio.get_running_loop())
        app = ProxyApp(client, HTTPOptions())  # type: ignore[arg-type]
        counts = []
        await asyncio.gather(*(app._replica_metrics() for _ in range(50)))
        counts.append(client.gatherings)  # 50 at once: one gathering
        await app._replica_metrics()
        counts.append(client.gatherings)  # fresh: no new one
        await asyncio.sleep(1.05)
        await asyncio.gather(*(app._replica_metrics() for _ in range(5)))
        counts.append(client.gatherings)  # stale: one more
        # a scraper that leaves does not cancel the others' gathering
        await asyncio.sleep(1.05)
        first = asyncio.ensure_future(app._replica_metrics())
        second = asyncio.ensure_future(app._replica_metrics())
        await asyncio.sleep(0.02)
        first.cancel()
        await second
        counts.append(client.gatherings)
        await app.close()
        return counts

    assert asyncio.run(scenario()) == [1, 1, 2, 3]


def test_configured_hosts_and_the_wildcard_are_allowed() -> None:
    with own_cluster(system_route_hosts=["Serval.Internal"]) as base:
        ok = httpx.get(f"{base}/-/routes", headers={"host": "serval.internal:80"}, timeout=10)
        assert ok.status_code == 200
        bad = httpx.get(f"{base}/-/routes", headers={"host": "other.internal"}, timeout=10)
        assert bad.status_code == 403
    with own_cluster(system_route_hosts=["*"]) as base:
        r = httpx.get(f"{base}/-/metrics", headers={"host": "anything.example"}, timeout=10)
        assert r.status_code == 200
