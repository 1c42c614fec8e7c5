"""HTTPS as in Ray Serve: ``HTTPOptions(ssl_keyfile=, ssl_certfile=, ssl_keyfile_password=,
ssl_ca_certs=)`` in ``serve.start`` and config files, the proxy serving TLS with them (its limits
too: the header timeout, the connection cap, uploads), client certificates with
``ssl_ca_certs``, the errors a bad file or password gives where ``serve.start`` runs, the
password kept out of command lines and replicas, and the Ray backend's proxies.

Certificates are made here (``cryptography``): a CA, a server certificate it signed for
127.0.0.1 and localhost (its key also encrypted with a password), a client certificate it
signed, and a stranger (self-signed) for what must be refused. Requests are real HTTPS, with
httpx or ``ssl`` sockets trusting that CA.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.requests import Request
from starlette.responses import StreamingResponse
from websockets.sync.client import connect

import serval as serve
from conftest import free_port, poll, replica_pids, serval_processes
from serval._private.caller import runtime
from serval.config import HTTPOptions
from serval.exceptions import ServalError
from serval.schema import ConfigError, parse_config

PASSWORD = "tls-Secret-9271"

# -- certificates ------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: str,  # "ca", "server" or "client"
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name = issuer[0].subject if issuer else _name(cn)
    signer = issuer[1] if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=usage == "ca", path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    )
    if usage == "ca":
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        purpose = (
            ExtendedKeyUsageOID.SERVER_AUTH
            if usage == "server"
            else (ExtendedKeyUsageOID.CLIENT_AUTH)
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        if usage == "server":
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
    return builder.sign(signer, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, password: str | None = None) -> str:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.encode())
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return str(path)


@dataclass
class Certs:
    ca: str  # the CA's certificate: what clients trust, and ssl_ca_certs
    cert: str  # the server's, signed by the CA
    key: str
    encrypted_key: str  # the same key, encrypted with PASSWORD
    client_cert: str  # a client's, signed by the CA
    client_key: str
    stranger_cert: str  # self-signed: no CA vouches for it
    stranger_key: str

    def client(self, with_certificate: bool = False) -> ssl.SSLContext:
        """A client's TLS context trusting the CA (and showing the client certificate)."""
        ctx = ssl.create_default_context(cafile=self.ca)
        if with_certificate:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("serval test CA", ca_key, None, "ca")
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    return Certs(
        ca=_write_cert(d / "ca.pem", ca),
        cert=_write_cert(
            d / "cert.pem", _certificate("localhost", server_key, (ca, ca_key), "server")
        ),
        key=_write_key(d / "key.pem", server_key),
        encrypted_key=_write_key(d / "encrypted_key.pem", server_key, PASSWORD),
        client_cert=_write_cert(
            d / "client.pem", _certificate("a client", client_key, (ca, ca_key), "client")
        ),
        client_key=_write_key(d / "client_key.pem", client_key),
        stranger_cert=_write_cert(
            d / "stranger.pem", _certificate("stranger", stranger_key, None, "client")
        ),
        stranger_key=_write_key(d / "stranger_key.pem", stranger_key),
    )


# -- the app -----------------------------------------------------------------------------------


async def _chunks(n: int) -> Any:
    for i in range(n):
        yield f"chunk {i};"


@serve.deployment
class Site:
    async def __call__(self, request: Request) -> Any:
        path = request.url.path
        if path == "/stream":
            return StreamingResponse(_chunks(int(request.query_params["n"])))
        if path == "/upload":  # read as it arrives: a large body streams through the proxy
            digest, size = hashlib.sha256(), 0
            async for chunk in request.stream():
                digest.update(chunk)
                size += len(chunk)
            return {"sha256": digest.hexdigest(), "size": size}
        return {
            "scheme": request.url.scheme,
            "method": request.method,
            "path": path,
            "json": await request.json() if request.method == "POST" else None,
        }


sockets_app = FastAPI()


@serve.deployment
@serve.ingress(sockets_app)
class Sockets:
    @sockets_app.websocket("/echo")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                await ws.send_text(f"{ws.url.scheme}:{await ws.receive_text()}")
        except WebSocketDisconnect:
            pass


def _start(certs: Certs, **options: Any) -> str:
    """A local cluster serving HTTPS with ``options``, the Site app at /; its base URL."""
    port = free_port()
    serve.start(
        http_options={"port": port, "ssl_keyfile": certs.key, "ssl_certfile": certs.cert, **options}
    )
    serve.run(Site.bind(), route_prefix="/")
    return f"https://127.0.0.1:{port}"


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _tls_socket(certs: Certs, port: int) -> ssl.SSLSocket:
    """A client connection to the proxy, through its TLS handshake."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return certs.client().wrap_socket(raw, server_hostname="127.0.0.1")


def _read_all(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """What ``sock`` receives until the server closes it, and how long that took."""
    sock.settimeout(timeout)
    start, got = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (ssl.SSLError, ConnectionResetError):
        pass  # (an abrupt close, with nothing more to read)
    return got, time.monotonic() - start


# -- one cluster: requests, streams, uploads, plain HTTP, timeouts ---------------------------------


@pytest.fixture(scope="class")
def site(certs: Certs) -> Iterator[str]:
    url = _start(certs, request_header_timeout_s=1.0)
    yield url
    serve.shutdown()


class TestServing:
    def test_get_and_post_over_https(self, site: str, certs: Certs) -> None:
        with httpx.Client(base_url=site, verify=certs.client(), timeout=10) as client:
            r = client.get("/hello?x=1")
            assert r.status_code == 200
            assert r.json() == {"scheme": "https", "method": "GET", "path": "/hello", "json": None}
            r = client.post("/things", json={"a": [1, 2, 3]})  # (same connection: keep-alive)
            assert r.status_code == 200
            assert r.json()["json"] == {"a": [1, 2, 3]}

    def test_a_streaming_response(self, site: str, certs: Certs) -> None:
        with (
            httpx.Client(verify=certs.client(), timeout=10) as client,
            client.stream("GET", f"{site}/stream?n=50") as r,
        ):
            assert r.status_code == 200
            assert r.headers["transfer-encoding"] == "chunked"
            body = b"".join(r.iter_bytes()).decode()
        assert body == "".join(f"chunk {i};" for i in range(50))

    def test_an_upload_larger_than_the_body_window(self, site: str, certs: Certs) -> None:
        # 8 MiB, sent in 64 KiB pieces: past the 1 MiB window, it leaves for the replica as
        # it arrives (the proxy's Upload path), through TLS.
        piece = os.urandom(64 * 1024)
        expected = hashlib.sha256(piece * 128).hexdigest()

        def body() -> Iterator[bytes]:
            for _ in range(128):
                yield piece

        r = httpx.post(f"{site}/upload", content=body(), verify=certs.client(), timeout=30)
        assert r.status_code == 200
        assert r.json() == {"sha256": expected, "size": 128 * len(piece)}

    def test_a_websocket_over_tls(self, site: str, certs: Certs) -> None:
        serve.run(Sockets.bind(), name="sockets", route_prefix="/live")
        url = site.replace("https://", "wss://")
        with connect(f"{url}/live/echo", ssl=certs.client(), open_timeout=10) as ws:
            for text in ("hello", "x" * 100_000):
                ws.send(text)
                assert ws.recv(timeout=10) == f"wss:{text}"
        r = httpx.get(f"{site}/hello", verify=certs.client(), timeout=10)  # (and HTTP on)
        assert r.status_code == 200

    def test_plain_http_to_the_tls_port_is_closed_and_serving_goes_on(
        self, site: str, certs: Certs
    ) -> None:
        port = _port(site)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            got, took = _read_all(sock, timeout=10)
        assert got == b""  # closed: nothing in clear text, no hang
        assert took < 5
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/hello", timeout=10)
        r = httpx.get(f"{site}/hello", verify=certs.client(), timeout=10)
        assert r.status_code == 200

    def test_a_client_that_does_not_trust_the_certificate_fails_its_handshake(
        self, site: str
    ) -> None:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{site}/hello", timeout=10)  # (the system's CAs only)

    def test_the_header_timeout_over_tls(self, site: str, certs: Certs) -> None:
        port = _port(site)
        # A head that never ends: 408, then closed, about 1 s after the connection opened.
        with _tls_socket(certs, port) as sock:
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            got, took = _read_all(sock, timeout=10)
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert took < 5
        # Through the handshake and then nothing: closed without a word.
        with _tls_socket(certs, port) as sock:
            got, took = _read_all(sock, timeout=10)
        assert got == b"" and took < 5
        # Not even a handshake: the handshake has the header timeout too (not asyncio's 60 s).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            got, took = _read_all(sock, timeout=10)
        assert got == b"" and took < 5
        r = httpx.get(f"{site}/hello", verify=certs.client(), timeout=10)
        assert r.status_code == 200


# -- the connection cap over TLS -----------------------------------------------------------------


def _closed(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except (BlockingIOError, ssl.SSLWantReadError):
        return False
    except (ssl.SSLError, ConnectionResetError):
        return True


def test_the_connection_cap_counts_and_closes_idle_and_handshaking_tls_connections(
    certs: Certs,
) -> None:
    # The header timeout (10 s, the default) is far off: what closes connections here is the
    # cap making room for new ones.
    url = _start(certs, max_connections=6)
    port = _port(url)
    try:
        # Six idle connections past their handshake fill the cap; a new client is served,
        # and the idle longest make room.
        idle = [_tls_socket(certs, port) for _ in range(6)]
        r = httpx.get(f"{url}/hello", verify=certs.client(), timeout=10)
        assert r.status_code == 200
        poll(lambda: any(_closed(s) for s in idle), 5, "an idle TLS connection closed for room")
        assert _closed(idle[0])  # the oldest first
        for s in idle:
            s.close()
        # Six connections stuck before their handshake count too, and give way the same.
        stuck = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(6)]
        with httpx.Client(verify=certs.client(), timeout=10) as client:
            for _ in range(3):
                assert client.get(f"{url}/hello").status_code == 200
        poll(lambda: any(_closed(s) for s in stuck), 5, "a handshaking connection closed for room")
        for s in stuck:
            s.close()
    finally:
        serve.shutdown()


# -- client certificates, an encrypted key ---------------------------------------------------------


def test_client_certificates_and_an_encrypted_key(certs: Certs) -> None:
    url = _start(
        certs,
        ssl_keyfile=certs.encrypted_key,
        ssl_keyfile_password=PASSWORD,
        ssl_ca_certs=certs.ca,
    )
    try:
        r = httpx.get(f"{url}/hello", verify=certs.client(with_certificate=True), timeout=10)
        assert r.status_code == 200 and r.json()["scheme"] == "https"
        # No certificate, or one the CA did not sign: the handshake fails.
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/hello", verify=certs.client(), timeout=10)
        stranger = certs.client()
        stranger.load_cert_chain(certs.stranger_cert, certs.stranger_key)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/hello", verify=stranger, timeout=10)
        # The password is on no command line of the cluster (any user can read those), and
        # the replicas' environment does not have it either.
        address = runtime.address()
        assert address is not None
        processes = serval_processes(address)
        assert any("serval::proxy" in cmd for _, cmd in processes)
        for _, cmd in processes:
            assert PASSWORD not in cmd, cmd
        for pid in replica_pids("default", "Site").values():
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert PASSWORD.encode() not in f.read()
        # And the proxy went on serving those who may.
        r = httpx.get(f"{url}/hello", verify=certs.client(with_certificate=True), timeout=10)
        assert r.status_code == 200
    finally:
        serve.shutdown()


# -- what is wrong, said where serve.start runs ----------------------------------------------------


def test_keyfile_and_certfile_go_together() -> None:
    with pytest.raises(ValueError, match="ssl_certfile is not set"):
        HTTPOptions(ssl_keyfile="key.pem")
    with pytest.raises(ValueError, match="ssl_keyfile is not set"):
        HTTPOptions(ssl_certfile="cert.pem")
    with pytest.raises(ValueError, match="ssl_ca_certs needs ssl_certfile and ssl_keyfile"):
        HTTPOptions(ssl_ca_certs="ca.pem")
    with pytest.raises(ValueError, match="ssl_keyfile_password needs ssl_certfile"):
        HTTPOptions(ssl_keyfile_password=PASSWORD)
    with pytest.raises(ValueError, match="ssl_keyfile_password must be a string") as err:
        HTTPOptions(ssl_keyfile="k", ssl_certfile="c", ssl_keyfile_password=9271)  # type: ignore[arg-type]
    assert "9271" not in str(err.value)
    assert HTTPOptions(ssl_keyfile="", ssl_certfile="").tls is False  # (Ray: empty is unset)
    options = HTTPOptions(ssl_keyfile="k", ssl_certfile="c", ssl_keyfile_password=PASSWORD)
    assert options.tls and PASSWORD not in repr(options)


def _start_fails(**options: Any) -> str:
    port = free_port()
    with pytest.raises(ValueError) as err:
        serve.start(http_options={"port": port, **options})
    assert runtime.address() is None  # no cluster was started
    assert PASSWORD not in str(err.value)
    return str(err.value)


def test_bad_files_and_passwords_fail_serve_start_with_the_reason(
    certs: Certs, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.pem")
    message = _start_fails(ssl_keyfile=missing, ssl_certfile=certs.cert)
    assert message == f"http_options.ssl_keyfile: {missing} does not exist"
    message = _start_fails(ssl_keyfile=certs.key, ssl_certfile=str(tmp_path))
    assert message == f"http_options.ssl_certfile: {tmp_path} is not a file"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    message = _start_fails(ssl_keyfile=certs.key, ssl_certfile=str(junk))
    assert message == f"http_options.ssl_certfile: {junk} holds no PEM certificate"
    message = _start_fails(ssl_keyfile=certs.cert, ssl_certfile=certs.cert)
    assert message == f"http_options.ssl_keyfile: {certs.cert} holds no PEM private key"
    message = _start_fails(ssl_keyfile=certs.stranger_key, ssl_certfile=certs.cert)
    assert message.startswith(
        f"http_options.ssl_keyfile: {certs.stranger_key} is not the key of the certificate"
    )
    message = _start_fails(ssl_keyfile=certs.encrypted_key, ssl_certfile=certs.cert)
    assert message == (
        f"http_options.ssl_keyfile: {certs.encrypted_key} is encrypted; "
        "set http_options.ssl_keyfile_password"
    )
    message = _start_fails(
        ssl_keyfile=certs.encrypted_key, ssl_certfile=certs.cert, ssl_keyfile_password="wrong"
    )
    assert message == f"http_options.ssl_keyfile_password does not decrypt {certs.encrypted_key}"
    message = _start_fails(ssl_keyfile=certs.key, ssl_certfile=certs.cert, ssl_ca_certs=certs.key)
    assert message.startswith(f"http_options.ssl_ca_certs: cannot load {certs.key}")


def test_relative_paths_are_taken_from_where_serve_start_runs(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(certs.cert).parent)
    url = _start(certs, ssl_keyfile="key.pem", ssl_certfile="cert.pem")
    try:
        monkeypatch.chdir(tmp_path)  # (the proxy has them as absolute paths)
        r = httpx.get(f"{url}/hello", verify=certs.client(), timeout=10)
        assert r.status_code == 200
    finally:
        serve.shutdown()


def test_a_proxy_that_cannot_load_the_files_fails_serve_start_once(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a Ray node without the files: the driver's check passes, the proxy's does not.
    serve.start fails with the proxy's reason (the proxy is not restarted over and over)."""
    from serval._private.proxy import tls

    monkeypatch.setattr(tls, "checked", lambda options: options)  # (the driver's check)
    start = time.monotonic()
    missing = str(tmp_path / "nowhere.pem")
    with pytest.raises(
        ServalError, match="the HTTP proxy could not start: cannot serve HTTPS: "
    ) as e:
        serve.start(
            http_options={"port": free_port(), "ssl_keyfile": missing, "ssl_certfile": certs.cert}
        )
    assert f"http_options.ssl_keyfile: {missing} does not exist" in str(e.value)
    assert time.monotonic() - start < 20
    assert runtime.address() is None  # the cluster it started is gone again


# -- config files and the CLI ----------------------------------------------------------------------


def test_config_file_fields_are_checked_and_the_password_never_shown() -> None:
    def problems(http_options: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as err:
            parse_config(
                {
                    "http_options": http_options,
                    "applications": [{"name": "a", "import_path": "m:app"}],
                },
                "serve.yaml",
            )
        return str(err.value)

    assert problems({"ssl_keyfile": "k.pem"}) == (
        "serve.yaml: http_options.ssl_certfile: ssl_keyfile and ssl_certfile go together "
        "(HTTPS needs both); this one is not set"
    )
    assert problems({"ssl_ca_certs": "ca.pem"}) == (
        "serve.yaml: http_options.ssl_ca_certs: needs ssl_certfile and ssl_keyfile (HTTPS)"
    )
    message = problems({"ssl_keyfile": "k", "ssl_certfile": "c", "ssl_keyfile_password": 9271})
    assert message == (
        "serve.yaml: http_options.ssl_keyfile_password: must be a string (quote it in YAML)"
    )
    config = parse_config(
        {
            "http_options": {
                "ssl_keyfile": "k.pem",
                "ssl_certfile": "c.pem",
                "ssl_keyfile_password": PASSWORD,
                "ssl_ca_certs": "ca.pem",
            },
            "applications": [{"name": "a", "import_path": "m:app"}],
        }
    )
    http = config.http()
    assert (http.ssl_keyfile, http.ssl_certfile, http.ssl_ca_certs) == ("k.pem", "c.pem", "ca.pem")
    assert http.ssl_keyfile_password == PASSWORD
    assert PASSWORD not in repr(config) and PASSWORD not in repr(http)


APP = """
from starlette.requests import Request
import serval as serve

@serve.deployment
def hello(request: Request) -> str:
    return f"hello over {request.url.scheme}"

app = hello.bind()
"""


def test_serval_run_with_a_config_file_serves_https(certs: Certs, tmp_path: Path) -> None:
    (tmp_path / "tls_app.py").write_text(APP)
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(
        f"http_options:\n  port: {port}\n  ssl_keyfile: {certs.encrypted_key}\n"
        f"  ssl_certfile: {certs.cert}\n  ssl_keyfile_password: '{PASSWORD}'\n"
        "applications:\n  - {name: t, route_prefix: /, import_path: tls_app:app}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SERVAL_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serval", "run", str(config)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "is running" in line:
                assert f"https://127.0.0.1:{port}/" in line
                break
        r = httpx.get(f"https://127.0.0.1:{port}/", verify=certs.client(), timeout=10)
        assert (r.status_code, r.text) == (200, "hello over https")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert PASSWORD not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serval_run_says_which_file_is_wrong(certs: Certs, tmp_path: Path) -> None:
    (tmp_path / "tls_app.py").write_text(APP)
    missing = str(tmp_path / "gone.pem")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "serval",
            "run",
            "tls_app:app",
            "--port",
            str(free_port()),
            "--ssl-keyfile",
            certs.key,
            "--ssl-certfile",
            missing,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"http_options.ssl_certfile: {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_serval_start_serves_https_from_its_daemon(certs: Certs, tmp_path: Path) -> None:
    address = os.path.join(tempfile.mkdtemp(prefix="https-"), "c")  # (short: socket paths)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "SERVAL_ADDRESS"}

    def serval(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "serval", *args, "--address", address],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    started = serval(
        "start", "--port", str(port), "--ssl-keyfile", certs.key, "--ssl-certfile", certs.cert
    )
    try:
        assert started.returncode == 0, started.stderr
        assert f"https://127.0.0.1:{port}" in started.stdout

        def healthy() -> bool:  # (start returns once the controller answers; the proxy follows)
            try:
                r = httpx.get(f"https://127.0.0.1:{port}/-/healthz", verify=certs.client())
            except httpx.ConnectError as exc:
                assert "Connection refused" in str(exc)  # (not a TLS failure)
                return False
            return r.status_code == 200

        poll(healthy, 20, "the daemon's proxy answering over HTTPS")
    finally:
        stopped = serval("shutdown", "-y")
    assert stopped.returncode == 0, stopped.stderr
    poll(lambda: not serval_processes(address), 20, "the daemon's cluster gone")


# -- the Ray backend -------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_ray_backends_proxy_serves_https(certs: Certs) -> None:
    from ray_clusters import one_node

    with one_node():
        port = free_port()
        serve.start(
            backend="ray",
            http_options={
                "port": port,
                "ssl_keyfile": certs.encrypted_key,
                "ssl_certfile": certs.cert,
                "ssl_keyfile_password": PASSWORD,
            },
        )
        serve.run(Site.bind(), route_prefix="/")
        r = httpx.post(
            f"https://127.0.0.1:{port}/x", json={"on": "ray"}, verify=certs.client(), timeout=30
        )
        assert r.status_code == 200
        assert r.json() == {
            "scheme": "https",
            "method": "POST",
            "path": "/x",
            "json": {"on": "ray"},
        }
