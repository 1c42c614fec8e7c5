"""The README's examples serve HTTP on port 8000: run each as a user would, ask it, Ctrl-C it,
and every serval process it started exits. The quickstart serves a real model (scikit-learn's
digits) and its client prints accuracy and latency; hello.py composes two deployments."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import serval_descendants, serval_processes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PORT = 8000


def _port_free(port: int) -> bool:
    # the proxy binds 127.0.0.1 with SO_REUSEADDR; check the way it would bind
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ctrl_c_as_in_a_terminal() -> None:
    # A terminal's foreground job gets Ctrl-C. A job a shell starts in the background (as a
    # test runner may be started) inherits SIGINT ignored, and Python then never turns it into
    # KeyboardInterrupt: the quickstart would ignore our Ctrl-C. Give it the terminal's.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def _serving(
    script: str, started_within_s: float = 30
) -> Iterator[tuple[list[str], dict[int, str]]]:
    """Run ``examples/<script>`` until it says it serves; yield (its output so far, its serval
    processes); then Ctrl-C it and check that it exits cleanly and leaves no process behind."""
    if not _port_free(PORT):
        pytest.skip(f"port {PORT} is in use (another run or service); the example needs it")
    proc = subprocess.Popen(
        [sys.executable, "-u", str(EXAMPLES / script)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_ctrl_c_as_in_a_terminal,  # (only signal(): safe after fork)
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    output: list[str] = []
    cluster: dict[int, str] = {}
    try:
        deadline = time.monotonic() + started_within_s
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no 'serving on' line in {started_within_s}s:\n{''.join(output)}"
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                text = "".join(output)
                if "cannot listen" in text or "Address already in use" in text:
                    pytest.skip(f"port {PORT} was taken before the example bound it")
                raise AssertionError(f"{script} exited ({proc.wait()}):\n{text}")
            output.append(line)
            if "serving on" in line:
                break
        cluster = serval_descendants(proc.pid)
        yield output, cluster

        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{script} did not exit within 10s of Ctrl-C") from None
        assert code == 0, f"exit code {code}:\n{''.join(output)}"

        deadline = time.monotonic() + 5
        live = {pid for pid, _ in serval_processes()}
        while cluster.keys() & live:
            assert time.monotonic() < deadline, (
                f"serval processes still running 5s after {script} exited: "
                f"{[(p, c) for p, c in cluster.items() if p in live]}"
            )
            time.sleep(0.02)
            live = {pid for pid, _ in serval_processes()}
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{PORT}/-/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        still = dict(serval_processes())
        for pid, cmd in cluster.items():
            if still.get(pid) == cmd:  # the same process (its command names its cluster)
                os.kill(pid, signal.SIGKILL)


def _roles(cluster: dict[int, str]) -> list[str]:
    return sorted(cmd.split("serval::", 1)[1].split()[0] for cmd in cluster.values())


@pytest.mark.timeout(120)
def test_quickstart_serves_a_real_model_and_its_client_measures_it() -> None:
    with _serving("quickstart.py", started_within_s=60) as (_, cluster):
        roles = _roles(cluster)
        assert roles.count("controller") == 1, roles
        assert roles.count("proxy") == 1, roles
        assert roles.count("replica") == 3, roles  # DigitsAPI + 2 x Classifier

        client = subprocess.run(
            [sys.executable, str(EXAMPLES / "quickstart_client.py"), "--concurrency", "8"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stdout + client.stderr
        report = client.stdout
        assert report.startswith("450 requests, 8 at a time"), report
        accuracy = re.search(r"accuracy: (\d+)/450 = ", report)
        assert accuracy, report
        assert int(accuracy.group(1)) >= 0.9 * 450, report  # a real classifier, not chance
        assert re.search(r"latency: p50 [\d.]+ ms  p90 [\d.]+ ms  p99 [\d.]+ ms", report), report

        # One digit by hand: the classifier agrees with scikit-learn's label for it.
        from sklearn.datasets import load_digits

        digits = load_digits()
        r = httpx.post(
            f"http://127.0.0.1:{PORT}/predict",
            json={"pixels": digits.data[0].tolist()},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        assert r.json()["digit"] == digits.target[0]
        assert 0.0 < r.json()["confidence"] <= 1.0
        # A malformed body is the client's error, and the app serves on.
        for bad in ({"pixels": [1.0]}, {"pixels": [99.0] * 64}, {"image": []}):
            r = httpx.post(f"http://127.0.0.1:{PORT}/predict", json=bad, timeout=10)
            assert r.status_code == 422, (bad, r.status_code, r.text)
            assert "Traceback" not in r.text
        assert httpx.get(f"http://127.0.0.1:{PORT}/", timeout=10).json()["post"] == "/predict"


def test_hello_serves_http_and_stops_on_ctrl_c() -> None:
    with _serving("hello.py") as (output, cluster):
        text = "".join(output)
        assert "HELLO ALICE!" in text  # the modern handle call
        assert "HELLO BOB!" in text and "HELLO CAROL!" in text  # the legacy handle calls
        roles = _roles(cluster)
        assert roles.count("controller") == 1, roles
        assert roles.count("proxy") == 1, roles
        assert roles.count("replica") == 3, roles  # Greeter + 2 x Frontend

        r = httpx.get(f"http://127.0.0.1:{PORT}/", params={"name": "Alice"}, timeout=10)
        assert r.status_code == 200
        assert "HELLO ALICE" in r.text
        assert r.headers.get("x-request-id")
        r = httpx.get(f"http://127.0.0.1:{PORT}/", timeout=10)
        assert "HELLO WORLD" in r.text
