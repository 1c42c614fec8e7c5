"""Many connections at once against the proxy: slowloris (connections trickling their heads),
fd exhaustion (idle connections up to and past the proxy's file descriptor limit), and
concurrent large uploads. A normal client's p50 is measured before and during each flood.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import serval as serve
from chaos.abuse import HOST, start_target, timeouts
from chaos.harness import Cluster, Report, fd_soft_limit, first_lines, memory_kb, ms, scenario
from chaos.rawhttp import HttpConn, exchange, http_p50

# The goal: a normal client's p50 within 2x of its baseline during a flood.
MAX_P50_RATIO = 2.0
# The suite's bound for uploads (the issue asks to state one): the proxy's peak memory grows by
# at most 64 MB over its idle RSS, whatever the number and size of the uploads. Each upload
# holds about one request_body_window_bytes (1 MB by default) in the proxy.
UPLOAD_GROWTH_MB = 64


def _baseline(report: Report, cluster: Cluster, n: int) -> float:
    p50, bad = http_p50(cluster.port, "/", n)
    report.figure("normal client p50, baseline", ms(p50), "ms")
    if bad:
        report.note(f"{bad} of the baseline requests failed")
    return p50


def _during(report: Report, cluster: Cluster, duration_s: float, base: float, what: str) -> None:
    p50, bad = http_p50(cluster.port, "/", 0, duration_s=duration_s)
    report.figure(
        f"normal client p50 during {what}", ms(p50), f"ms ({duration_s:.1f} s of requests)"
    )
    report.at_most(f"p50 during {what} / baseline", p50 / base, MAX_P50_RATIO, "x")
    report.check(f"normal client served during {what}", bad == 0, f"{bad} failed")
    fresh = []
    for _ in range(10):  # new connections must get in too
        try:
            fresh.append(
                exchange(
                    cluster.port, b"GET / HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n", 5.0
                )
            )
        except OSError:
            pass
    served = sum(1 for ex in fresh if ex.statuses == [200])
    report.check(f"new connections served during {what}", served == 10, f"{served}/10")


def _proxy_checks(report: Report, cluster: Cluster, proxy: int | None) -> None:
    report.check(
        "proxy not restarted (pid unchanged)",
        cluster.pid("proxy") == proxy,
        f"{proxy} -> {cluster.pid('proxy')}",
    )
    crashes = cluster.tracebacks("serval::proxy")
    report.figure("tracebacks in the proxy's log", len(crashes))
    if crashes:
        report.note("first proxy traceback:\n" + crashes[0][-1500:])


# -- slowloris ---------------------------------------------------------------------------------


def slowloris(
    connections: int = 4000,
    header_timeout_s: float | None = None,
    trickle_s: float = 1.0,
    samples: int = 500,
    slack_s: float = 3.0,
) -> Report:
    """``connections`` clients each send a request line, then one more byte of a header every
    ``trickle_s``, never finishing their heads. The proxy closes every one within its header
    timeout (plus ``slack_s``), and a normal client's p50 stays within 2x of its baseline."""
    options = timeouts(header_timeout_s, None)
    header_timeout_s = options["request_header_timeout_s"]
    setting = f"{connections:,} connections, header timeout {header_timeout_s:g} s"
    with scenario("slowloris", setting) as report:
        cluster = start_target(**options)
        trickler = None
        try:
            proxy = cluster.pid("proxy")
            base = _baseline(report, cluster, samples)
            trickler = Trickler(cluster.port, connections, trickle_s)
            trickler.start()
            report.figure(
                "trickling connections opened", trickler.opened.wait(60) and trickler.count
            )
            # Measure while they trickle: until shortly before the proxy's timeout closes them.
            measure = max(0.5, trickler.started + header_timeout_s - 0.5 - time.monotonic())
            _during(report, cluster, measure, base, "slowloris")
            deadline = trickler.started + header_timeout_s + slack_s
            while trickler.open_count() and time.monotonic() < deadline:
                time.sleep(0.1)
            still = trickler.open_count()
            closed_at = sorted(trickler.closed_after)
            if closed_at:
                report.figure(
                    "closed by the proxy after", f"{closed_at[0]:.1f}-{closed_at[-1]:.1f} s"
                )
            report.check(
                f"every one closed by the proxy within {header_timeout_s + slack_s:g} s",
                still == 0,
                f"{still} still open",
            )
            _proxy_checks(report, cluster, proxy)
        finally:
            if trickler is not None:
                trickler.stop()
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


class Trickler(threading.Thread):
    """Slowloris clients: one thread, non-blocking sockets, one byte each per ``every`` s."""

    def __init__(self, port: int, count: int, every: float) -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.every = port, count, every
        self.opened = threading.Event()
        self.halt = threading.Event()
        self.socks: dict[socket.socket, float] = {}  # open ones, with when they opened
        self.closed_after: list[float] = []  # seconds from opening to the proxy's close
        self.lock = threading.Lock()
        self.started = time.monotonic()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        self.started = time.monotonic()
        for _ in range(self.count):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.sendall(b"GET / HTTP/1.1\r\n" + HOST + b"X-Slow: ")
            s.setblocking(False)
            with self.lock:
                self.socks[s] = time.monotonic()
            sel.register(s, selectors.EVENT_READ)
        self.opened.set()
        next_drip = time.monotonic()
        while not self.halt.is_set() and self.socks:
            for key, _ in sel.select(timeout=0.05):
                self._readable(sel, key.fileobj)  # type: ignore[arg-type]
            if time.monotonic() >= next_drip:
                next_drip += self.every
                with self.lock:
                    for s in list(self.socks):
                        try:
                            s.send(b"a")
                        except OSError:
                            self._closed(sel, s)
        sel.close()

    def _readable(self, sel: selectors.BaseSelector, s: socket.socket) -> None:
        try:
            data = s.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # a 408 first is fine; the close is what counts
            with self.lock:
                self._closed(sel, s)

    def _closed(self, sel: selectors.BaseSelector, s: socket.socket) -> None:
        opened = self.socks.pop(s, None)
        if opened is not None:
            self.closed_after.append(time.monotonic() - opened)
            sel.unregister(s)
            s.close()

    def open_count(self) -> int:
        with self.lock:
            return len(self.socks)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        with self.lock:
            for s in self.socks:
                s.close()
            self.socks.clear()


# -- fd exhaustion -----------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import json, resource, socket, sys, time
    port, count = int(sys.argv[1]), int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks, failures, started = [], 0, time.monotonic()
    while len(socks) < count and failures < 5:
        s = socket.socket()
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", port))
            socks.append(s)
            failures = 0
        except OSError:
            s.close()
            failures += 1
    print(json.dumps({"opened": len(socks), "took": time.monotonic() - started}), flush=True)
    sys.stdin.readline()
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    print(json.dumps({"closed": closed}), flush=True)
    """
)


# One client address has about 28,000 ephemeral ports towards one port of 127.0.0.1.
REACHABLE_CONNECTIONS = 25_000


def fd_exhaustion(
    samples: int = 500, extra: int = 500, per_holder: int = 15_000, measure_s: float = 5.0
) -> Report:
    """Idle connections (sending nothing) opened from helper processes until ``extra`` more than
    the proxy's file descriptor limit: the proxy sheds idle ones rather than lock everyone out,
    and a normal client's p50 stays within 2x of its baseline. The cluster starts with a soft
    limit of 1024 (a common default); the proxy raises its own to the hard limit. Where that
    is more than one client can connect (a hard limit of 1M in a container), the proxy's
    ``max_connections`` is set to 10,000 and that is what the connections fill."""
    with scenario("fd exhaustion with idle connections") as report:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        options = {}
        if hard + extra > REACHABLE_CONNECTIONS:
            options["max_connections"] = 10_000
            report.note(
                f"fd hard limit {hard:,}: more than one client can open; "
                "max_connections=10,000 instead"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        try:
            cluster = start_target(**options)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        holders: list[subprocess.Popen[str]] = []
        try:
            proxy = cluster.pid("proxy")
            assert proxy is not None
            limit = fd_soft_limit(proxy)
            report.check(
                "the proxy raised its fd soft limit to the hard limit",
                limit == hard,
                f"{min(1024, hard):,} -> {limit:,} (hard {hard:,})",
            )
            base = _baseline(report, cluster, samples)
            target = options.get("max_connections", limit) + extra
            per_holder = min(per_holder, hard - 64)
            started = time.monotonic()
            for start in range(0, target, per_holder):
                count = str(min(per_holder, target - start))
                holders.append(
                    subprocess.Popen(
                        [sys.executable, "-c", HOLDER, str(cluster.port), count],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                )
            opened = sum(_holder_says(h, "opened") for h in holders)
            took = time.monotonic() - started
            report.figure("idle connections opened", opened, f"in {took:.1f} s")
            report.figure("proxy open fds", len(os.listdir(f"/proc/{proxy}/fd")))
            _during(report, cluster, measure_s, base, "fd exhaustion")
            for h in holders:
                assert h.stdin is not None
                h.stdin.write("\n")
                h.stdin.flush()
            closed = sum(_holder_says(h, "closed") for h in holders)
            report.figure("idle connections the proxy closed", closed)
            _proxy_checks(report, cluster, proxy)
        finally:
            for h in holders:
                h.kill()
                h.wait()
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


def _holder_says(holder: subprocess.Popen[str], key: str) -> int:
    assert holder.stdout is not None
    line = holder.stdout.readline()
    return int(json.loads(line)[key]) if line else 0


# -- concurrent large uploads ----------------------------------------------------------------


def upload_deployment() -> Any:
    @serve.deployment(name="Sink", max_ongoing_requests=100)
    class Sink:
        async def __call__(self, request: Any) -> str:
            n = 0
            async for chunk in request.stream():
                n += len(chunk)
            return str(n)

    return Sink


def uploads(count: int = 10, size_mb: int = 90, rounds: int = 1) -> Report:
    """``count`` uploads of ``size_mb`` MB at once (half with Content-Length, half chunked), to a
    deployment that reads the body as a stream: every one arrives whole, and the proxy's peak
    memory (VmHWM) stays within 64 MB of its idle RSS."""
    with scenario("concurrent large uploads", f"{rounds} x {count} x {size_mb} MB") as report:
        cluster = Cluster()
        try:
            serve.run(upload_deployment().bind(), route_prefix="/")
            proxy = cluster.pid("proxy")
            assert proxy is not None
            HttpConn(cluster.port).request("/", "POST", b"warm")
            idle = memory_kb(proxy)
            report.figure("proxy idle RSS", idle["VmRSS"] / 1024, "MB")
            results: list[str] = []
            started = time.monotonic()
            for _ in range(rounds):
                threads = [
                    threading.Thread(
                        target=_upload, args=(cluster.port, size_mb, i % 2 == 1, results)
                    )
                    for i in range(count)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(300)
            took = time.monotonic() - started
            peak = memory_kb(proxy)
            wrong = [r for r in results if r != str(size_mb << 20)]
            report.figure("uploaded", f"{rounds * count * size_mb:,} MB in {took:.1f} s")
            report.check(
                "every upload arrived whole",
                len(results) == rounds * count and not wrong,
                f"{len(results) - len(wrong)}/{rounds * count}",
                first_lines(wrong),
            )
            growth = (peak["VmHWM"] - idle["VmRSS"]) / 1024
            report.figure("proxy peak (VmHWM)", peak["VmHWM"] / 1024, "MB")
            report.at_most("proxy peak over its idle RSS", growth, float(UPLOAD_GROWTH_MB), "MB")
            replica = next(iter(cluster.replicas("Sink").values()), None)
            if replica is not None:
                report.figure("replica peak (VmHWM)", memory_kb(replica)["VmHWM"] / 1024, "MB")
            _proxy_checks(report, cluster, proxy)
        finally:
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


def _upload(port: int, size_mb: int, chunked: bool, results: list[str]) -> None:
    block = os.urandom(1 << 20)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            if chunked:
                s.sendall(b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n")
                for _ in range(size_mb):
                    s.sendall(b"%x\r\n" % len(block) + block + b"\r\n")
                s.sendall(b"0\r\n\r\n")
            else:
                s.sendall(
                    b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % (size_mb << 20)
                )
                for _ in range(size_mb):
                    s.sendall(block)
            r = HttpConn.over(s).read_response()
            results.append(r.text if r.status == 200 else f"HTTP {r.status}: {r.text[:200]}")
    except OSError as exc:
        results.append(f"{type(exc).__name__}: {exc}")


# -- slow readers of large streamed responses --------------------------------------------------


def streaming_deployment() -> Any:
    from starlette.responses import StreamingResponse

    @serve.deployment(name="Source", max_ongoing_requests=100)
    class Source:
        async def __call__(self, request: Any) -> Any:
            mb = int(request.query_params["mb"])

            async def chunks() -> Any:
                block = b"x" * (1 << 20)
                for _ in range(mb):
                    yield block

            return StreamingResponse(chunks())

    return Source


def slow_readers(count: int = 10, size_mb: int = 200, hold_s: float = 5.0) -> Report:
    """``count`` clients ask for a ``size_mb`` MB streamed response and read nothing for
    ``hold_s`` seconds, then all of it: each arrives whole, and the proxy's peak memory stays
    within 64 MB of its idle RSS (the uploads' bound: a client that does not read must hold
    back the stream, not fill the proxy)."""
    with scenario(
        "slow readers of streamed responses", f"{count} x {size_mb} MB, {hold_s:g} s unread"
    ) as report:
        cluster = Cluster()
        socks: list[socket.socket] = []
        try:
            serve.run(streaming_deployment().bind(), route_prefix="/")
            proxy = cluster.pid("proxy")
            replica = next(iter(cluster.replicas("Source").values()), None)
            assert proxy is not None and replica is not None
            idle = memory_kb(proxy)["VmRSS"]
            report.figure("proxy idle RSS", idle / 1024, "MB")
            request = f"GET /?mb={size_mb} HTTP/1.1\r\n".encode() + HOST + b"\r\n"
            for _ in range(count):
                s = socket.create_connection(("127.0.0.1", cluster.port), timeout=60)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
                s.sendall(request)
                socks.append(s)
            time.sleep(hold_s)  # the point of the scenario: nobody reads meanwhile
            held = memory_kb(proxy)
            report.figure("proxy RSS while nobody reads", held["VmRSS"] / 1024, "MB")
            report.figure(
                "replica RSS while nobody reads", memory_kb(replica)["VmRSS"] / 1024, "MB"
            )
            results: list[str] = []
            readers = [
                threading.Thread(target=_drain, args=(s, size_mb << 20, results)) for s in socks
            ]
            for t in readers:
                t.start()
            for t in readers:
                t.join(120)
            wrong = [r for r in results if r != "whole"]
            report.check(
                "every response arrived whole",
                len(results) == count and not wrong,
                f"{len(results) - len(wrong)}/{count}",
                first_lines(wrong),
            )
            peak = memory_kb(proxy)["VmHWM"]
            report.figure("proxy peak (VmHWM)", peak / 1024, "MB")
            report.at_most(
                "proxy peak over its idle RSS", (peak - idle) / 1024, float(UPLOAD_GROWTH_MB), "MB"
            )
            _proxy_checks(report, cluster, proxy)
        finally:
            for s in socks:
                s.close()
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


def _drain(sock: socket.socket, size: int, results: list[str]) -> None:
    try:
        r = HttpConn.over(sock).read_response()
        whole = r.status == 200 and len(r.body) == size
        results.append("whole" if whole else f"HTTP {r.status}, {len(r.body):,} of {size:,} bytes")
    except OSError as exc:
        results.append(f"{type(exc).__name__}: {exc}")
