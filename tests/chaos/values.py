"""Values and exceptions user code should not be able to break serval with, through handles and
through HTTP: exceptions whose __str__/__repr__ raise, unpicklable or unloadable arguments,
returns, exceptions and stream items, huge and deeply nested values, SystemExit and
KeyboardInterrupt from def and async def, generators that fail mid-way, replies HTTP cannot
carry. Every call must be answered (a clear error naming the value or its type), repeatedly
(more times than max_ongoing_requests, so a slot that is never given back shows), and the
replica keeps serving: a good call afterwards succeeds on the same replica process.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import serval as serve
from chaos.harness import Cluster, Report, first_lines, ms, scenario
from chaos.rawhttp import HttpConn, exchange

MAX_ONGOING = 2  # each case runs MAX_ONGOING + 1 times: a leaked slot would stop the next call


def _refuse_to_load() -> None:
    raise ValueError("this value refuses to load")


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def bad_deployment() -> tuple[Any, dict[str, type]]:
    """The deployment, and the exception and value classes the cases use (defined here, so they
    travel by value)."""

    class BadStr(Exception):
        def __str__(self) -> str:
            raise RuntimeError("__str__ raised")

    class BadEverything(Exception):
        def __str__(self) -> str:
            raise RuntimeError("__str__ raised")

        def __repr__(self) -> str:
            raise RuntimeError("__repr__ raised")

    class StrNotStr(Exception):
        def __str__(self) -> Any:
            return 42

    class UnpicklableError(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()

    class TwoArgError(Exception):  # pickles, but unpickling calls TwoArgError(message): fails
        def __init__(self, message: str, code: int) -> None:
            super().__init__(message)
            self.code = code

    class ReduceRaisesSystemExit:
        def __reduce__(self) -> Any:
            raise SystemExit("__reduce__ raised SystemExit")

    class Unloadable:
        def __reduce__(self) -> Any:
            return (_refuse_to_load, ())

    @serve.deployment(name="Bad", max_ongoing_requests=MAX_ONGOING)
    class Bad:
        def ok(self) -> int:
            return os.getpid()

        async def aok(self) -> int:
            return os.getpid()

        def echo_len(self, value: Any) -> int:
            return len(value)

        def make_bytes(self, n: int) -> bytes:
            return b"x" * n

        def raise_(self, kind: str) -> None:
            raise _make(kind)

        async def araise(self, kind: str) -> None:
            raise _make(kind)

        def give(self, kind: str) -> Any:
            return _give(kind)

        def gen(self, kind: str) -> Any:
            yield 0
            yield 1
            yield _give(kind) if kind in ("lock",) else 2
            raise _make(kind)

        async def agen(self, kind: str) -> Any:
            yield 0
            yield 1
            yield _give(kind) if kind in ("lock",) else 2
            raise _make(kind)

    def _make(kind: str) -> BaseException:
        return {
            "bad-str": lambda: BadStr("x"),
            "bad-everything": lambda: BadEverything("x"),
            "str-not-str": lambda: StrNotStr("x"),
            "unpicklable": lambda: UnpicklableError("holds a lock"),
            "two-arg": lambda: TwoArgError("needs two arguments", 7),
            "cause-is-itself": _self_cause,
            "system-exit": lambda: SystemExit("user code called exit"),
            "keyboard-interrupt": lambda: KeyboardInterrupt("user code was interrupted"),
            "lock": lambda: ValueError("after the lock"),
            "value-error": lambda: ValueError("failed mid-way"),
        }[kind]()

    def _self_cause() -> BaseException:
        exc = ValueError("my cause is myself")
        exc.__cause__ = exc
        return exc

    def _give(kind: str) -> Any:
        return {
            "lock": threading.Lock,
            "object": object,
            "reduce-raises-system-exit": ReduceRaisesSystemExit,
            "unloadable": Unloadable,
            "nested": lambda: _nested(100_000),
        }[kind]()

    classes = {c.__name__: c for c in (ReduceRaisesSystemExit, Unloadable)}
    return Bad, classes


def describe(exc: BaseException) -> str:
    """Type name and message of an exception, even one whose __str__ raises."""
    try:
        text = str(exc)
        if not isinstance(text, str):
            raise TypeError
    except Exception:
        text = "<__str__ failed>"
    return f"{type(exc).__name__}: {text}"[:400]


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None
    items: list[Any] | None = None
    took: float = 0.0
    answered: bool = True


# -- through handles ------------------------------------------------------------------------------


def _call(fn: Callable[[], Any]) -> Outcome:
    t0 = time.monotonic()
    try:
        value = fn()
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: they are outcomes
        if type(exc).__name__ == "GetTimeoutError":
            return Outcome(error=exc, took=time.monotonic() - t0, answered=False)
        return Outcome(error=exc, took=time.monotonic() - t0)
    return Outcome(value=value, took=time.monotonic() - t0)


def _stream(gen: Any, timeout_s: float) -> Outcome:
    items: list[Any] = []
    t0 = time.monotonic()
    box: list[Outcome] = []

    def consume() -> None:
        try:
            for item in gen:
                items.append(item)
        except BaseException as exc:
            box.append(Outcome(error=exc, items=items))
            return
        box.append(Outcome(items=items))

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout_s)
    if not box:
        return Outcome(items=items, took=time.monotonic() - t0, answered=False)
    box[0].took = time.monotonic() - t0
    return box[0]


def _raised(*names: str) -> Callable[[Outcome], str]:
    """The call raised, and its type or message names one of ``names``."""

    def check(o: Outcome) -> str:
        if o.error is None:
            return f"no error: returned {o.value!r:.100}"
        text = describe(o.error)
        cause = o.error.__cause__
        if cause is not None and cause is not o.error:
            text += " / " + describe(cause)
        if not any(n.lower() in text.lower() for n in names):
            return f"{text} (does not name {' or '.join(names)})"
        return ""

    return check


def _streamed(n: int, *names: str) -> Callable[[Outcome], str]:
    """``n`` items arrived, then an error naming one of ``names``."""

    def check(o: Outcome) -> str:
        got = len(o.items or [])
        if got != n:
            error = describe(o.error) if o.error else None
            return f"{got} items before the end (expected {n}); error {error}"
        return _raised(*names)(o)

    return check


def _returned(pred: Callable[[Any], bool], what: str) -> Callable[[Outcome], str]:
    def check(o: Outcome) -> str:
        if o.error is not None:
            return f"raised {describe(o.error)}"
        return "" if pred(o.value) else f"returned {o.value!r:.100}, expected {what}"

    return check


def handle_cases(
    h: Any, classes: dict[str, type], huge_mb: int, timeout_s: float
) -> list[tuple[str, Callable[[], Outcome], Callable[[Outcome], str]]]:
    def res(response: Any) -> Callable[[], Outcome]:
        return lambda: _call(lambda: response().result(timeout_s=timeout_s))

    huge = b"x" * (huge_mb << 20)
    cases = []
    for method in ("raise_", "araise"):
        m = getattr(h, method)
        where = "def" if method == "raise_" else "async def"
        cases += [
            (
                f"{where}: exception whose __str__ raises",
                res(lambda m=m: m.remote("bad-str")),
                _raised("BadStr"),
            ),
            (
                f"{where}: exception whose __str__ and __repr__ raise",
                res(lambda m=m: m.remote("bad-everything")),
                _raised("BadEverything"),
            ),
            (
                f"{where}: exception whose __str__ returns an int",
                res(lambda m=m: m.remote("str-not-str")),
                _raised("StrNotStr"),
            ),
            (
                f"{where}: exception holding a lock",
                res(lambda m=m: m.remote("unpicklable")),
                _raised("UnpicklableError"),
            ),
            (
                f"{where}: exception that does not unpickle",
                res(lambda m=m: m.remote("two-arg")),
                _raised("TwoArgError"),
            ),
            (
                f"{where}: exception that is its own cause",
                res(lambda m=m: m.remote("cause-is-itself")),
                _raised("my cause is myself"),
            ),
            (
                f"{where}: SystemExit",
                res(lambda m=m: m.remote("system-exit")),
                _raised("SystemExit"),
            ),
            (
                f"{where}: KeyboardInterrupt",
                res(lambda m=m: m.remote("keyboard-interrupt")),
                _raised("KeyboardInterrupt"),
            ),
        ]
    cases += [
        ("return a lock", res(lambda: h.give.remote("lock")), _raised("lock")),
        (
            "return object()",
            res(lambda: h.give.remote("object")),
            _returned(lambda v: type(v) is object, "an object()"),
        ),
        (
            "return a value whose __reduce__ raises SystemExit",
            res(lambda: h.give.remote("reduce-raises-system-exit")),
            _raised("ReduceRaisesSystemExit", "SystemExit"),
        ),
        (
            "return a value that does not unpickle",
            res(lambda: h.give.remote("unloadable")),
            _raised("refuses to load", "Unloadable"),
        ),
        (
            "return a list nested 100,000 deep",
            res(lambda: h.give.remote("nested")),
            _raised("recursion", "list"),
        ),
        ("argument: a lock", res(lambda: h.echo_len.remote(threading.Lock())), _raised("lock")),
        (
            "argument whose __reduce__ raises SystemExit",
            res(lambda: h.echo_len.remote(classes["ReduceRaisesSystemExit"]())),
            _raised("ReduceRaisesSystemExit", "SystemExit"),
        ),
        (
            "argument that does not unpickle in the replica",
            res(lambda: h.echo_len.remote(classes["Unloadable"]())),
            _raised("refuses to load", "Unloadable"),
        ),
        (
            "argument: a list nested 100,000 deep",
            res(lambda: h.echo_len.remote(_nested(100_000))),
            _raised("recursion", "list"),
        ),
        (
            f"argument of {huge_mb} MB",
            res(lambda: h.echo_len.remote(huge)),
            _returned(lambda v: v == len(huge), f"{len(huge)}"),
        ),
        (
            f"return of {huge_mb} MB",
            res(lambda: h.make_bytes.remote(len(huge))),
            _returned(lambda v: len(v) == len(huge), f"{len(huge)} bytes"),
        ),
    ]
    for method in ("gen", "agen"):
        where = "generator" if method == "gen" else "async generator"

        def stream(kind: str, method: str = method) -> Callable[[], Outcome]:
            return lambda: _stream(getattr(h.options(stream=True), method).remote(kind), timeout_s)

        cases += [
            (f"{where} raising mid-way", stream("value-error"), _streamed(3, "failed mid-way")),
            (f"{where} yielding a lock mid-way", stream("lock"), _streamed(2, "lock")),
            (
                f"{where} raising an exception whose __str__ raises",
                stream("bad-str"),
                _streamed(3, "BadStr"),
            ),
            (
                f"{where} raising SystemExit mid-way",
                stream("system-exit"),
                _streamed(3, "SystemExit"),
            ),
        ]
    return cases


def through_handles(
    huge_mb: int = 256, timeout_s: float = 5.0, repeat: int = MAX_ONGOING + 1
) -> Report:
    with scenario(
        "bad values through handles",
        f"each case {repeat} times, max_ongoing_requests={MAX_ONGOING}",
    ) as report:
        cluster = Cluster()
        try:
            Bad, classes = bad_deployment()
            app = [0]

            def deploy() -> tuple[Any, int]:
                app[0] += 1
                h = serve.run(Bad.bind(), name=f"bad{app[0]}", route_prefix=None)
                return h, h.ok.remote().result(timeout_s=timeout_s)

            h, pid = deploy()
            wrong: list[str] = []
            for name, run, check in handle_cases(h, classes, huge_mb, timeout_s):
                why, took = "", 0.0
                for _ in range(repeat):
                    outcome = run()
                    took = max(took, outcome.took)
                    why = "not answered" if not outcome.answered else check(outcome)
                    if why:
                        break
                after = _call(lambda h=h: h.ok.remote().result(timeout_s=timeout_s))
                if after.error is not None:
                    why += f"; then a good call failed: {describe(after.error)}"
                elif after.value != pid:
                    why += f"; then the replica was another process ({pid} -> {after.value})"
                report.figure(name, ("WRONG " + why[:150]) if why else f"ok in {ms(took):.0f} ms")
                if why:
                    wrong.append(f"{name}: {why}")
                if after.error is not None or after.value != pid:
                    try:  # a wedged or dead one would fail every case after it
                        h, pid = deploy()
                    except Exception as exc:
                        wrong.append(
                            f"after {name!r} this process's calls go unanswered, to a new "
                            f"deployment too ({describe(exc)}): the cases after it were not run"
                        )
                        break
            report.check(
                "every call answered as it should, replica kept serving",
                not wrong,
                f"{len(wrong)} wrong",
                first_lines(wrong, 40),
            )
            report.figure("tracebacks in the cluster's log", len(cluster.tracebacks()))
        finally:
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


# -- through HTTP -----------------------------------------------------------------------------


def http_deployment() -> Any:
    from starlette.responses import Response, StreamingResponse

    class BadStr(Exception):
        def __str__(self) -> str:
            raise RuntimeError("__str__ raised")

    class UnpicklableError(Exception):
        def __init__(self, message: str) -> None:
            super().__init__(message)
            self.lock = threading.Lock()

    async def chunks(last: Any) -> Any:
        yield b"first chunk\n"
        await asyncio.sleep(0.01)
        yield b"second chunk\n"
        if isinstance(last, BaseException):
            raise last
        yield last

    @serve.deployment(name="BadHTTP", max_ongoing_requests=MAX_ONGOING)
    class BadHTTP:
        async def __call__(self, request: Any) -> Any:
            kind = request.url.path.rsplit("/", 1)[-1]
            if kind == "ok":
                return str(os.getpid())
            if kind == "huge":
                return Response(b"x" * (int(request.query_params["mb"]) << 20))
            return {
                "bad-str": lambda: _raise(BadStr("x")),
                "unpicklable": lambda: _raise(UnpicklableError("holds a lock")),
                "system-exit": lambda: _raise(SystemExit("exit")),
                "keyboard-interrupt": lambda: _raise(KeyboardInterrupt("interrupted")),
                "object": lambda: object(),
                "bad-dict": lambda: {"a": object()},
                "status-1000": lambda: Response(b"x", status_code=1000),
                "status-99": lambda: Response(b"x", status_code=99),
                "value-crlf": lambda: Response(b"x", headers={"x-a": "a\r\nInjected: yes"}),
                "value-lf": lambda: Response(b"x", headers={"x-a": "a\nInjected: yes"}),
                "value-nul": lambda: Response(b"x", headers={"x-a": "a\x00b"}),
                "name-crlf": lambda: Response(b"x", headers={"x-a: b\r\ninjected": "yes"}),
                "name-space": lambda: Response(b"x", headers={"x a": "b"}),
                "stream-value-crlf": lambda: StreamingResponse(
                    chunks(b"third chunk\n"), headers={"x-a": "a\r\nInjected: yes"}
                ),
                "stream-raises": lambda: StreamingResponse(chunks(ValueError("mid-way"))),
                "stream-bad-item": lambda: StreamingResponse(chunks(object())),
                "stream-system-exit": lambda: StreamingResponse(chunks(SystemExit("exit"))),
            }[kind]()

    return BadHTTP


def _raise(exc: BaseException) -> Any:
    raise exc


def through_http(
    huge_mb: int = 256, timeout_s: float = 5.0, repeat: int = MAX_ONGOING + 1
) -> Report:
    with scenario(
        "bad values through HTTP", f"each case {repeat} times, max_ongoing_requests={MAX_ONGOING}"
    ) as report:
        cluster = Cluster()
        try:
            serve.run(http_deployment().bind(), route_prefix="/bad")
            pid = _good(cluster.port, timeout_s)
            cases: list[tuple[str, str, Callable[[Any], str]]] = [
                ("exception whose __str__ raises", "bad-str", _status(500)),
                ("exception holding a lock", "unpicklable", _status(500)),
                ("SystemExit in async def", "system-exit", _status(500)),
                ("KeyboardInterrupt in async def", "keyboard-interrupt", _status(500)),
                ("return object()", "object", _status(500)),
                ("a dict that is not JSON-serialisable", "bad-dict", _status(500)),
                ("status code 1000", "status-1000", _status(500)),
                ("status code 99", "status-99", _status(500)),
                ("CR LF in a response header's value", "value-crlf", _clean_head),
                ("LF in a response header's value", "value-lf", _clean_head),
                ("NUL in a response header's value", "value-nul", _clean_head),
                ("CR LF in a response header's name", "name-crlf", _clean_head),
                ("space in a response header's name", "name-space", _clean_head),
                ("CR LF in a streamed response's header", "stream-value-crlf", _clean_head),
                ("stream raising mid-way", "stream-raises", _truncated),
                ("stream yielding an object() mid-way", "stream-bad-item", _truncated),
                ("stream raising SystemExit mid-way", "stream-system-exit", _truncated),
                (
                    f"a {huge_mb} MB body",
                    f"huge?mb={huge_mb}",
                    lambda ex: _body_size(ex, huge_mb << 20),
                ),
            ]
            wrong = []
            for name, path, check in cases:
                why, took = "", 0.0
                for _ in range(repeat):
                    ex = exchange(cluster.port, _get(f"/bad/{path}"), timeout=timeout_s)
                    took = max(took, ex.elapsed)
                    why = check(ex)
                    if why:
                        break
                try:
                    after = _good(cluster.port, timeout_s)
                except OSError as exc:
                    after, why = None, why + f"; then a good request failed: {exc}"
                if after is not None and after != pid:
                    why += f"; then the replica was another process ({pid} -> {after})"
                    pid = after
                report.figure(name, ("WRONG " + why[:150]) if why else f"ok in {ms(took):.0f} ms")
                if why:
                    wrong.append(f"{name}: {why}")
                if after is None:
                    wrong.append(
                        f"after {name!r} the proxy does not serve: the cases after it were not run"
                    )
                    break
            report.check(
                "every request answered as it should, replica kept serving",
                not wrong,
                f"{len(wrong)} wrong",
                first_lines(wrong, 40),
            )
            report.figure("tracebacks in the cluster's log", len(cluster.tracebacks()))
        finally:
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()


def _good(port: int, timeout_s: float) -> int:
    conn = HttpConn(port, timeout=timeout_s)
    try:
        r = conn.request("/bad/ok")
    finally:
        conn.close()
    if r.status != 200:
        raise OSError(f"HTTP {r.status}: {r.text[:200]}")
    return int(r.text)


def _status(expected: int) -> Callable[[Any], str]:
    def check(ex: Any) -> str:
        if ex.statuses[:1] != [expected]:
            return f"expected {expected}, got {ex.summary()}"
        r = ex.responses[0]
        if "traceback" in r.text.lower():
            return "a traceback in the body"
        if r.header("x-request-id") is None:
            return "no x-request-id"
        return ""

    return check


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _clean_head(ex: Any) -> str:
    """A response header the app made invalid is a 500, never bytes that split the response or
    break its framing (RFC 9110 §5.5: no CR, LF or NUL in a field; names are tokens)."""
    if not ex.responses:
        return f"no response ({ex.summary()})"
    r = ex.responses[0]
    if r.status == 500:
        return ""
    if r.header("injected") is not None or b"njected" in ex.leftover:
        return f"{r.status}, and the app's CR LF reached the wire (response splitting)"
    bad = [(k, v) for k, v in r.headers if not _TOKEN.fullmatch(k) or any(c in v for c in "\r\n\0")]
    return f"{r.status} with invalid header lines {bad}" if bad else f"{r.status}, expected a 500"


def _truncated(ex: Any) -> str:
    """A stream that fails after its head went out must not look complete: no final chunk."""
    if not ex.responses:
        return f"no response ({ex.summary()})" if not ex.closed else ""
    r = ex.responses[0]
    if r.status == 500:
        return ""  # failed before anything was sent: a plain error is right
    if r.complete:
        return f"{r.status} with a complete body ({len(r.body)} bytes): the failure is invisible"
    return ""


def _body_size(ex: Any, n: int) -> str:
    if ex.statuses[:1] != [200]:
        return f"expected 200, got {ex.summary()}"
    got = len(ex.responses[0].body)
    return "" if got == n else f"{got} bytes of {n}"
