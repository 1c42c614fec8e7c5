"""Large request bodies stream to the replica with bounded memory: every way user code reads a
body gets it whole and intact (``await request.body()``, ``request.stream()``, FastAPI's
``bytes`` bodies and ``UploadFile``, a sync ``__call__``); the client is held back while the
app is slow to read; the body limit holds mid-stream; a client that leaves mid-upload cancels
the request; an app that answers before reading all of it leaves the connection usable; and
concurrent large uploads keep the proxy's and the replica's memory small."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import Body, FastAPI, UploadFile
from starlette.requests import Request

import serval as serve
from conftest import poll, serval_processes
from serval._private.caller import runtime
from test_http_errors import own_cluster
from test_http_protocol import read_response

MB = 1024 * 1024


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@serve.deployment(max_ongoing_requests=20)
class Reader:
    """Reads the body the way the path says and answers its size and digest."""

    async def __call__(self, request: Request) -> str:
        how = request.url.path.rsplit("/", 1)[-1]
        if how == "stream":
            h, size = hashlib.sha256(), 0
            async for chunk in request.stream():
                h.update(chunk)
                size += len(chunk)
            return f"{size} {h.hexdigest()}"
        if how == "ignore":  # answers without reading it
            return "ignored"
        body = await request.body()
        return f"{len(body)} {digest(body)}"


@serve.deployment(max_ongoing_requests=20)
class SyncReader:
    def __call__(self, request: Request) -> str:
        body = request._body  # a sync __call__ gets the whole body, already read
        return f"{len(body)} {digest(body)}"


api = FastAPI()


@serve.deployment(max_ongoing_requests=20)
@serve.ingress(api)
class Api:
    @api.post("/bytes")
    async def raw_bytes(self, data: bytes = Body(media_type="application/octet-stream")) -> str:
        return f"{len(data)} {digest(data)}"

    @api.post("/request")
    async def request_body(self, request: Request) -> str:
        body = await request.body()
        return f"{len(body)} {digest(body)}"

    @api.post("/file")
    async def upload(self, file: UploadFile) -> dict[str, str | int]:
        data = await file.read()
        return {"name": file.filename or "", "size": len(data), "digest": digest(data)}

    @api.post("/sync-file")
    def sync_upload(self, file: UploadFile) -> dict[str, str | int]:
        data = file.file.read()
        return {"name": file.filename or "", "size": len(data), "digest": digest(data)}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """The module's cluster. (Tests that start clusters of their own come after every test
    that uses this one: starting one ends the cluster running.)"""
    with own_cluster() as base:
        serve.run(Reader.bind(), name="reader", route_prefix="/reader")
        serve.run(SyncReader.bind(), name="sync", route_prefix="/sync")
        serve.run(Api.bind(), name="api", route_prefix="/api")
        yield base


BODY = os.urandom(24 * MB)  # well past the 1 MiB window


def chunks(data: bytes, size: int = 256 * 1024):
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("path", ["/reader/body", "/reader/stream", "/sync/x", "/api/bytes"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_large_body_arrives_whole_however_it_is_read(url: str, path: str, framing: str) -> None:
    content = BODY if framing == "content-length" else chunks(BODY)
    headers = {"content-type": "application/octet-stream"}
    r = httpx.post(f"{url}{path}", content=content, headers=headers, timeout=30)
    assert r.status_code == 200, r.text[:200]
    text = r.json() if path.startswith("/api") else r.text
    assert text == f"{len(BODY)} {digest(BODY)}"


def test_fastapi_upload_files_arrive_whole(url: str) -> None:
    for path in ("/api/file", "/api/sync-file"):
        files = {"file": ("big.bin", BODY, "application/octet-stream")}
        r = httpx.post(f"{url}{path}", files=files, timeout=30)
        assert r.status_code == 200, r.text[:200]
        assert r.json() == {"name": "big.bin", "size": len(BODY), "digest": digest(BODY)}
    r = httpx.post(f"{url}/api/request", content=BODY, timeout=30)
    assert r.json() == f"{len(BODY)} {digest(BODY)}"


def test_small_bodies_and_large_ones_share_a_connection(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        for body in (b"tiny", BODY[: 3 * MB], b"", BODY[: 2 * MB + 7], b"after"):
            r = client.post("/reader/body", content=body)
            assert r.text == f"{len(body)} {digest(body)}"


def test_an_answer_before_the_body_is_read_leaves_the_connection_usable(url: str) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/reader/ignore", content=BODY).text == "ignored"
        assert client.post("/reader/body", content=b"next").text == f"4 {digest(b'next')}"


@serve.deployment(max_ongoing_requests=5)
class SlowReader:
    """Takes one chunk, then rests for three seconds before reading the rest."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)

    async def __call__(self, request: Request) -> str:
        stream = request.stream()
        size = len(await stream.__anext__())
        (self.dir / "first").write_text(str(size))
        await asyncio.sleep(3)
        async for chunk in stream:
            size += len(chunk)
        return str(size)


def test_a_slow_reader_holds_the_client_back(url: str, tmp_path: Path) -> None:
    serve.run(SlowReader.bind(str(tmp_path)), name="slow", route_prefix="/slow")
    total = 90 * MB  # (within max_request_body_bytes)
    sent = [0]
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)

    def send() -> None:
        head = f"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n"
        sock.sendall(head.encode())
        piece = b"s" * MB
        while sent[0] < total:
            sock.sendall(piece)
            sent[0] += len(piece)

    sender = threading.Thread(target=send, daemon=True)
    try:
        sender.start()
        poll((tmp_path / "first").exists, timeout=10, what="the app took its first chunk")
        time.sleep(1.0)  # the client sends as fast as it can, the app reads nothing
        held = sent[0]
        time.sleep(0.5)
        # Only a window (1 MiB) plus what the sockets' buffers take went ahead of the app.
        assert sent[0] == held, "the client was not held back"
        assert held < 48 * MB, f"{held} bytes went ahead of a reader that took one chunk"
        print(f"slow reader: the client got {held / MB:.1f} MB ahead of it")
        sender.join(timeout=30)  # the app reads on after its rest: the client sends the rest
        status, _, body = read_response(sock.makefile("rb"))
        assert (status, body) == (200, str(total).encode())
    finally:
        sock.close()
        serve.delete("slow")


@serve.deployment(max_ongoing_requests=5)
class Noting:
    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)

    async def __call__(self, request: Request) -> str:
        (self.dir / "started").touch()
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
        except asyncio.CancelledError:
            (self.dir / "cancelled").write_text(str(size))
            raise
        return str(size)


def test_a_client_that_leaves_mid_upload_cancels_the_request(url: str, tmp_path: Path) -> None:
    serve.run(Noting.bind(str(tmp_path)), name="noting", route_prefix="/noting")
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /noting HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
            sock.sendall(BODY[: 4 * MB])
            poll((tmp_path / "started").exists, timeout=10, what="the upload started")
        poll((tmp_path / "cancelled").exists, timeout=5, what="the request cancelled")
        assert int((tmp_path / "cancelled").read_text()) <= 4 * MB
        r = httpx.post(f"{url}/noting", content=b"again", timeout=10)
        assert r.text == "5"
    finally:
        serve.delete("noting")


def test_broken_framing_mid_upload_is_a_400_and_cancels_the_request(
    url: str, tmp_path: Path
) -> None:
    serve.run(Noting.bind(str(tmp_path)), name="noting", route_prefix="/noting")
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /noting HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n")
            sock.sendall(b"\r\n")
            for _ in range(3):
                sock.sendall(b"%x\r\n%s\r\n" % (MB, BODY[:MB]))
            poll((tmp_path / "started").exists, timeout=10, what="the upload started")
            sock.sendall(b"not a chunk size\r\n")
            status, headers, _ = read_response(sock.makefile("rb"))
            assert status == 400 and headers["connection"] == "close"
        poll((tmp_path / "cancelled").exists, timeout=5, what="the request cancelled")
    finally:
        serve.delete("noting")


def _peak_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def test_concurrent_large_uploads_keep_memory_bounded() -> None:
    """10 uploads of 60 MB at once (before: the proxy held each whole, ~2.3 GB for 10 x 90):
    each process's peak stays within a few windows of its idle size."""
    uploads, size = 10, 60 * MB
    with own_cluster() as base:
        serve.run(Reader.bind(), name="reader", route_prefix="/reader")
        address = runtime.address()
        assert address is not None
        procs = serval_processes(address)
        (proxy,) = [p for p, cmd in procs if "serval::proxy" in cmd]
        (replica,) = [p for p, cmd in procs if "serval::replica reader." in cmd]
        assert httpx.post(f"{base}/reader/stream", content=b"warm", timeout=10).status_code == 200
        before = _peak_kb(proxy), _peak_kb(replica)
        payload = BODY[:MB] * (size // MB)
        expected = f"{len(payload)} {digest(payload)}"

        def upload(_: int) -> str:
            return httpx.post(f"{base}/reader/stream", content=payload, timeout=60).text

        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(uploads) as pool:
            answers = list(pool.map(upload, range(uploads)))
        elapsed = time.monotonic() - start
        assert answers == [expected] * uploads
        after = _peak_kb(proxy), _peak_kb(replica)
    print(
        f"{uploads} x {size // MB} MB in {elapsed:.1f}s: proxy peak {before[0] // 1024} -> "
        f"{after[0] // 1024} MB, replica peak {before[1] // 1024} -> {after[1] // 1024} MB"
    )
    for name, (was, now) in zip(("proxy", "replica"), zip(before, after, strict=True), strict=True):
        assert now - was < 100 * 1024, f"the {name} peaked at {now} kB (was {was} kB)"


def test_the_body_limit_holds_mid_stream(tmp_path: Path) -> None:
    with own_cluster(max_request_body_bytes=5 * MB) as base:
        serve.run(Reader.bind(), name="reader", route_prefix="/reader")
        r = httpx.post(f"{base}/reader/stream", content=chunks(BODY[: 8 * MB]), timeout=30)
        assert r.status_code == 413
        assert "Traceback" not in r.text
        r = httpx.post(f"{base}/reader/stream", content=chunks(BODY[: 5 * MB]), timeout=30)
        assert r.text == f"{5 * MB} {digest(BODY[: 5 * MB])}"
