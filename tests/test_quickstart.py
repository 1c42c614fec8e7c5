"""The README's quickstart serves HTTP on port 8000: run it as a user would, curl it, Ctrl-C it,
and every serval process it started exits."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import serval_descendants, serval_processes

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.py"
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


def test_quickstart_serves_http_and_stops_on_ctrl_c() -> None:
    if not _port_free(PORT):
        pytest.skip(f"port {PORT} is in use (another run or service); the quickstart needs it")
    proc = subprocess.Popen(
        [sys.executable, "-u", str(QUICKSTART)],
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
        deadline = time.monotonic() + 30
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no 'serving on' line within 30s:\n{''.join(output)}"
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                text = "".join(output)
                if "cannot listen" in text or "Address already in use" in text:
                    pytest.skip(f"port {PORT} was taken before the quickstart bound it")
                raise AssertionError(f"the quickstart exited ({proc.wait()}):\n{text}")
            output.append(line)
            if "serving on" in line:
                break
        text = "".join(output)
        assert "HELLO ALICE!" in text  # the modern handle call
        assert "HELLO BOB!" in text and "HELLO CAROL!" in text  # the legacy handle calls

        cluster = serval_descendants(proc.pid)
        roles = sorted(cmd.split("serval::", 1)[1].split()[0] for cmd in cluster.values())
        assert roles.count("controller") == 1, roles
        assert roles.count("proxy") == 1, roles
        assert roles.count("replica") == 3, roles  # Greeter + 2 x Frontend

        r = httpx.get(f"http://127.0.0.1:{PORT}/", params={"name": "Alice"}, timeout=10)
        assert r.status_code == 200
        assert "HELLO ALICE" in r.text
        assert r.headers.get("x-request-id")
        r = httpx.get(f"http://127.0.0.1:{PORT}/", timeout=10)
        assert "HELLO WORLD" in r.text

        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the quickstart did not exit within 10s of Ctrl-C") from None
        assert code == 0, f"exit code {code}:\n{''.join(output)}"

        deadline = time.monotonic() + 5
        live = {pid for pid, _ in serval_processes()}
        while cluster.keys() & live:
            assert time.monotonic() < deadline, (
                f"serval processes still running 5s after the quickstart exited: "
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
