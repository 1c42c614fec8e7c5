"""What serval's proxy takes from uvicorn, checked against the uvicorn installed.

``proxy/http_protocol.py`` subclasses uvicorn's ``HttpToolsProtocol``: it overrides some of its
methods (private ones among them), calls others, and reads its attributes; ``proxy/server.py``
builds a ``uvicorn.Config`` and runs a ``uvicorn.Server``. None of that is public API, so an
upgrade of uvicorn may rename or drop any of it, and serval would break at run time, or worse,
keep running with an override nobody calls. These tests fail instead:

- every override still overrides a method of uvicorn's, with the same parameters, and serval's
  own methods and attributes collide with none of uvicorn's;
- every uvicorn attribute and method serval uses exists on a real connection, and the list of
  them is complete (read from the source of ``http_protocol.py``, so a new use must be added);
- the parts work together on a real socket: httptools calls serval's callbacks, a request is
  answered by serval's cycle, a websocket upgrade goes through uvicorn's, and uvicorn's graceful
  shutdown calls serval's ``shutdown``; the ``Config`` that ``server.py`` builds loads.

``pyproject.toml`` pins uvicorn to the range these tests passed on.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import socket
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server, ServerState

from serval._private.proxy import http_protocol
from serval._private.proxy.http_protocol import (
    Exchange,
    ProxyHttpProtocol,
    protocol_for,
    text_reply,
)
from serval.config import HTTPOptions

SRC = Path(http_protocol.__file__)
SERVER_SRC = SRC.with_name("server.py")

# The methods of HttpToolsProtocol that ProxyHttpProtocol overrides: asyncio calls the first
# three, httptools the parser callbacks (by name, on the protocol uvicorn gives the parser),
# uvicorn's data path the upgrade, and uvicorn's Server ``shutdown``.
OVERRIDES = {
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "handle_websocket_upgrade",
    "shutdown",
}
# Methods of uvicorn's that serval calls on itself (``super()`` calls are the overrides').
CALLED = {"_should_upgrade", "_unsupported_upgrade_warning"}
# Inherited parser callbacks serval relies on: they collect the URL and the headers.
INHERITED_CALLBACKS = {"on_url", "on_header"}
# Attributes of a uvicorn connection that serval reads or sets.
ATTRIBUTES = {
    "loop",
    "logger",
    "parser",
    "transport",
    "flow",
    "connections",
    "server_state",
    "url",
    "headers",
    "expect_100_continue",
    "scope",  # set by serval for an upgrade (uvicorn's upgrade reads it)
    "asgi_version",
    "server",
    "client",
    "scheme",
    "root_path",
    "app_state",
}
FLOW = {"pause_reading", "resume_reading", "drain", "read_paused", "write_paused"}
PARSER = {"feed_data", "should_upgrade", "get_http_version", "get_method", "should_keep_alive"}
HTTPTOOLS = {"HttpParserError", "HttpParserUpgrade", "HttpParserCallbackError", "parse_url"}


def _class_node() -> ast.ClassDef:
    tree = ast.parse(SRC.read_text())
    (node,) = [
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ProxyHttpProtocol"
    ]
    return node


def _own_names(cls: ast.ClassDef) -> tuple[set[str], set[str], set[str]]:
    """(methods, class-level annotations, attributes its connection_made sets)."""
    methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    annotated = {
        n.target.id
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    (made,) = [
        n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "connection_made"
    ]
    state = {
        t.attr
        for n in ast.walk(made)
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
    }
    return methods, annotated, state


def _attributes_of(tree: ast.AST, owner: str) -> set[str]:
    """Names ``x`` of every ``<...>.owner.x`` (or ``owner.x`` for a bare name) in ``tree``."""
    found = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute):
            v = n.value
            if (isinstance(v, ast.Attribute) and v.attr == owner) or (
                isinstance(v, ast.Name) and v.id == owner
            ):
                found.add(n.attr)
    return found


# -- the source: what serval uses, and that the lists above are complete -------------------------


def test_the_lists_name_everything_http_protocol_takes_from_uvicorn() -> None:
    cls = _class_node()
    methods, annotated, state = _own_names(cls)
    used = _attributes_of(cls, "self") - methods - annotated - state
    missing = used - CALLED - ATTRIBUTES
    assert not missing, f"http_protocol.py uses these of uvicorn's; list them here: {missing}"
    supers = {
        n.attr
        for n in ast.walk(cls)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Call)
        and isinstance(n.value.func, ast.Name)
        and n.value.func.id == "super"
    }
    assert supers <= OVERRIDES, supers - OVERRIDES
    tree = ast.parse(SRC.read_text())
    assert _attributes_of(tree, "flow") <= FLOW, _attributes_of(tree, "flow") - FLOW
    assert _attributes_of(tree, "parser") <= PARSER, _attributes_of(tree, "parser") - PARSER
    assert _attributes_of(tree, "httptools") <= HTTPTOOLS


def test_every_override_still_overrides_with_the_same_parameters() -> None:
    methods, _, _ = _own_names(_class_node())
    assert methods & set(dir(HttpToolsProtocol)) == OVERRIDES
    for name in OVERRIDES:
        base = getattr(HttpToolsProtocol, name)
        ours = getattr(ProxyHttpProtocol, name)
        assert inspect.isfunction(base), f"uvicorn's {name} is no longer a method"
        want = [(p.name, p.kind) for p in inspect.signature(base).parameters.values()]
        got = [(p.name, p.kind) for p in inspect.signature(ours).parameters.values()]
        assert got == want, f"{name}: uvicorn's takes {want}, serval's {got}"


def test_serval_s_own_names_collide_with_none_of_uvicorn_s() -> None:
    """A name serval gives its own method or state, added to uvicorn's class later, would
    silently replace uvicorn's (or uvicorn would overwrite serval's)."""
    methods, annotated, state = _own_names(_class_node())

    async def live() -> set[str]:
        conn, transport, peer = await _live_connection()
        transport.close()
        peer.close()
        return set(vars(conn))

    uvicorns = set(dir(HttpToolsProtocol)) | asyncio.run(live())
    for name in (methods - OVERRIDES) | annotated | state:
        assert name not in uvicorns, f"uvicorn's HttpToolsProtocol has {name!r} now"


def test_methods_serval_calls_exist_with_the_parameters_it_passes() -> None:
    for name in CALLED | INHERITED_CALLBACKS:
        assert inspect.isfunction(getattr(HttpToolsProtocol, name, None)), name
    assert list(inspect.signature(HttpToolsProtocol._should_upgrade).parameters) == ["self"]
    params = inspect.signature(HttpToolsProtocol._unsupported_upgrade_warning).parameters
    assert list(params) == ["self"]
    # How uvicorn makes a connection of the class serval gives it (``http=``).
    params = inspect.signature(HttpToolsProtocol.__init__).parameters
    assert {"config", "server_state", "app_state"} <= set(params)
    for name in PARSER:
        assert callable(getattr(httptools.HttpRequestParser, name)), name
    for name in HTTPTOOLS:
        assert hasattr(httptools, name), name
    for name in ("pause_reading", "resume_reading", "drain"):
        assert callable(getattr(FlowControl, name)), name


# -- a real connection -------------------------------------------------------------------------


async def _ws_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """What the proxy's ASGI app does for a websocket, in short: accept, echo one message."""
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    message = await receive()
    await send({"type": "websocket.send", "text": "echo " + message.get("text", "")})
    await send({"type": "websocket.close"})


def _server_config_kwargs() -> dict[str, Any]:
    """The keyword arguments ``proxy/server.py`` builds its ``uvicorn.Config`` with (the
    constant ones as written; ``http`` is the protocol class)."""
    tree = ast.parse(SERVER_SRC.read_text())
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "Config"
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "uvicorn"
    ]
    (call,) = calls
    kwargs: dict[str, Any] = {}
    for kw in call.keywords:
        assert kw.arg is not None
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            kwargs[kw.arg] = None  # computed: filled in by the test
    assert "http" in kwargs and "ws" in kwargs
    return kwargs


class _Proxy:
    """The routing a connection asks of the proxy (``ProxyApp``), reduced to one fixed answer:
    the parts under test are uvicorn's and the connection's, not routing."""

    def __init__(self) -> None:
        self.options = HTTPOptions()
        self.client: Any = None
        self.heads: list[tuple[str, str, bytes, bool]] = []

    def ended(self, ex: Exchange) -> None:
        pass  # (metrics and access lines are not under test here)

    def exchange(
        self,
        conn: ProxyHttpProtocol,
        method: str,
        http_version: str,
        url: Any,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
    ) -> Exchange:
        self.heads.append((method, http_version, url.path, keep_alive))
        ex = Exchange(conn, "rid-1", keep_alive, method)
        ex.reply = text_reply(200, f"{method} {url.path.decode()}")
        return ex


def _config(protocol: type[Any]) -> uvicorn.Config:
    kwargs = _server_config_kwargs()
    kwargs["http"] = protocol
    config = uvicorn.Config(_ws_app, **kwargs)
    config.load()
    return config


async def _live_connection() -> tuple[HttpToolsProtocol, asyncio.Transport, socket.socket]:
    """A uvicorn connection on a real socket, in the middle of a request's head."""
    a, b = socket.socketpair()
    conn = HttpToolsProtocol(_config(HttpToolsProtocol), ServerState(), {})
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(lambda: conn, a)
    conn.data_received(b"GET /a/b?q=1 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nX-More: 1\r\n")
    return conn, transport, b


def test_the_config_server_py_builds_loads() -> None:
    proxy = _Proxy()
    cls = protocol_for(proxy, 100)  # type: ignore[arg-type]
    config = _config(cls)
    assert config.http_protocol_class is cls
    assert config.ws_protocol_class is not None  # the websocket implementation named exists
    assert "sockets" in inspect.signature(Server.serve).parameters
    assert Server(config).should_exit is False


def test_a_connection_has_the_attributes_serval_uses() -> None:
    async def main() -> None:
        conn, transport, peer = await _live_connection()
        try:
            for name in ATTRIBUTES:
                assert hasattr(conn, name), name
            assert conn.transport is transport and conn in conn.connections
            assert isinstance(conn.flow, FlowControl)
            assert conn.flow.read_paused is False and conn.flow.write_paused is False
            assert isinstance(conn.logger, logging.Logger)
            assert isinstance(conn.server_state.total_requests, int)
            assert conn.loop is asyncio.get_running_loop()
            assert conn.scheme == "http" and isinstance(conn.root_path, str)
            assert isinstance(conn.app_state, dict) and isinstance(conn.asgi_version, str)
            for name in PARSER:
                assert callable(getattr(conn.parser, name)), name
            # uvicorn's parser callbacks collected the URL and the headers serval reads.
            assert conn.url == b"/a/b?q=1"
            # (the last header line is held back until the parser sees the next line begin)
            assert conn.headers[:2] == [(b"host", b"x"), (b"expect", b"100-continue")]
            assert conn.expect_100_continue is True
        finally:
            transport.close()
            peer.close()

    asyncio.run(main())


def _exchange_over(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
        return out


class _Recording(ProxyHttpProtocol):
    """serval's protocol, noting which of its overrides uvicorn and httptools call."""

    called: list[str] = []

    def on_message_begin(self) -> None:
        self.called.append("on_message_begin")
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.called.append("on_headers_complete")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.called.append("on_message_complete")
        super().on_message_complete()

    def shutdown(self) -> None:
        self.called.append("shutdown")
        super().shutdown()


def _serve(proxy: _Proxy, test: Any, protocol: type[ProxyHttpProtocol] = ProxyHttpProtocol) -> Any:
    """Run a real ``uvicorn.Server`` with serval's protocol on 127.0.0.1, ``test(port)`` in a
    thread, then uvicorn's graceful shutdown; ``test``'s result."""
    limits = {k: v for k, v in vars(protocol_for(proxy, 100)).items() if not k.startswith("__")}
    cls = type("Contract", (protocol,), limits)
    config = _config(cls)
    server = Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]

    async def main() -> Any:
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.005)
            if serving.done():
                serving.result()
        try:
            return await asyncio.wait_for(asyncio.to_thread(test, port), 20)
        finally:
            server.should_exit = True
            await asyncio.wait_for(serving, 10)

    try:
        return asyncio.run(main())
    finally:
        sock.close()


def test_a_request_is_answered_by_servals_cycle_on_uvicorns_connection() -> None:
    proxy = _Proxy()
    _Recording.called = []

    def test(port: int) -> None:
        reply = _exchange_over(port, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"GET /x")
        assert b"x-request-id: rid-1\r\n" in reply
        # Pipelined, on one connection: answered in order.
        two = (
            b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        )
        reply = _exchange_over(port, two)
        assert reply.index(b"GET /1") < reply.index(b"GET /2")
        # Malformed: uvicorn's parser error, serval's 400.
        assert _exchange_over(port, b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400 ")

    _serve(proxy, test, _Recording)
    assert [h[:3] for h in proxy.heads] == [
        ("GET", "1.1", b"/x"),
        ("GET", "1.1", b"/1"),
        ("GET", "1.1", b"/2"),
    ]
    assert _Recording.called.count("on_message_begin") == 4  # (the malformed one's too)
    assert _Recording.called.count("on_headers_complete") == 3
    assert _Recording.called.count("on_message_complete") == 3


def test_a_websocket_upgrade_goes_through_uvicorns() -> None:
    proxy = _Proxy()

    def test(port: int) -> bytes:
        head = (
            b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head)
            got = b""
            while b"\r\n\r\n" not in got:
                got += sock.recv(65536)
            # A masked text frame "hi" (RFC 6455 5.2), then the echo back.
            mask = b"\x01\x02\x03\x04"
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(b"hi"))
            sock.sendall(b"\x81\x82" + mask + payload)
            while b"echo hi" not in got:
                chunk = sock.recv(65536)
                assert chunk, got
                got += chunk
            return got

    got = _serve(proxy, test)
    assert got.startswith(b"HTTP/1.1 101 ")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in got  # the accept key of the RFC's example
    assert proxy.heads == []  # not routed as an ordinary request


def test_uvicorns_graceful_shutdown_calls_servals_shutdown() -> None:
    proxy = _Proxy()
    _Recording.called = []
    holder: dict[str, socket.socket] = {}

    def test(port: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /keep HTTP/1.1\r\nHost: h\r\n\r\n")
        got = b""
        while not got.endswith(b"GET /keep"):
            got += sock.recv(65536)
        holder["sock"] = sock  # idle, kept alive: the shutdown must close it

    _serve(proxy, test, _Recording)
    sock = holder["sock"]
    try:
        assert sock.recv(1) == b""  # closed by serval's shutdown
    finally:
        sock.close()
    assert "shutdown" in _Recording.called


@pytest.mark.parametrize("name", sorted(OVERRIDES | CALLED | INHERITED_CALLBACKS))
def test_each_method_is_uvicorns_own_on_this_version(name: str) -> None:
    """One line per method in the report: the one that disappears is named."""
    assert name in vars(HttpToolsProtocol), f"uvicorn {uvicorn.__version__} has no {name}"
