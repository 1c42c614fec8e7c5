"""``serval start`` and ``serval run`` with ``--dashboard-port``: they print the dashboard's URL
with its token (as Jupyter does), the URL logs a client in, an asked port that is taken is a
clear error, and ``0`` means no dashboard."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import free_port, serval_processes

APP = """
import serval as serve

@serve.deployment
class Hi:
    def __call__(self, request) -> str:
        return "hi"

app = Hi.bind()
"""


SERVAL = [sys.executable, "-m", "serval"]


def serval(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SERVAL_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "serval", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=45,
        env=env,
    )


@pytest.fixture
def address(tmp_path: Path) -> Iterator[str]:
    base = tempfile.mkdtemp(prefix="dcli-")  # (short: the sockets' paths)
    addr = os.path.join(base, "c")
    yield addr
    if serval_processes(addr):
        serval("shutdown", "-y", "--address", addr, cwd=tmp_path)
    shutil.rmtree(base, ignore_errors=True)


def _logs_in(url: str) -> None:
    with httpx.Client(follow_redirects=True) as client:
        first = client.get(url)  # the token URL: a cookie, and the page without the token
        assert first.status_code == 200 and first.url.query == b""
        assert "serval dashboard" in first.text
        assert client.get(str(first.url.join("/api/serve/applications/"))).status_code == 200


def test_start_prints_the_token_url(tmp_path: Path, address: str) -> None:
    port = free_port()
    started = serval(
        "start",
        "--address",
        address,
        "--port",
        str(free_port()),
        "--dashboard-port",
        str(port),
        cwd=tmp_path,
    )
    assert started.returncode == 0, started.stderr
    (line,) = [x for x in started.stdout.splitlines() if x.startswith("dashboard: ")]
    url = line.removeprefix("dashboard: ")
    token = (Path(address) / "dashboard.token").read_text().strip()
    assert url == f"http://127.0.0.1:{port}/?token={token}"
    _logs_in(url)
    assert httpx.get(f"http://127.0.0.1:{port}/api/serve/applications/").status_code == 401
    stopped = serval("shutdown", "-y", "--address", address, cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr


def test_start_with_a_taken_dashboard_port_fails_clearly(tmp_path: Path, address: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = serval("start", "--address", address, "--dashboard-port", str(port), cwd=tmp_path)
    assert started.returncode == 1
    assert f"dashboard port 127.0.0.1:{port} is in use" in started.stderr
    assert "Traceback" not in started.stderr
    assert not serval_processes(address)


def test_start_with_dashboard_port_zero_has_none(tmp_path: Path, address: str) -> None:
    started = serval(
        "start",
        "--address",
        address,
        "--port",
        str(free_port()),
        "--dashboard-port",
        "0",
        cwd=tmp_path,
    )
    assert started.returncode == 0, started.stderr
    assert "dashboard" not in started.stdout
    assert not (Path(address) / "dashboard.token").exists()
    assert not [c for _, c in serval_processes(address) if "serval::dashboard" in c]
    stopped = serval("shutdown", "-y", "--address", address, cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr


def test_run_prints_the_token_url_and_serves_it(tmp_path: Path) -> None:
    (tmp_path / "hi_app.py").write_text(APP)
    http, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "SERVAL_ADDRESS"}
    proc = subprocess.Popen(
        [*SERVAL, "run", "hi_app:app", "--port", str(http), "--dashboard-port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:  # (it prints the URL before it deploys)
            if line.startswith("dashboard: "):
                url = line.removeprefix("dashboard: ").strip()
                break
        assert url is not None and url.startswith(f"http://127.0.0.1:{port}/?token=")
        _logs_in(url)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode in (0, 130), err
