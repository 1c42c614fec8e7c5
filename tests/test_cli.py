"""The ``serval`` command as real processes: start, deploy, status, config, shutdown, run."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import free_port
from serval.schema import build_application, load_config, walk

APP = """
from starlette.requests import Request
import serval as serve

@serve.deployment(num_replicas=2)
class Echo:
    def __init__(self, word: str = "echo") -> None:
        self.word = word

    def __call__(self, request: Request) -> str:
        return f"{self.word}:{request.query_params.get('x', '')}"

@serve.deployment(max_ongoing_requests=3)
class Front:
    def __init__(self, echo) -> None:
        self.echo = echo

    async def __call__(self, request: Request) -> str:
        return "front+" + await self.echo.remote(request)

app = Echo.bind()
composed = Front.bind(Echo.bind("inner"))

def builder(args):
    return Echo.bind(args.get("word", "built"))
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "cli_app.py").write_text(APP)
    return tmp_path


def serval(
    *args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serval", *args],
        cwd=cwd,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=45,
        env={**_clean_env(), **(env or {})},
    )


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SERVAL_ADDRESS"}


def cluster_pids(address: str) -> list[int]:
    """Live serval processes of the cluster at ``address`` (by their command lines)."""
    marker = b"\0" + os.fsencode(address) + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"serval::" in cmd and marker in cmd and state != b"Z":
            found.append(int(entry))
    return found


def tcp_listen_ports(pids: list[int]) -> set[int]:
    """The TCP ports the given processes listen on."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
    ports = set()
    for proto in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[9]) in inodes:  # LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_gone(address: str, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := cluster_pids(address)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def address(tmp_path: Path) -> Iterator[str]:
    """A runtime directory for one cluster; whatever is left of it is stopped afterwards.

    Not under tmp_path: that can be too long for the Unix socket paths inside (107 bytes).
    It is under the session's temp dir all the same (conftest sets it)."""
    base = tempfile.mkdtemp(prefix="cli-")
    addr = os.path.join(base, "c")
    yield addr
    if cluster_pids(addr):
        serval("shutdown", "-y", "--address", addr, cwd=tmp_path)
    for pid in wait_gone(addr, timeout=5.0):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(base, ignore_errors=True)


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode()


def test_start_deploy_status_config_shutdown(workdir: Path, address: str) -> None:
    port, dashboard = free_port(), free_port()
    started = serval(
        "start",
        "--address",
        address,
        "--port",
        str(port),
        "--dashboard-port",
        str(dashboard),
        cwd=workdir,
    )
    assert started.returncode == 0, started.stderr
    assert address in started.stdout
    token = (Path(address) / "dashboard.token").read_text().strip()
    assert f"dashboard: http://127.0.0.1:{dashboard}/?token={token}" in started.stdout
    again = serval("start", "--address", address, "--port", str(port), cwd=workdir)
    assert again.returncode == 1 and "already running" in again.stderr

    cfg = workdir / "cfg.yaml"
    cfg.write_text(
        textwrap.dedent(
            """
            applications:
              - name: echo
                route_prefix: /echo
                import_path: cli_app:builder
                args: {word: hi}
                deployments:
                  - name: Echo
                    num_replicas: 1
              - name: composed
                route_prefix: /c
                import_path: cli_app.composed
            """
        )
    )
    deployed = serval("deploy", str(cfg), "--address", address, cwd=workdir)
    assert deployed.returncode == 0, deployed.stderr
    assert get(f"http://127.0.0.1:{port}/echo?x=1") == "hi:1"
    # Security: a private runtime directory, and the only TCP listeners are the HTTP proxy and
    # the dashboard, behind its token (the daemon, controller and replicas talk over Unix
    # sockets in that directory).
    assert stat.S_IMODE(os.stat(address).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(os.path.join(address, "controller.sock")).st_mode)
    assert tcp_listen_ports(cluster_pids(address)) == {port, dashboard}
    assert get(f"http://127.0.0.1:{port}/c?x=2") == "front+inner:2"

    # SERVAL_ADDRESS names the cluster as well as --address does.
    status = serval("status", "-o", "yaml", cwd=workdir, env={"SERVAL_ADDRESS": address})
    assert status.returncode == 0, status.stderr
    out = status.stdout
    assert "echo:" in out and "composed:" in out and "RUNNING" in out
    assert "route_prefix: /echo" in out and "HEALTHY" in out
    assert "RUNNING: 1" in out and "RUNNING: 2" in out  # Echo overridden to 1; inner Echo has 2

    config = serval("config", "--address", address, cwd=workdir)
    assert config.returncode == 0, config.stderr
    assert "import_path: cli_app:builder" in config.stdout
    assert "word: hi" in config.stdout and "num_replicas: 1" in config.stdout
    assert "import_path: cli_app.composed" in config.stdout

    run_config_then_sigterm(workdir, address, port)

    refused = serval("shutdown", "--address", address, cwd=workdir, stdin="n\n")
    assert refused.returncode == 1 and "aborted" in refused.stderr
    assert get(f"http://127.0.0.1:{port}/echo?x=3") == "hi:3"

    stopped = serval("shutdown", "-y", "--address", address, cwd=workdir)
    assert stopped.returncode == 0, stopped.stderr
    assert wait_gone(address) == []
    after = serval("status", "--address", address, cwd=workdir)
    assert after.returncode == 1
    assert "no serval cluster is running" in after.stderr


def run_config_then_sigterm(workdir: Path, address: str, port: int) -> None:
    """`serval run cfg.yaml --address A` deploys to the running cluster; SIGTERM deletes its
    app, and the cluster it only connected to (and its other apps) lives on."""
    cfg = workdir / "run.yaml"
    cfg.write_text("applications:\n  - {name: r, route_prefix: /r, import_path: cli_app:app}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "serval", "run", str(cfg), "--address", address],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "is running" in line:
                break
        assert get(f"http://127.0.0.1:{port}/r?x=1") == "echo:1"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    status = serval("status", "-o", "yaml", "--address", address, cwd=workdir)
    assert status.returncode == 0
    assert "  r:" not in status.stdout and "  echo:" in status.stdout


def test_run_module_serves_until_sigint(workdir: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serval", "run", "cli_app:app", "--port", str(port)],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
    )
    cluster = ""
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # "started a serval cluster at <dir> ...", then "... running"
            if line.startswith("started a serval cluster at "):
                cluster = line.split()[5]
            if "is running" in line:
                assert f"http://127.0.0.1:{port}/" in line
                break
        assert cluster and cluster_pids(cluster)
        assert get(f"http://127.0.0.1:{port}/?x=run") == "echo:run"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert wait_gone(cluster) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in cluster_pids(cluster) if cluster else []:
            os.kill(pid, signal.SIGKILL)


def test_build_output_round_trips(workdir: Path) -> None:
    out = workdir / "built.yaml"
    built = serval("build", "cli_app:app", "cli_app:composed", "-o", str(out), cwd=workdir)
    assert built.returncode == 0, built.stderr
    cfg = load_config(str(out))
    assert [(a.name, a.route_prefix, a.import_path) for a in cfg.applications] == [
        ("app1", "/app1", "cli_app:app"),
        ("app2", "/app2", "cli_app:composed"),
    ]
    assert [(d.name, d.overrides()) for d in cfg.applications[1].deployments] == [
        ("Front", {"max_ongoing_requests": 3}),
        ("Echo", {"num_replicas": 2}),
    ]
    sys.path.insert(0, str(workdir))
    try:
        app = build_application(cfg.applications[1], 1, str(out))
    finally:
        sys.path.remove(str(workdir))
    assert [name for name, _ in walk(app)] == ["Front", "Echo"]
    printed = serval("build", "cli_app:app", cwd=workdir)
    assert printed.returncode == 0 and "route_prefix: /\n" in printed.stdout


def test_deploy_bad_field_names_it(workdir: Path, tmp_path: Path) -> None:
    cfg = workdir / "bad.yaml"
    cfg.write_text(
        "applications:\n"
        "  - import_path: cli_app:app\n"
        "    deployments:\n"
        "      - name: Echo\n"
        "        num_replicas: 1\n"
        "        max_ongoing_request: 4\n"
    )
    result = serval("deploy", str(cfg), "--address", str(tmp_path / "none"), cwd=workdir)
    assert result.returncode == 1
    assert "applications[0].deployments[0].max_ongoing_request" in result.stderr
    assert "did you mean 'max_ongoing_requests'" in result.stderr
    assert str(cfg) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1  # one line


def test_errors_without_a_cluster(workdir: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "none")
    script = Path(sys.executable).with_name("serval")  # the console script
    status = subprocess.run(
        [str(script), "status", "--address", missing],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=workdir,
        env=_clean_env(),
    )
    assert status.returncode == 1
    assert status.stderr.strip() == (
        f"serval: error: no serval cluster is running at {missing} (start one with `serval start`)"
    )
    bad_import = serval("run", "no_such_module_here:app", cwd=workdir)
    assert bad_import.returncode == 1
    assert "no module named 'no_such_module_here'" in bad_import.stderr
    assert "Traceback" not in bad_import.stderr
