"""Malformed and hostile HTTP requests against the proxy, one at a time on fresh connections:
broken request lines and headers, request smuggling, oversize heads and bodies, half-sent
requests, and a hypothesis fuzzer of raw request bytes.

What must hold for every one: the proxy does not crash (its pid never changes), answers no
unexpected 5xx, answers every malformed request with a 4xx or closes the connection, and never
serves a request smuggled inside another's body. Cases the RFC lets a server either reject or
read leniently say so (``expect``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Any

import serval as serve
from chaos.harness import Cluster, Report, first_lines, memory_kb, ms, scenario, wait_for
from chaos.rawhttp import Exchange, HttpConn, exchange, http_p50
from serval.config import HTTPOptions

SMUGGLED = "SMUGGLED-REQUEST-WAS-SERVED"
HOST = b"Host: 127.0.0.1\r\n"


def target_deployment() -> Any:
    """What the proxy forwards to: a short text reply, the marker for the smuggled path, the
    folded header's value for /fold."""

    @serve.deployment(name="Target", max_ongoing_requests=1000)
    class Target:
        async def __call__(self, request: Any) -> str:
            path = request.url.path
            if "smuggled" in path:
                return SMUGGLED
            if path == "/fold":
                return request.headers.get("x-fold", "")
            if "n" in request.query_params:  # pipelining: which request this answers
                return "n=" + request.query_params["n"]
            body = await request.body()
            return f"ok {len(body)}"

    return Target


def start_target(**http_options: Any) -> Cluster:
    cluster = Cluster(**http_options)
    serve.run(target_deployment().bind(), route_prefix="/")
    conn = HttpConn(cluster.port)
    try:
        assert conn.request("/").status == 200
    finally:
        conn.close()
    return cluster


# -- the cases --------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    data: bytes
    # "reject": a 4xx, or a close with no response; "reject-or-close": that, or one response
    # and then a close (RFC 9112 §6.1: with both Content-Length and Transfer-Encoding a server
    # may read the body by the latter and must then close); "fold": reject, or read the
    # obs-fold as a space (§5.2); "lenient": any answer but a 5xx, or a close (§2.2 lets a
    # server take a bare LF as a line end); a number: exactly that status.
    expect: str | int = "reject"
    allow: tuple[int, ...] = ()  # statuses >= 500 that are right here (505 for HTTP/9.9)
    piece: int = 0  # send in pieces of this size, stopping once answered


def _post(headers: bytes, body: bytes) -> bytes:
    return b"POST / HTTP/1.1\r\n" + HOST + headers + b"\r\n" + body


SMUGGLE = b"GET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"
CHUNKED_SMUGGLE = b"%x\r\n" % len(SMUGGLE) + SMUGGLE + b"\r\n0\r\n\r\n"


def malformed_cases() -> list[Case]:
    req = b"GET / HTTP/1.1\r\n" + HOST
    cases = [
        Case("garbage request line", b"GARBAGE\r\n\r\n"),
        Case("method only", b"GET\r\n\r\n"),
        Case("HTTP/0.9 request line", b"GET /\r\n\r\n"),
        Case("extra word in request line", b"GET / HTTP/1.1 extra\r\n" + HOST + b"\r\n"),
        Case("unknown HTTP version", b"GET / HTTP/9.9\r\n" + HOST + b"\r\n", allow=(505,)),
        Case("NUL in method", b"GE\x00T / HTTP/1.1\r\n" + HOST + b"\r\n"),
        Case("NUL in target", b"GET /a\x00b HTTP/1.1\r\n" + HOST + b"\r\n"),
        Case("space in target", b"GET /a b HTTP/1.1\r\n" + HOST + b"\r\n"),
        Case("no Host (HTTP/1.1)", b"GET / HTTP/1.1\r\n\r\n"),
        Case("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        # A page in a browser can reach 127.0.0.1 under a name of its own (DNS rebinding).
        Case(
            "/-/routes for a foreign Host",
            b"GET /-/routes HTTP/1.1\r\nHost: rebind.example\r\n\r\n",
        ),
        Case(
            "/-/metrics for a foreign Host",
            b"GET /-/metrics HTTP/1.1\r\nHost: rebind.example\r\n\r\n",
        ),
        Case(
            "TLS hello on the plain port",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(64)),
        ),
        Case("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", allow=(505,)),
        Case(
            "1 MB request target",
            b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\n" + HOST + b"\r\n",
            piece=1 << 16,
        ),
        Case("100 kB method", b"A" * 100_000 + b" / HTTP/1.1\r\n" + HOST + b"\r\n", piece=1 << 16),
        Case("header without a colon", req + b"NoColon\r\n\r\n"),
        Case("space before the colon", b"GET / HTTP/1.1\r\nHost : 127.0.0.1\r\n\r\n"),
        Case("bad character in a header name", req + b"Bad(Name: v\r\n\r\n"),
        Case("NUL in a header value", req + b"X-A: a\x00b\r\n\r\n"),
        Case("bare CR in a header value", req + b"X-A: a\rb\r\n\r\n"),
        Case("whitespace before the first header", b"GET / HTTP/1.1\r\n " + HOST + b"\r\n"),
        Case("Content-Length: -1", _post(b"Content-Length: -1\r\n", b"")),
        Case("Content-Length: abc", _post(b"Content-Length: abc\r\n", b"")),
        Case("Content-Length: 1.5", _post(b"Content-Length: 1.5\r\n", b"x")),
        Case("Content-Length: +5", _post(b"Content-Length: +5\r\n", b"hello")),
        Case("Content-Length: 5, 6", _post(b"Content-Length: 5, 6\r\n", b"hello!")),
        Case("Content-Length: 2^77", _post(b"Content-Length: 99999999999999999999999\r\n", b"")),
        Case(
            "bad chunk size", _post(b"Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n")
        ),
        Case(
            "chunk size overflow",
            _post(b"Transfer-Encoding: chunked\r\n", b"f" * 24 + b"\r\nx\r\n"),
        ),
        Case(
            "Transfer-Encoding: gzip", _post(b"Transfer-Encoding: gzip\r\n", b"abc"), allow=(501,)
        ),
        Case(
            "Transfer-Encoding: chunked, gzip",
            _post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"),
            allow=(501,),
        ),
        Case("bare LF line ends", b"GET / HTTP/1.1\nHost: 127.0.0.1\n\n", expect="lenient"),
        Case(
            "obs-fold in a header",
            b"GET /fold HTTP/1.1\r\n" + HOST + b"X-Fold: a\r\n b\r\n\r\n",
            expect="fold",
        ),
    ]
    return cases + smuggling_cases() + oversize_cases()


def smuggling_cases() -> list[Case]:
    cl_te_body = b"0\r\n\r\n" + SMUGGLE
    return [
        Case(
            "CL.TE",
            _post(
                b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(cl_te_body),
                cl_te_body,
            ),
            expect="reject-or-close",
        ),
        Case(
            "TE.CL",
            _post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", CHUNKED_SMUGGLE),
            expect="reject-or-close",
        ),
        Case(
            "duplicate Content-Length",
            _post(b"Content-Length: 0\r\nContent-Length: %d\r\n" % len(SMUGGLE), SMUGGLE),
        ),
        Case(
            "Transfer-Encoding: xchunked + CL",
            _post(
                b"Transfer-Encoding: xchunked\r\nContent-Length: %d\r\n" % len(cl_te_body),
                cl_te_body,
            ),
            allow=(501,),
        ),
        Case(
            "space before the colon of Transfer-Encoding",
            _post(
                b"Transfer-Encoding : chunked\r\nContent-Length: %d\r\n" % len(cl_te_body),
                cl_te_body,
            ),
            expect="reject-or-close",
        ),
        Case(
            "two Transfer-Encodings",
            _post(
                b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", CHUNKED_SMUGGLE
            ),
            allow=(501,),
        ),
        Case(
            "obs-folded Transfer-Encoding + CL",
            _post(
                b"Transfer-Encoding:\r\n chunked\r\nContent-Length: %d\r\n" % len(cl_te_body),
                cl_te_body,
            ),
            expect="reject-or-close",
        ),
        Case(
            "bare LF in the chunked framing",
            _post(b"Transfer-Encoding: chunked\r\n", b"0\n\n" + SMUGGLE),
            expect="reject-or-close",
        ),
        Case(
            "bare LF between Content-Length and Transfer-Encoding",
            b"POST / HTTP/1.1\r\n"
            + HOST
            + b"Content-Length: %d\nTransfer-Encoding: chunked\r\n\r\n" % len(cl_te_body)
            + cl_te_body,
            expect="reject-or-close",
        ),
    ]


def oversize_cases() -> list[Case]:
    return [
        Case(
            "1 MB header",
            b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
            expect=431,
            piece=1 << 16,
        ),
        Case(
            "20,000 headers",
            b"GET / HTTP/1.1\r\n" + HOST + b"X-A: b\r\n" * 20_000 + b"\r\n",
            expect=431,
            piece=1 << 16,
        ),
        Case(
            "Content-Length: 200 MB, no body sent",
            _post(b"Content-Length: %d\r\n" % (200 << 20), b""),
            expect=413,
        ),
        Case(  # the 413 comes first: no 100 Continue inviting 200 MB the proxy will refuse
            "Expect: 100-continue with Content-Length: 200 MB",
            _post(b"Expect: 100-continue\r\nContent-Length: %d\r\n" % (200 << 20), b""),
            expect=413,
        ),
    ]


def judge(case: Case, ex: Exchange) -> str:
    """Why the outcome is wrong ('' when it is right)."""
    if any(SMUGGLED.encode() in r.body for r in ex.responses) or SMUGGLED.encode() in ex.leftover:
        return f"served the smuggled request ({ex.summary()})"
    wrong = [s for s in ex.statuses if s >= 500 and s not in case.allow]
    if wrong:
        return f"answered {wrong[0]} ({ex.summary()})"
    first = ex.statuses[0] if ex.statuses else None
    rejected = (first is not None and (400 <= first < 500 or first in case.allow)) or (
        first is None and ex.closed
    )
    if isinstance(case.expect, int):
        ok = first == case.expect
    elif case.expect == "reject":
        ok = rejected
    elif case.expect == "reject-or-close":
        ok = rejected or (len(ex.responses) == 1 and ex.closed)
    elif case.expect == "fold":
        folded = first == 200 and ex.responses[0].body.strip() in (b"a b", b"a  b")
        ok = rejected or folded
    else:  # lenient
        ok = first is not None or ex.closed
    return "" if ok else f"expected {case.expect}: got {ex.summary()}"


def malformed(cases: list[Case] | None = None, parallel: int = 8, timeout_s: float = 3.0) -> Report:
    """Every case on a fresh connection, ``parallel`` at a time."""
    cases = malformed_cases() if cases is None else cases
    with scenario("malformed, smuggled and oversize requests", f"{len(cases)} cases") as report:
        cluster = start_target()
        try:
            proxy = cluster.pid("proxy")
            results: dict[str, tuple[Exchange, str]] = {}

            def run(case: Case) -> None:
                ex = exchange(
                    cluster.port,
                    case.data,
                    timeout=timeout_s,
                    piece=case.piece,
                    stop_when_answered=bool(case.piece),
                )
                results[case.name] = (ex, judge(case, ex))

            with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
                list(pool.map(run, cases))
            wrong = [f"{name}: {why}" for name, (_, why) in results.items() if why]
            for name, (ex, why) in results.items():
                report.figure(
                    name, ("WRONG " if why else "") + ex.summary() + f" in {ms(ex.elapsed):.0f} ms"
                )
            report.check(
                "every case answered as it should",
                not wrong,
                f"{len(cases) - len(wrong)}/{len(cases)}",
                first_lines(wrong, 40),
            )
            _proxy_checks(report, cluster, proxy)
        finally:
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


def _proxy_checks(report: Report, cluster: Cluster, proxy: int | None) -> None:
    """The proxy still is the same process and still serves."""
    report.check(
        "proxy not restarted (pid unchanged)",
        cluster.pid("proxy") == proxy,
        f"{proxy} -> {cluster.pid('proxy')}",
    )
    conn = HttpConn(cluster.port, timeout=5)
    try:
        status = conn.request("/").status
    except OSError as exc:
        status = f"{type(exc).__name__}: {exc}"  # type: ignore[assignment]
    finally:
        conn.close()
    report.check("proxy serves afterwards", status == 200, status)
    crashes = cluster.tracebacks("serval::proxy")
    report.figure("tracebacks in the proxy's log", len(crashes))
    if crashes:
        report.note("first proxy traceback:\n" + crashes[0][-1500:])


# -- pipelining ---------------------------------------------------------------------------------


def pipelined(requests: int = 20_000, timeout_s: float = 60.0) -> Report:
    """``requests`` GETs written at once on one connection: every one answered, in order,
    while the proxy's memory stays about where it was (it reads no further ahead than it
    answers)."""
    with scenario("pipelined requests", f"{requests:,} in one write") as report:
        cluster = start_target()
        try:
            proxy = cluster.pid("proxy")
            assert proxy is not None
            idle = memory_kb(proxy)["VmRSS"]
            data = b"".join(
                b"GET /?n=%d HTTP/1.1\r\n" % i + HOST + b"\r\n" for i in range(requests)
            )
            started = time.monotonic()
            conn = HttpConn(cluster.port, timeout=timeout_s)
            statuses: collections.Counter[int] = collections.Counter()
            disorder: list[str] = []
            try:
                sender = threading.Thread(target=conn.connect().sendall, args=(data,), daemon=True)
                sender.start()
                for i in range(requests):
                    r = conn.read_response()
                    statuses[r.status] += 1
                    if r.status == 200 and r.text != f"n={i}":
                        disorder.append(f"answer {i} was {r.text[:40]!r}")
                sender.join(timeout_s)
            except OSError as exc:
                report.note(f"the connection failed after {sum(statuses.values())}: {exc}")
            finally:
                conn.close()
            took = time.monotonic() - started
            peak = memory_kb(proxy)["VmHWM"]
            answered = statuses[200]
            report.figure("answered", f"{answered:,} in {took:.1f} s ({answered / took:,.0f}/s)")
            report.figure("proxy RSS idle, peak", f"{idle / 1024:.0f} MB, {peak / 1024:.0f} MB")
            report.check(
                "every pipelined request answered with a 200",
                answered == requests,
                f"{answered:,}/{requests:,}",
                str(dict(statuses)),
            )
            report.check("answered in order", not disorder, len(disorder), first_lines(disorder))
            _proxy_checks(report, cluster, proxy)
        finally:
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


# -- half-sent requests ---------------------------------------------------------------------------


def timeouts(header_s: float | None, body_s: float | None) -> dict[str, float]:
    """The proxy's header and body timeouts: the given ones, else its defaults."""
    defaults = HTTPOptions()
    return {
        "request_header_timeout_s": defaults.request_header_timeout_s
        if header_s is None
        else header_s,
        "request_body_timeout_s": defaults.request_body_timeout_s if body_s is None else body_s,
    }


def half_sent(
    header_timeout_s: float | None = None, body_timeout_s: float | None = None, slack_s: float = 3.0
) -> Report:
    """Requests that stop half-way and wait: the proxy closes each (with a 408 or silently)
    within its header or body timeout (its defaults unless given), plus ``slack_s``, and serves
    others meanwhile."""
    options = timeouts(header_timeout_s, body_timeout_s)
    header_timeout_s = options["request_header_timeout_s"]
    body_timeout_s = options["request_body_timeout_s"]
    setting = f"header timeout {header_timeout_s:g} s, body {body_timeout_s:g} s"
    with scenario("half-sent requests", setting) as report:
        cluster = start_target(**options)
        try:
            proxy = cluster.pid("proxy")
            head_wait = header_timeout_s + slack_s
            body_wait = body_timeout_s + slack_s
            cases = [
                ("request line only", b"GET / HTTP/1.1\r\n", head_wait),
                ("head without its end", b"GET / HTTP/1.1\r\n" + HOST + b"X-A: b\r\n", head_wait),
                ("10 of 1000 body bytes", _post(b"Content-Length: 1000\r\n", b"x" * 10), body_wait),
                (
                    "chunked body cut in a chunk",
                    _post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhel"),
                    body_wait,
                ),
                (
                    "chunked body without its last chunk",
                    _post(b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n"),
                    body_wait,
                ),
            ]
            with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
                futures = {
                    name: (pool.submit(exchange, cluster.port, data, wait), wait)
                    for name, data, wait in cases
                }
                p50, bad = http_p50(cluster.port, "/", 200)
                done = {name: (f.result(), wait) for name, (f, wait) in futures.items()}
            report.figure("p50 of a normal client meanwhile", ms(p50), "ms")
            wrong = []
            for name, (ex, wait) in done.items():
                report.figure(name, f"{ex.summary()} after {ex.elapsed:.1f} s")
                bad_status = [s for s in ex.statuses if s not in (408, 400)]
                if not ex.closed or bad_status:
                    wrong.append(
                        f"{name}: {ex.summary()} after {ex.elapsed:.1f} s (waited {wait:g} s)"
                    )
            report.check(
                "each closed by the proxy in time (408 or silently)",
                not wrong,
                f"{len(done) - len(wrong)}/{len(done)}",
                first_lines(wrong),
            )
            report.check("the normal client served meanwhile", bad == 0, f"{bad} failed")
            _proxy_checks(report, cluster, proxy)
        finally:
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


# -- the fuzzer -------------------------------------------------------------------------------


def fuzz(examples: int = 10_000, derandomize: bool = False) -> Report:
    """Raw request bytes from hypothesis (request-shaped, mutated, or plain random), each on a
    fresh connection, half-closed after sending: no 5xx, no crash, the proxy keeps serving.
    ``derandomize``: the same examples every run (the short form), else new ones each time."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    setting = f"{examples:,} examples, " + ("the same each run" if derandomize else "new ones")
    with scenario("fuzzed raw requests", setting) as report:
        cluster = start_target()
        try:
            proxy = cluster.pid("proxy")
            outcomes: collections.Counter[str] = collections.Counter()
            bad: dict[str, bytes] = {}
            slowest = [0.0]
            sent = [0]

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                derandomize=derandomize,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.generate],
            )
            @given(raw_request(st))
            def one(data: bytes) -> None:
                ex = exchange(cluster.port, data, timeout=5.0, shut_wr=True)
                sent[0] += 1
                slowest[0] = max(slowest[0], ex.elapsed)
                key = ",".join(map(str, ex.statuses)) or ("closed" if ex.closed else "no answer")
                outcomes[key] += 1
                problem = ""
                if any(s >= 500 and s != 505 for s in ex.statuses):
                    problem = f"{ex.statuses}"
                elif ex.timed_out:
                    problem = "neither answered nor closed in 5 s after a half-close"
                if problem and (problem not in bad or len(data) < len(bad[problem])):
                    bad[problem] = data  # the shortest input for each kind of problem
                if sent[0] % 500 == 0:
                    wait_for(lambda: cluster.pid("proxy") is not None, 5, "the proxy")

            started = time.monotonic()
            one()
            took = time.monotonic() - started
            report.figure("requests sent", sent[0], f"in {took:.1f} s")
            report.figure("outcomes", ", ".join(f"{k}: {v}" for k, v in outcomes.most_common(12)))
            report.figure("slowest exchange", ms(slowest[0]), "ms")
            report.check(
                "0 unexpected 5xx, every one answered or closed",
                not bad,
                len(bad),
                first_lines(f"{p}: {d[:300]!r}" for p, d in bad.items()),
            )
            _proxy_checks(report, cluster, proxy)
        finally:
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


def raw_request(st: Any) -> Any:
    """Well-formed requests of many shapes; the same with one part replaced by random bytes;
    the same with a few bytes overwritten anywhere; and plain random bytes."""
    method = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"PATCH"])
    target = st.sampled_from(
        [
            b"/",
            b"/x?a=1&b=%20",
            b"/-/healthz",
            b"/-/routes",
            b"/-/metrics",
            b"*",
            b"/%00",
            b"http://127.0.0.1/",
            b"/../..",
            b"//",
            b"/smuggled",
            b"/fold",
            b"/" + b"a" * 3000,
        ]
    )
    version = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"])
    field = st.sampled_from(
        [
            b"Content-Length: 5",
            b"Content-Length: 0",
            b"Transfer-Encoding: chunked",
            b"Connection: close",
            b"Connection: keep-alive",
            b"Expect: 100-continue",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Version: 13",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Content-Type: application/json",
            b"serve_multiplexed_model_id: m1",
            b"X-Fold: a",
            b" folded",
            b"Host: other.example",
            b"Accept-Encoding: gzip",
            b"Cookie: a=b",
        ]
    )
    fields = st.lists(field, max_size=3).map(lambda fs: b"".join(f + b"\r\n" for f in fs))
    body = st.sampled_from(
        [b"", b"hello", b"0\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n", b"{}", b"x" * 70_000]
    )
    parts = st.tuples(method, target, version, st.just(HOST), fields, body)

    def assemble(p: tuple[bytes, ...]) -> bytes:
        return p[0] + b" " + p[1] + b" " + p[2] + b"\r\n" + p[3] + p[4] + b"\r\n" + p[5]

    well_formed = parts.map(assemble)
    one_part_bad = st.tuples(parts, st.integers(0, 5), st.binary(max_size=16)).map(
        lambda t: assemble((*t[0][: t[1]], t[2], *t[0][t[1] + 1 :]))
    )
    overwritten = st.tuples(
        well_formed, st.integers(0, 120), st.binary(min_size=1, max_size=4)
    ).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :])
    return well_formed | well_formed | one_part_bad | overwritten | st.binary(max_size=200)
