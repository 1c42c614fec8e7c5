"""The ``serval`` command an operator runs, as real processes: a declarative ``deploy`` (unchanged
apps untouched, changed ones rolled, removed ones gone), ``status`` as a table / JSON / YAML with
the reason of a failed replica, ``run`` at the default or a new address, progress lines of a
slow deploy, and warnings only for http_options that differ from the running cluster's."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from conftest import free_port, poll
from test_cli import _clean_env, cluster_pids, get, serval, wait_gone

APP = textwrap.dedent(
    """
    import os
    import time
    from starlette.requests import Request
    import serval as serve

    @serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=2)
    class Echo:
        def __init__(self, word: str = "echo") -> None:
            self.word = word

        def __call__(self, request: Request) -> str:
            return f"{self.word}:{os.getpid()}"

    @serve.deployment
    class Broken:
        def __init__(self) -> None:
            raise RuntimeError("no model file at /models/m.bin")

        def __call__(self, request: Request) -> str:
            return "never"

    @serve.deployment(num_replicas=2)
    class Slow:
        def __init__(self, marker: str) -> None:
            try:  # the first replica takes 4 s, the second 6 s: "1/2" is seen between
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                time.sleep(4)
            except FileExistsError:
                time.sleep(6)

        def __call__(self, request: Request) -> str:
            return "slow"

    def echo(args):
        return Echo.bind(args.get("word", "echo"))

    broken = Broken.bind()

    def slow(args):
        return Slow.bind(args["marker"])
    """
)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "ops_app.py").write_text(APP)
    return tmp_path


@pytest.fixture
def cluster(workdir: Path) -> Iterator[tuple[str, int]]:
    """A ``serval start`` cluster (its address and HTTP port), stopped afterwards."""
    base = tempfile.mkdtemp(prefix="ops-")
    address = os.path.join(base, "c")
    port = free_port()
    started = serval("start", "--address", address, "--port", str(port), cwd=workdir)
    assert started.returncode == 0, started.stderr
    yield address, port
    serval("shutdown", "-y", "--address", address, cwd=workdir)
    for pid in wait_gone(address, timeout=5.0):
        os.kill(pid, signal.SIGKILL)


def write_config(path: Path, apps: list[dict[str, object]], **top: object) -> Path:
    path.write_text(yaml.safe_dump({**top, "applications": apps}))
    return path


def echo_app(name: str, word: str) -> dict[str, object]:
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "ops_app:echo",
        "args": {"word": word},
    }


def replica_pids(address: str, app: str) -> set[int]:
    """The live replica processes of application ``app`` on the cluster at ``address``."""
    found = set()
    for pid in cluster_pids(address):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        i = argv.index(b"serval::replica") if b"serval::replica" in argv else -1
        if i >= 0 and argv[i + 1].startswith(f"{app}.".encode()):
            found.add(pid)
    return found


def _pythonpath(workdir: Path) -> str:
    return os.pathsep.join(p for p in (str(workdir), os.environ.get("PYTHONPATH", "")) if p)


def _exactly(n: int, pids: set[int]) -> set[int] | None:
    return pids if len(pids) == n else None


def status_of(before: subprocess.CompletedProcess[str]) -> str:
    return f"rc={before.returncode}\nstdout:\n{before.stdout}\nstderr:\n{before.stderr}"


@pytest.mark.timeout(150)
def test_deploy_is_declarative_unchanged_untouched_changed_rolled_removed_gone(
    workdir: Path, cluster: tuple[str, int]
) -> None:
    address, port = cluster
    base = f"http://127.0.0.1:{port}"
    cfg = workdir / "apps.yaml"

    # 1. add three apps
    write_config(cfg, [echo_app("keep", "k"), echo_app("change", "v1"), echo_app("gone", "g")])
    first = serval("deploy", str(cfg), "--address", address, cwd=workdir)
    assert first.returncode == 0, status_of(first)
    pids = {app: replica_pids(address, app) for app in ("keep", "change", "gone")}
    assert all(len(p) == 2 for p in pids.values()), pids
    assert get(f"{base}/change").startswith("v1:")

    # 2. change one app (its argument) while a client keeps calling it: it rolls, no request
    # fails; the unchanged apps keep their replica processes
    failures: list[str] = []
    words: set[str] = set()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                words.add(get(f"{base}/change").split(":")[0])
            except (urllib.error.URLError, OSError) as exc:
                failures.append(repr(exc))

    caller = threading.Thread(target=client)
    caller.start()
    try:
        write_config(cfg, [echo_app("keep", "k"), echo_app("change", "v2"), echo_app("gone", "g")])
        second = serval("deploy", str(cfg), "--address", address, cwd=workdir)
        poll(lambda: "v2" in words, 10, "the client to reach the new version")
    finally:
        stop.set()
        caller.join(timeout=10)
    assert second.returncode == 0, status_of(second)
    assert failures == []
    assert words == {"v1", "v2"}
    assert replica_pids(address, "keep") == pids["keep"]
    assert replica_pids(address, "gone") == pids["gone"]
    rolled = poll(lambda: _exactly(2, replica_pids(address, "change")), 10, "old replicas gone")
    assert not rolled & pids["change"]
    assert get(f"{base}/change").startswith("v2:")

    # An app deployed from Python (not from a file) is on the cluster too.
    script = "import serval, ops_app; serval.run(ops_app.echo({}), name='py', route_prefix='/py')"
    from_python = subprocess.run(
        [sys.executable, "-c", script],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=45,
        env={**_clean_env(), "SERVAL_ADDRESS": address, "PYTHONPATH": _pythonpath(workdir)},
    )
    assert from_python.returncode == 0, from_python.stderr
    assert get(f"{base}/py").startswith("echo:")

    # 3. drop an app from the file: it is deleted (404 on its route), and so is the app from
    # Python (the file is the whole set, as in Ray); the rest untouched
    write_config(cfg, [echo_app("keep", "k"), echo_app("change", "v2")])
    third = serval("deploy", str(cfg), "--address", address, cwd=workdir)
    assert third.returncode == 0, status_of(third)
    assert "deleting application 'gone'" in third.stderr
    assert "deleting application 'py'" in third.stderr
    assert replica_pids(address, "gone") == replica_pids(address, "py") == set()
    with pytest.raises(urllib.error.HTTPError) as missing_py:
        get(f"{base}/py")
    assert missing_py.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(f"{base}/gone")
    assert missing.value.code == 404
    assert replica_pids(address, "keep") == pids["keep"]
    assert replica_pids(address, "change") == rolled
    status = serval("status", "-o", "json", "--address", address, cwd=workdir)
    assert sorted(json.loads(status.stdout)["applications"]) == ["change", "keep"]


def test_deploy_bad_import_is_one_line_and_changes_nothing(
    workdir: Path, cluster: tuple[str, int]
) -> None:
    address, _ = cluster
    good = workdir / "good.json"  # (JSON, as a REST client sends it, is a config file too)
    good.write_text(json.dumps({"applications": [echo_app("keep", "k")]}))
    assert serval("deploy", str(good), "--address", address, cwd=workdir).returncode == 0
    pids = replica_pids(address, "keep")
    bad = write_config(
        workdir / "bad.yaml",
        [echo_app("keep", "k"), {"name": "x", "route_prefix": "/x", "import_path": "nope:app"}],
    )
    result = serval("deploy", str(bad), "--address", address, cwd=workdir)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("serval: error: ")
    assert "nope" in result.stderr and "Traceback" not in result.stderr + result.stdout
    assert replica_pids(address, "keep") == pids


@pytest.mark.timeout(90)
def test_status_table_shows_a_failed_constructor_and_json_matches_yaml(
    workdir: Path, cluster: tuple[str, int]
) -> None:
    address, _ = cluster
    cfg = write_config(
        workdir / "apps.yaml",
        [
            echo_app("fine", "f"),
            {"name": "bad", "route_prefix": "/bad", "import_path": "ops_app:broken"},
            {"name": "bad2", "route_prefix": "/bad2", "import_path": "ops_app:broken"},
        ],
    )
    deployed = serval("deploy", str(cfg), "--address", address, cwd=workdir)
    assert deployed.returncode == 1
    # progress lines (logged), then one error line
    errors = [line for line in deployed.stderr.splitlines() if "error" in line.lower()]
    assert errors == [deployed.stderr.splitlines()[-1]], deployed.stderr
    reason = "RuntimeError: no model file at /models/m.bin"
    assert errors[0] == (
        f"serval: error: application 'bad' failed to deploy: {reason}; "
        f"application 'bad2' failed to deploy: {reason}"
    )
    assert "Traceback" not in deployed.stderr

    table = serval("status", "--address", address, cwd=workdir)
    assert table.returncode == 0, table.stderr
    assert "\x1b[" not in table.stdout  # not a terminal: no colour codes
    rows = {line.split("│")[1].strip(): line for line in table.stdout.splitlines() if "│" in line}
    assert "DEPLOY_FAILED" in rows["bad"] and "UNHEALTHY" in rows["bad"]
    assert "RUNNING" in rows["fine"] and "2/2 running" in rows["fine"]
    why = table.stdout.split("Not running or not healthy, and why:\n", 1)[1].splitlines()
    # (a killed replica may still be listed as STOPPING for a moment)
    assert [line for line in why if not line.startswith("  replica ")] == [
        f"  deployment 'Broken' (application '{name}'), UNHEALTHY: {reason}"
        for name in ("bad", "bad2")
    ]

    assert "\x1b[" in _status_on_a_terminal(address, workdir)  # a terminal: colours

    as_yaml = serval("status", "-o", "yaml", "--address", address, cwd=workdir)
    as_json = serval("status", "-o", "json", "--address", address, cwd=workdir)
    assert as_yaml.returncode == as_json.returncode == 0
    data = json.loads(as_json.stdout)
    assert data == yaml.safe_load(as_yaml.stdout)
    broken = data["applications"]["bad"]["deployments"]["Broken"]
    assert broken["status"] == "UNHEALTHY"
    assert "RuntimeError: no model file at /models/m.bin" in broken["message"]


def _status_on_a_terminal(address: str, workdir: Path) -> str:
    """What `serval status` prints to a terminal (a pseudo-terminal here)."""
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "serval", "status", "--address", address],
            cwd=workdir,
            stdout=terminal,
            stderr=subprocess.PIPE,
            timeout=45,
            env={**_clean_env(), "TERM": "xterm-256color", "COLUMNS": "250"},
        )
        assert done.returncode == 0, done.stderr
        os.close(terminal)
        terminal = -1
        out = b""
        with contextlib.suppress(OSError):  # (EIO once everything written was read)
            while chunk := os.read(controller, 65536):
                out += chunk
        return out.decode(errors="replace")
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)


@pytest.mark.timeout(90)
def test_deploy_reports_progress_of_a_slow_constructor(
    workdir: Path, cluster: tuple[str, int]
) -> None:
    address, _ = cluster
    marker = str(workdir / "first-replica")
    cfg = write_config(
        workdir / "slow.yaml",
        [
            {
                "name": "s",
                "route_prefix": "/s",
                "import_path": "ops_app:slow",
                "args": {"marker": marker},
            }
        ],
    )
    deploying = subprocess.Popen(
        [sys.executable, "-m", "serval", "deploy", str(cfg), "--address", address],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
    )
    try:
        # meanwhile `serval status` names each starting replica and what it does
        def starting_rows() -> list[str] | None:
            table = serval("status", "--address", address, cwd=workdir)
            rows = [line for line in table.stdout.splitlines() if "  replica " in line]
            return rows if any("running its constructor for" in row for row in rows) else None

        rows = poll(starting_rows, 20, "status to show a replica in its constructor")
        assert all("STARTING" in row for row in rows), rows
        _, err = deploying.communicate(timeout=30)
    finally:
        if deploying.poll() is None:
            deploying.kill()
            deploying.wait()
    assert deploying.returncode == 0, err
    lines = err.splitlines()
    counts = [line.split(": ", 2)[-1] for line in lines if "replicas running" in line]
    assert counts[0].startswith("0/2 replicas running")
    assert any(c.startswith("1/2 replicas running") for c in counts), counts
    assert counts[-1] == "2/2 replicas running"
    assert len(counts) == len(set(counts))  # on change only
    waiting = [line for line in lines if "is running its constructor (for " in line]
    assert waiting, err
    assert all("replica " in line and "'Slow' (application 's')" in line for line in waiting)


def test_http_options_warned_about_only_when_they_differ(
    workdir: Path, cluster: tuple[str, int]
) -> None:
    address, port = cluster
    same = write_config(
        workdir / "same.yaml",
        [echo_app("a", "x")],
        proxy_location="EveryNode",
        http_options={"host": "127.0.0.1", "port": port},
    )
    result = serval("deploy", str(same), "--address", address, cwd=workdir)
    assert result.returncode == 0, status_of(result)
    assert "WARNING" not in result.stderr

    other = free_port()
    differ = write_config(
        workdir / "differ.yaml",
        [echo_app("a", "x")],
        http_options={"host": "127.0.0.1", "port": other, "root_path": ""},
    )
    result = serval("deploy", str(differ), "--address", address, cwd=workdir)
    assert result.returncode == 0, status_of(result)
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert f"port ({port} there, {other} asked)" in warnings[0]
    assert "host" not in warnings[0] and "root_path" not in warnings[0]


def _start_run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "serval", "run", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_clean_env(), **env},
    )


def _read_until_running(proc: subprocess.Popen[str]) -> list[str]:
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if "Ctrl-C to stop." in line:
            return seen
    raise AssertionError(f"serval run ended: {seen} {proc.stderr.read() if proc.stderr else ''}")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


@pytest.mark.timeout(120)
def test_run_uses_the_default_address_and_status_finds_it(workdir: Path) -> None:
    # A temp dir of its own: the default address (under it) is this test's alone.
    env = {"TMPDIR": tempfile.mkdtemp(prefix="d-")}
    default = os.path.join(env["TMPDIR"], f"serval-{os.getuid()}-default")
    port = free_port()
    first = _start_run(["ops_app:echo", "word=one", "--port", str(port)], workdir, env)
    second: subprocess.Popen[str] | None = None
    try:
        seen = _read_until_running(first)
        assert seen[0].startswith(f"started a serval cluster at {default} ")
        status = serval("status", cwd=workdir, env=env)  # no flags
        assert status.returncode == 0, status.stderr
        assert f"serval cluster at {default}" in status.stdout
        assert "default" in status.stdout and "2/2 running" in status.stdout

        # The default address is taken: a second `serval run` deploys to that cluster; the
        # same --port is not warned about, another one is
        second = _start_run(
            [
                "ops_app:echo",
                "word=two",
                "--name",
                "two",
                "--route-prefix",
                "/two",
                "--port",
                *[str(port)],
            ],
            workdir,
            env,
        )
        seen = _read_until_running(second)
        assert seen[0] == f"deploying to the serval cluster running at {default}\n"
        assert get(f"http://127.0.0.1:{port}/two").startswith("two:")
        err = _stop(second)
        assert "WARNING" not in err
        poll(lambda: not replica_pids(default, "two"), 15, "app 'two' to be deleted")
        assert replica_pids(default, "default")  # the first one's cluster and app live on

        other = free_port()
        second = _start_run(
            ["ops_app:echo", "--name", "three", "--route-prefix", "/3", "--port", str(other)],
            workdir,
            env,
        )
        _read_until_running(second)

        # `serval shutdown` from a third terminal: both `serval run`s end (the owner and the
        # one that only deployed to it), and nothing of the cluster is left
        stopped = serval("shutdown", "-y", cwd=workdir, env=env)
        assert stopped.returncode == 0, stopped.stderr
        errs = []
        for proc in (first, second):
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            assert f"the serval cluster at {default} was shut down" in out
            assert "Traceback" not in err
            errs.append(err)
        warned = [line for line in errs[1].splitlines() if "WARNING" in line]
        assert len(warned) == 1 and f"port ({port} there, {other} asked)" in warned[0]
        assert wait_gone(default) == []
        assert not os.path.exists(default)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in cluster_pids(default):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(90)
def test_run_at_a_new_address_starts_a_cluster_there(workdir: Path) -> None:
    address = os.path.join(tempfile.mkdtemp(prefix="new-"), "c")
    port = free_port()
    proc = _start_run(
        ["ops_app:echo", "word=new", "--address", address, "--port", str(port)], workdir, {}
    )
    try:
        seen = _read_until_running(proc)
        assert seen[0].startswith(f"started a serval cluster at {address} ")
        assert any(f"http://127.0.0.1:{port}/" in line for line in seen)
        assert get(f"http://127.0.0.1:{port}/").startswith("new:")
        status = serval("status", "-o", "yaml", "--address", address, cwd=workdir)
        assert yaml.safe_load(status.stdout)["applications"]["default"]["status"] == "RUNNING"
        err = _stop(proc)
        assert "ignored" not in err
        assert wait_gone(address) == []
        assert not os.path.exists(address)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in cluster_pids(address):
            os.kill(pid, signal.SIGKILL)


def test_http_options_compared_field_by_field(tmp_path: Path, monkeypatch: Any) -> None:
    from serval import _cli_deploy as cli
    from serval.config import HTTPOptions

    monkeypatch.chdir(tmp_path)
    key, cert = str(tmp_path / "k.pem"), str(tmp_path / "c.pem")
    running = HTTPOptions(port=8100, ssl_keyfile=key, ssl_certfile=cert)
    asked = HTTPOptions(port=8100, ssl_keyfile="k.pem", ssl_certfile="c.pem", root_path="/x")
    # a relative path names the same file as the cluster's absolute one; root_path differs
    names = ["port", "ssl_keyfile", "ssl_certfile", "root_path", "proxy_location"]
    found = {n: cli._compare(n, asked, running) for n in names}
    assert found == {
        "port": None,
        "ssl_keyfile": None,
        "ssl_certfile": None,
        "root_path": ("", "/x"),
        "proxy_location": None,
    }
    assert cli._compare("proxy_location", HTTPOptions(enabled=False), running) == (
        "EveryNode",
        "Disabled",
    )
    # a cluster without an HTTP proxy: only proxy_location is worth a word
    assert cli._compare("port", asked, None) is None
    assert cli._compare("proxy_location", asked, None) == ("Disabled", "EveryNode")


def test_the_same_code_has_the_same_version_in_two_processes(workdir: Path) -> None:
    """(cloudpickle names a class it pickles by value with an id drawn per process; the version
    must not depend on it, or every redeploy from a new process would restart every replica.)"""
    script = textwrap.dedent(
        """
        import ops_app
        from serval.deployment import build
        for app in (ops_app.echo({"word": "w"}), ops_app.broken):
            print(build(app, "a", "/a").deployments[0].version)
        """
    )

    def versions() -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=45,
            env={**_clean_env(), "PYTHONPATH": _pythonpath(workdir)},
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    first = versions()
    assert len(first) == 2 and first[0] != first[1]
    assert versions() == first
    (workdir / "ops_app.py").write_text(APP.replace('f"{self.word}:', 'f"{self.word}!'))
    changed = versions()
    assert changed[0] != first[0] and changed[1] == first[1]  # only Echo's code changed


@pytest.mark.timeout(90)
def test_deploy_no_wait_returns_before_the_replicas_run(
    workdir: Path, cluster: tuple[str, int]
) -> None:
    address, port = cluster
    slow = {"name": "s", "route_prefix": "/s", "import_path": "ops_app:slow"}
    cfg = write_config(workdir / "slow.yaml", [{**slow, "args": {"marker": str(workdir / "m")}}])
    deployed = serval("deploy", "--no-wait", str(cfg), "--address", address, cwd=workdir)
    assert deployed.returncode == 0, status_of(deployed)
    assert deployed.stdout == f"deploying 's' to {address}\n"
    status = json.loads(serval("status", "-o", "json", "--address", address, cwd=workdir).stdout)
    assert status["applications"]["s"]["status"] == "DEPLOYING"  # (its constructors take 4-6 s)

    def running() -> bool:
        out = serval("status", "-o", "json", "--address", address, cwd=workdir).stdout
        return bool(json.loads(out)["applications"]["s"]["status"] == "RUNNING")

    poll(running, 30, "app 's' running")
    assert get(f"http://127.0.0.1:{port}/s") == "slow"
