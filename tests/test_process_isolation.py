"""What serval's processes import, and what user code can do to them.

Modules planted in the driver's current directory (``httptools.py``, ``uvloop.py``, ``http.py``
...) run in no serval process; the user's PYTHONPATH reaches the replicas only, never the
controller or the proxy; a deployment's own module beside the driver script is importable by its
replicas. ``SystemExit`` or ``KeyboardInterrupt`` raised in an ``async def`` method reaches the
caller as from a ``def`` method, and the replica serves on."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

import serval as serve
from conftest import free_port, replica_pids, serval_processes

USER_PYTHONPATH_VAR = "SERVAL_USER_PYTHONPATH"  # serval._private.process.settings

# Each planted module records which process imported it, then fails to import.
PLANTED = textwrap.dedent(
    """
    import os, sys
    _path = os.path.join({markers!r}, __name__ + "-" + str(os.getpid()))
    with open(_path, "w") as _f:
        _f.write(" ".join(sys.orig_argv))
    raise ImportError("planted module " + __name__ + " was imported")
    """
)
# Names serval's processes import (stdlib and dependencies), and serval itself.
SHADOWS = ["httptools", "uvloop", "http", "websockets", "asyncio", "cloudpickle", "serval"]
USER_PATH_SHADOWS = ["httptools", "websockets"]  # the proxy imports them; replicas do not

DRIVER = textwrap.dedent(
    """
    import json, os, sys
    import serval as serve
    from serval._private.caller import runtime

    http, dashboard = int(sys.argv[1]), int(sys.argv[2])
    serve.start(http_options={"port": http}, dashboard_options={"port": dashboard})

    @serve.deployment
    class Model:
        def __call__(self, request=None):
            import mymodel  # beside this script
            import userlib  # on the PYTHONPATH
            return {"answer": mymodel.answer(), "lib": userlib.NAME, "cwd": os.getcwd(),
                    "pythonpath": os.environ.get("PYTHONPATH")}

        async def from_async(self):
            import mymodel
            return mymodel.answer()

    handle = serve.run(Model.bind(), route_prefix="/m")
    print(json.dumps({"address": runtime.address(), "call": handle.remote().result(),
                      "async": handle.from_async.remote().result()}), flush=True)
    sys.stdin.readline()
    serve.shutdown()
    """
)


def _plant(directory: Path, names: list[str], markers: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / f"{name}.py").write_text(PLANTED.format(markers=str(markers)))


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().partition("=")[::2] for e in raw if b"=" in e)


def _serval_markers(markers: Path) -> list[str]:
    """The planted modules a serval process imported: 'module <- command line'."""
    found = []
    for entry in markers.iterdir():
        cmd = entry.read_text()
        if "serval::" in cmd:
            found.append(f"{entry.name} <- {cmd}")
    return found


def test_no_serval_process_imports_from_the_cwd_or_the_users_pythonpath(tmp_path: Path) -> None:
    markers, app, cwd, userlib = (tmp_path / d for d in ("markers", "app", "cwd", "userlib"))
    markers.mkdir()
    _plant(cwd, SHADOWS, markers)
    _plant(userlib, USER_PATH_SHADOWS, markers)
    (userlib / "userlib.py").write_text("NAME = 'userlib'\n")
    app.mkdir()
    (app / "driver.py").write_text(DRIVER)
    (app / "mymodel.py").write_text("def answer():\n    return 42\n")
    port = free_port()
    pythonpath = os.pathsep.join(filter(None, [str(userlib), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, str(app / "driver.py"), str(port), str(free_port())],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": pythonpath},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            pytest.fail(f"the driver failed:\n{proc.communicate(timeout=10)[1]}")
        report = json.loads(line)
        call = report["call"]
        assert call == {
            "answer": 42,
            "lib": "userlib",
            "cwd": str(cwd),  # replicas work in the driver's directory ...
            "pythonpath": pythonpath,  # ... with the user's PYTHONPATH
        }
        assert report["async"] == 42
        r = httpx.get(f"http://127.0.0.1:{port}/m", timeout=10)
        assert r.status_code == 200 and r.json()["answer"] == 42

        processes = serval_processes(report["address"])
        roles = {pid: cmd.split("serval::", 1)[1].split()[0] for pid, cmd in processes}
        assert sorted(roles.values()) == ["controller", "dashboard", "proxy", "replica"], roles
        for pid, role in roles.items():
            env = _environ(pid)
            if role == "replica":
                assert env.get("PYTHONPATH") == pythonpath
                continue
            # Nothing of the user's code path; the controller carries it, unused, for the
            # replicas it starts, and the dashboard for the deploys its REST API's PUT runs.
            assert str(userlib) not in env.get("PYTHONPATH", ""), (role, env["PYTHONPATH"])
            carried = env.get(USER_PYTHONPATH_VAR)
            carries = role in ("controller", "dashboard")
            assert carried == (pythonpath if carries else None), (role, carried)
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.close()
            proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert _serval_markers(markers) == []


def test_serval_start_daemon_does_not_import_from_the_cwd(tmp_path: Path) -> None:
    markers, cwd = tmp_path / "markers", tmp_path / "cwd"
    markers.mkdir()
    _plant(cwd, SHADOWS, markers)
    address = os.path.join(tempfile.mkdtemp(prefix="iso-"), "c")  # short: socket paths
    serval = [os.path.join(os.path.dirname(sys.executable), "serval")]
    port = str(free_port())

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*serval, *args, "--address", address],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )

    started = cli("start", "--port", port, "--dashboard-port", str(free_port()))
    try:
        assert started.returncode == 0, started.stderr
        status = cli("status", "-o", "yaml")
        assert status.returncode == 0 and "applications: {}" in status.stdout, status
        roles = sorted(c.split("serval::", 1)[1].split()[0] for _, c in serval_processes(address))
        assert roles == ["controller", "daemon", "dashboard", "proxy"], roles
        assert httpx.get(f"http://127.0.0.1:{port}/-/healthz", timeout=10).status_code == 200
    finally:
        stopped = cli("shutdown", "-y")
        for pid, _ in serval_processes(address):  # only if the shutdown failed
            os.kill(pid, signal.SIGKILL)
    assert stopped.returncode == 0, stopped.stderr
    assert _serval_markers(markers) == []


@serve.deployment(max_ongoing_requests=20)
class Exits:
    def def_exit(self) -> None:
        raise SystemExit(3)

    async def async_exit(self, delay: float = 0.0) -> None:
        await asyncio.sleep(delay)
        raise SystemExit(4)

    async def async_interrupt(self) -> None:
        raise KeyboardInterrupt

    async def slow(self, delay: float) -> int:
        await asyncio.sleep(delay)
        return os.getpid()

    def pid(self) -> int:
        return os.getpid()


def _raised(call: Any) -> BaseException:
    try:
        call.result(timeout_s=10)
    except BaseException as exc:
        return exc
    raise AssertionError("the call did not raise")


def test_system_exit_from_an_async_method_reaches_the_caller(serve_instance: Any) -> None:
    handle = serve.run(Exits.bind())
    pid = handle.pid.remote().result(timeout_s=10)
    from_def = _raised(handle.def_exit.remote())
    from_async = _raised(handle.async_exit.remote())
    assert type(from_async) is type(from_def), (from_def, from_async)
    assert "3" in str(from_def) and "4" in str(from_async)  # the exit code travels
    interrupted = _raised(handle.async_interrupt.remote())
    assert "KeyboardInterrupt" in f"{type(interrupted).__name__} {interrupted!r}"
    assert handle.pid.remote().result(timeout_s=10) == pid

    # Calls in flight on the replica's loop when one raises SystemExit all finish.
    slow = [handle.slow.remote(0.3) for _ in range(10)]
    exits = [handle.async_exit.remote(0.1) for _ in range(5)]
    assert [r.result(timeout_s=10) for r in slow] == [pid] * 10
    for r in exits:
        assert type(_raised(r)) is type(from_def)
    assert list(replica_pids("default", "Exits").values()) == [pid]
    status = serve.status().applications["default"].deployments["Exits"]
    assert status.replica_states == {"RUNNING": 1}
