"""HTTPS for the proxy: the server's ``SSLContext`` from ``HTTPOptions``' ``ssl_*`` fields,
checked where ``serve.start`` runs too, so that a missing file or a wrong password is an error
there rather than a proxy that cannot start.

The context is built the same way in the driver (to check) and in each proxy (to serve):
``load_cert_chain`` with a password callback that never prompts (OpenSSL's default asks on
the terminal for an encrypted key, which would hang a driver and fail a proxy obscurely), and,
with ``ssl_ca_certs``, clients must show a certificate that CA signed. Messages name the field
and the file, never the password.

On the local backend the password travels in the environment, not on command lines (see
``process.settings.http_options_argv``).
"""

from __future__ import annotations

import dataclasses
import os
import ssl

from serval.config import HTTPOptions

__all__ = ["checked", "server_context"]

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
