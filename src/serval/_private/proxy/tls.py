"""HTTPS for the proxy: the server's ``SSLContext`` from ``HTTPOptions``' ``ssl_*`` fields,
checked where ``serve.start`` runs too, so that a missing file or a wrong password is an error
there rather than a proxy that cannot start.

The context is built the same way in the driver (to check) and in each proxy (to serve):
``load_cert_chain`` with a password callback that never prompts (OpenSSL's default asks on
the terminal for an encrypted key, which would hang a driver and fail a proxy obscurely), and,
with ``ssl_ca_certs``, clients must show a certificate that CA signed. Messages name the field
and the file, never the password.

Connections: ``TlsHttpProtocol`` (why it, not uvicorn, starts TLS: its docstring).

On the local backend the password travels in the environment, not on command lines (see
``process.settings.http_options_argv``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from serval._private.proxy.http_protocol import ProxyHttpProtocol
from serval.config import HTTPOptions

__all__ = ["TlsHttpProtocol", "checked", "https_protocol", "server_context"]

logger = logging.getLogger("serval.proxy")

# A PEM file larger than this is no certificate or key (and not read whole to find out).
_MAX_PEM_BYTES = 1 << 20


def server_context(options: HTTPOptions) -> ssl.SSLContext:
    """The proxy's TLS context; ValueError saying which field is wrong and why."""
    certfile, keyfile = options.ssl_certfile, options.ssl_keyfile
    assert certfile is not None and keyfile is not None
    cert_text = _read("ssl_certfile", certfile)
    key_text = _read("ssl_keyfile", keyfile)
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ValueError(f"http_options.ssl_certfile: {certfile} holds no PEM certificate")
    if "PRIVATE KEY-----" not in key_text:
        raise ValueError(f"http_options.ssl_keyfile: {keyfile} holds no PEM private key")
    encrypted = "ENCRYPTED" in key_text
    password = options.ssl_keyfile_password
    if encrypted and not password:
        raise ValueError(
            f"http_options.ssl_keyfile: {keyfile} is encrypted; "
            "set http_options.ssl_keyfile_password"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # (TLS 1.2 at least, Python's default)
    # Client-initiated renegotiation (TLS 1.2) makes the server redo the handshake's costly
    # part at the client's will: refused.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(certfile, keyfile, lambda: password or "")
    except ssl.SSLError as exc:
        raise ValueError(_load_failure(options, exc, encrypted)) from None
    except OSError as exc:  # (read above: it changed since)
        raise ValueError(f"http_options: cannot load {certfile} / {keyfile}: {exc}") from None
    if options.ssl_ca_certs is not None:
        _read("ssl_ca_certs", options.ssl_ca_certs)
        try:
            ctx.load_verify_locations(options.ssl_ca_certs)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"http_options.ssl_ca_certs: cannot load {options.ssl_ca_certs}: "
                f"{getattr(exc, 'reason', None) or exc}"
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _read(field: str, path: str) -> str:
    try:
        if not os.path.isfile(path):
            raise ValueError(
                f"http_options.{field}: {path} "
                + ("is not a file" if os.path.exists(path) else "does not exist")
            )
        with open(path, "rb") as f:
            data = f.read(_MAX_PEM_BYTES)
    except OSError as exc:
        raise ValueError(
            f"http_options.{field}: cannot read {path}: {exc.strerror or exc}"
        ) from None
    return data.decode("latin-1")


def _load_failure(options: HTTPOptions, exc: ssl.SSLError, encrypted: bool) -> str:
    if exc.reason == "KEY_VALUES_MISMATCH":
        return (
            f"http_options.ssl_keyfile: {options.ssl_keyfile} is not the key of the "
            f"certificate in http_options.ssl_certfile ({options.ssl_certfile})"
        )
    if encrypted and options.ssl_keyfile_password:  # (OpenSSL says only "PEM lib")
        return f"http_options.ssl_keyfile_password does not decrypt {options.ssl_keyfile}"
    return (
        f"http_options: cannot load the certificate {options.ssl_certfile} with the key "
        f"{options.ssl_keyfile}: {exc.reason or exc}"
    )


def checked(options: HTTPOptions) -> HTTPOptions:
    """``options`` with absolute file paths (a proxy does not run in this directory), once
    their files load here; ValueError otherwise. Without TLS, ``options`` as they are."""
    if not options.tls:
        return options
    paths = {
        name: os.path.abspath(getattr(options, name))
        for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs")
        if getattr(options, name) is not None
    }
    options = dataclasses.replace(options, **paths)
    server_context(options)
    return options


# -- the connections ---------------------------------------------------------------------------


def https_protocol(
    plain: type[ProxyHttpProtocol], ssl_context: ssl.SSLContext
) -> type[TlsHttpProtocol]:
    """``plain`` (``http_protocol.protocol_for``'s class, with its limits) over TLS."""
    attributes = {"ssl_context": ssl_context, "handshaking": {}}
    return type("ServalHttpsProtocol", (TlsHttpProtocol, plain), attributes)


class TlsHttpProtocol(ProxyHttpProtocol):
    """``ProxyHttpProtocol`` over TLS, which it starts itself on the accepted connection
    (``loop.start_tls``) rather than leaving it to the server (uvicorn's ``ssl_*``): so the
    handshake has the header timeout instead of the event loop's 60 s (the head must be
    whole ``header_timeout`` after the connection opened, handshake included), and a
    connection in its handshake counts against ``max_connections``, the first to go for
    room, instead of holding a descriptor unseen. uvicorn's part of the connection starts
    once the handshake is through, on the TLS transport, as with uvicorn's own TLS."""

    ssl_context: ssl.SSLContext

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport
        self._tls_ready = False
        self._lost = False
        self._early: list[bytes] = []
        opened = self.loop.time()
        self.handshaking[self] = opened
        if len(self.connections) + len(self.handshaking) > self.max_connections:
            self._make_room()
        if transport.is_closing():
            self.handshaking.pop(self, None)
            return
        handshake = self.loop.start_tls(
            transport,  # type: ignore[arg-type]
            self,
            self.ssl_context,
            server_side=True,
            ssl_handshake_timeout=self.header_timeout,
        )
        # Now, not in a task: start_tls takes the connection from this protocol as its first
        # step, and a task's first step comes a loop turn later, after uvloop has started
        # reading (it does once connection_made returns): the ClientHello would reach this
        # protocol's data_received, lost to TLS.
        _run_now(handshake, lambda tls, exc: self._handshake_done(tls, exc, opened))

    def _handshake_done(
        self, tls: asyncio.BaseTransport | None, exc: BaseException | None, opened: float
    ) -> None:
        self.handshaking.pop(self, None)
        if exc is not None or tls is None:  # not TLS, a certificate refused, too slow, gone
            logger.debug("a TLS handshake failed: %r", exc)
            self._raw.abort()  # type: ignore[attr-defined]
            return
        if self._lost:
            return  # (gone right after its handshake)
        self._tls_ready = True
        super().connection_made(tls)
        if self._stopped:
            return  # refused for want of room
        # The header timeout counts from the opening, the handshake included.
        self._head_since = opened
        self._wake_by(opened + self.header_timeout)
        early, self._early = self._early, []
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self._tls_ready:
            super().data_received(data)
        else:  # through the handshake; start_tls has not returned yet
            self._early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tls_ready:
            super().connection_lost(exc)
            return
        self._lost = True  # in (or right after) its handshake: HTTP never began
        self.handshaking.pop(self, None)

    @classmethod
    def close_handshakes(cls) -> None:
        """End the connections still in their handshake (the server stops; uvicorn knows only
        those past it)."""
        for conn in list(cls.handshaking):
            conn._drop()

    def _drop(self) -> None:
        # No close_notify, no wait for the client's: a client that is not reading (idle in
        # its pool) would keep the descriptor for the shutdown's timeout.
        if self._tls_ready:
            self.transport.abort()
        else:
            self.handshaking.pop(self, None)
            self._raw.abort()  # type: ignore[attr-defined]


def _run_now(
    coro: Coroutine[Any, Any, Any], done: Callable[[Any, BaseException | None], None]
) -> None:
    """Run ``coro`` up to its first wait now, in this callback, then on as each future it
    waits for completes, as a task would (without the task's loop turn before its first
    step); ``done(result, None)`` or ``done(None, exception)`` at its end."""

    def step(_: object = None) -> None:
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            done(stop.value, None)
            return
        except (Exception, asyncio.CancelledError) as exc:
            done(None, exc)
            return
        waiting._asyncio_future_blocking = False  # (taken, as a task marks it)
        waiting.add_done_callback(step)

    step()
