"""The cluster and its host: the owner SIGKILLed while replicas are blocked, modules planted in
the current directory, and another Unix user poking at the cluster.

Each scenario's cluster is owned by a driver script in a process of its own (the cluster's
owner, as a user's script would be), so it can be killed, started from another directory, or
given a runtime directory where a second user could reach it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import serval
from chaos.harness import (
    Driver,
    Report,
    ScenarioSkipped,
    cluster_processes,
    first_lines,
    free_port,
    kill_all,
    ms,
    scenario,
)

# The goal: nothing outlives its owner by more than a few seconds.
OWNER_GONE_S = 5.0

# -- the owner SIGKILLed while its replicas are blocked ------------------------------------------

BLOCKED_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    import serval as serve
    from serval._private.caller import runtime

    markers = sys.argv[2]
    serve.start(http_options={"port": int(sys.argv[1])})

    @serve.deployment
    class AsyncBlocked:
        async def __call__(self):
            open(os.path.join(markers, "async"), "w").close()
            time.sleep(1000)  # blocks the replica's event loop

    @serve.deployment
    class SyncBlocked:
        def __call__(self):
            open(os.path.join(markers, "sync"), "w").close()
            time.sleep(1000)  # blocks a worker thread

    pending = [
        serve.run(AsyncBlocked.bind(), name="a", route_prefix="/a").remote(),
        serve.run(SyncBlocked.bind(), name="s", route_prefix="/s").remote(),
    ]
    deadline = time.monotonic() + 20
    while len(os.listdir(markers)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    print("READY", runtime.address(), flush=True)
    time.sleep(1000)
    """
)


def driver_kill(rounds: int = 5) -> Report:
    """SIGKILL the owner while one replica's event loop and another's worker thread are blocked
    in time.sleep(1000): 5 s later no process of the cluster is left, nor its runtime
    directory."""
    with scenario("driver SIGKILL with blocked replicas", f"{rounds} rounds") as report:
        gone_after, dir_gone_after, left, files = [], [], [], []
        counts: list[int] = []
        for _ in range(rounds):
            markers = tempfile.mkdtemp(prefix="chaos-markers-")
            driver = Driver(BLOCKED_DRIVER, [str(free_port()), markers], cwd=markers)
            address = driver.ready
            try:
                if address is None:
                    raise AssertionError(f"the driver did not start:\n{driver.stderr()[-3000:]}")
                counts.append(len(cluster_processes(address)))
                killed = time.monotonic()
                os.kill(driver.proc.pid, signal.SIGKILL)
                driver.proc.wait()
                t_procs = t_dir = None
                while time.monotonic() - killed < OWNER_GONE_S:
                    now = time.monotonic() - killed
                    if t_procs is None and not cluster_processes(address):
                        t_procs = now
                    if t_dir is None and not os.path.exists(address):
                        t_dir = now
                    if t_procs is not None and t_dir is not None:
                        break
                    time.sleep(0.01)
                gone_after.append(t_procs)
                dir_gone_after.append(t_dir)
                left += list(cluster_processes(address).values())
                if os.path.exists(address):
                    files += [str(p.relative_to(address)) for p in Path(address).rglob("*")] or [
                        "."
                    ]
            finally:
                driver.stop()
                kill_all(address) if address else None
                if address:
                    shutil.rmtree(address, ignore_errors=True)
                shutil.rmtree(markers, ignore_errors=True)
        report.figure("processes of the cluster before the kill", ", ".join(map(str, counts)))
        report.figure("all processes gone after", _times(gone_after), "ms")
        report.figure("runtime directory gone after", _times(dir_gone_after), "ms")
        report.check(
            f"0 processes left {OWNER_GONE_S:g} s after the owner's SIGKILL",
            not left,
            len(left),
            first_lines(left),
        )
        report.check(
            f"0 files left {OWNER_GONE_S:g} s after the owner's SIGKILL (runtime dir gone)",
            not files,
            len(files),
            first_lines(files, 10),
        )
    return report


def _times(values: list[float | None]) -> str:
    return ", ".join("never" if v is None else f"{ms(v):.0f}" for v in values)


# -- modules planted in the current directory (or on PYTHONPATH) -----------------------------

PLANTED = ("httptools", "uvloop", "http", "websockets", "cloudpickle", "serval")

# A planted module notes who imported it; then, in a serval process, either fails (crash=True)
# or hands over to the real module, so the process keeps working and the next one shows too.
PLANTED_SOURCE = """
import os, sys
with open("/proc/self/cmdline", "rb") as _f:
    _cmd = _f.read().replace(b"\\0", b" ").decode(errors="replace")
with open(os.path.join({markers!r}, __name__ + "." + str(os.getpid())), "w") as _f:
    _f.write(_cmd)
if {crash!r} and "serval::" in _cmd:
    _who = _cmd[_cmd.index("serval::") :]
    raise RuntimeError("planted " + __name__ + ".py was imported by " + _who)
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
del sys.modules[__name__]
import importlib
sys.modules[__name__] = importlib.import_module(__name__)
"""

SHADOW_DRIVER = textwrap.dedent(
    """
    import json, sys, time, urllib.request
    import serval as serve
    from serval._private.caller import runtime

    port = int(sys.argv[1])
    started = time.monotonic()
    error = None
    try:
        serve.start(http_options={"port": port})

        @serve.deployment
        class Hello:
            async def __call__(self, request=None):
                return "hello"

            def sync(self):
                return "sync hello"

        handle = serve.run(Hello.bind())
        assert handle.remote().result(timeout_s=10) == "hello"
        assert handle.sync.remote().result(timeout_s=10) == "sync hello"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        assert body == b"hello", body
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:3000]
    took = time.monotonic() - started
    outcome = {"address": runtime.address(), "error": error, "took": took}
    print("READY", json.dumps(outcome), flush=True)
    sys.stdin.readline()
    serve.shutdown()
    """
)


def shadowing(crash: bool = False, where: str = "cwd", start_timeout_s: float = 30.0) -> Report:
    """Start a cluster with httptools.py, uvloop.py, http.py, websockets.py, cloudpickle.py and
    serval.py planted ``where``: "cwd" (the directory the driver runs in; its script lives
    elsewhere) or "pythonpath" (a directory on the driver's PYTHONPATH).

    From the cwd no serval process imports any of them, and the cluster serves handles and
    HTTP; with ``crash`` (the planted modules raise in serval processes) too. PYTHONPATH is the
    user's code path, so replicas may import from it, but the controller and the proxy never
    do: the cluster serves (passing-through modules), or (crashing ones) ``serve.run`` fails
    with a clear error naming the planted module, promptly, never a hang."""
    kind = "crashing ones" if crash else "passing through"
    place = "in the cwd" if where == "cwd" else "on PYTHONPATH"
    with scenario(
        f"planted modules {place} ({kind})", ", ".join(f"{m}.py" for m in PLANTED)
    ) as report:
        work = Path(tempfile.mkdtemp(prefix="chaos-shadow-"))
        cwd, path, markers, scripts = (work / d for d in ("cwd", "path", "markers", "script"))
        for d in (cwd, path, markers, scripts):
            d.mkdir()
        planted = cwd if where == "cwd" else path
        for name in PLANTED:
            (planted / f"{name}.py").write_text(
                PLANTED_SOURCE.format(markers=str(markers), crash=crash)
            )
        env = {}
        if where == "pythonpath":  # first on the user's path, which may hold more already
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(path), os.environ.get("PYTHONPATH")) if p
            )
        driver = Driver(
            SHADOW_DRIVER,
            [str(free_port())],
            cwd=str(cwd),
            env=env,
            timeout=start_timeout_s,
            script_dir=str(scripts),
        )
        outcome = json.loads(driver.ready) if driver.ready else None
        address = outcome["address"] if outcome else None
        try:
            if outcome is None:
                report.check(
                    f"serve.start + serve.run answer within {start_timeout_s:g} s",
                    False,
                    "hung",
                    driver.stderr()[-3000:],
                )
            elif where == "pythonpath" and crash:
                error = outcome["error"] or ""
                report.check(
                    "serve.run fails (DeploymentFailedError), never hangs",
                    error.startswith("DeploymentFailedError"),
                    f"{outcome['took']:.1f} s",
                    error or "no error",
                )
                said = error + driver.stderr()
                report.check(
                    "the error or the log names the planted module", "planted" in said, detail=error
                )
            else:
                report.check(
                    "the cluster starts and serves (handle, def, HTTP)",
                    outcome["error"] is None,
                    f"{ms(outcome['took']):.0f} ms",
                    outcome["error"] or "",
                )
            if outcome is not None:
                assert driver.proc.stdin is not None
                driver.proc.stdin.write("\n")
                driver.proc.stdin.flush()
                driver.proc.wait(timeout=30)
        finally:
            driver.stop()
            left = kill_all(address) if address else []
        _judge_imports(
            report, markers, allowed="serval::replica" if where == "pythonpath" else None
        )
        report.check("no process left", not left, len(left), first_lines(left))
        shutil.rmtree(work, ignore_errors=True)
    return report


def _judge_imports(report: Report, markers: Path, allowed: str | None) -> None:
    imports = []
    for marker in sorted(markers.iterdir()):
        module = marker.name.rsplit(".", 1)[0]
        cmd = marker.read_text()
        if "serval::" in cmd:
            imports.append((module, cmd[cmd.index("serval::") :].split(" --", 1)[0]))
    ok = {
        f"{m}.py by {who.split('#')[0]}"
        for m, who in imports
        if allowed and who.startswith(allowed)
    }
    bad = sorted(
        {
            f"{m}.py imported by {who}"
            for m, who in imports
            if not (allowed and who.startswith(allowed))
        }
    )
    if allowed:
        report.figure(
            "imported by replicas (the user's path: allowed)", ", ".join(sorted(ok)) or "none"
        )
    target = "no serval process" if allowed is None else "neither the controller nor the proxy"
    report.check(f"{target} imports a planted module", not bad, len(bad), first_lines(bad, 12))


# -- another Unix user ----------------------------------------------------------------------

OWNED_DRIVER = textwrap.dedent(
    """
    import sys
    import serval as serve
    from serval._private.caller import runtime

    serve.start(http_options={"port": int(sys.argv[1])})

    @serve.deployment
    def hello():
        return "hello"

    serve.run(hello.bind())
    print("READY", runtime.address(), flush=True)
    sys.stdin.readline()
    """
)

# Run as the other user (any Python 3): what can it do to the cluster at argv[1]?
PROBE = textwrap.dedent(
    """
    import json, os, socket, sys
    address, sockets = sys.argv[1], sys.argv[2:]
    out = {}
    def attempt(what, fn):
        try:
            fn()
            out[what] = "allowed"
        except PermissionError:
            out[what] = "denied"
        except OSError as exc:
            out[what] = f"{type(exc).__name__}: {exc}"
    attempt("list the runtime dir", lambda: os.listdir(address))
    for path in sockets:
        def connect(path=path):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
        attempt("connect " + os.path.relpath(path, address), connect)
    print(json.dumps(out))
    """
)


def other_user() -> Report:
    """A second Unix user cannot list the cluster's runtime directory nor connect to any of
    its sockets, and ``serval status --address <dir>`` run by that user says "permission
    denied". The runtime directory sits in a directory that user can reach (as /tmp is)."""
    with scenario("another Unix user") as report:
        if os.geteuid() != 0:
            raise ScenarioSkipped("needs root, to create a second Unix user")
        if not (shutil.which("useradd") and shutil.which("userdel") and shutil.which("setpriv")):
            raise ScenarioSkipped("needs useradd, userdel and setpriv")
        name = f"svchaos{os.getpid() % 100000}"
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        parent = f"{tempfile.gettempdir().rstrip('/')}-shared-{name}"
        driver = None
        address = None
        try:
            user = pwd.getpwnam(name)
            as_user = [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
                "--",
            ]
            python, env = _python_for(as_user)
            os.mkdir(parent, 0o755)
            os.chmod(parent, 0o755)
            driver = Driver(OWNED_DRIVER, [str(free_port())], cwd=parent, env={"TMPDIR": parent})
            address = driver.ready
            if address is None:
                raise AssertionError(f"the driver did not start:\n{driver.stderr()[-3000:]}")
            sockets = [str(p) for p in Path(address).rglob("*") if p.is_socket()]
            report.figure(
                "runtime directory", f"{address} (mode {os.stat(address).st_mode & 0o777:o})"
            )
            report.figure("its sockets", len(sockets))
            probe = subprocess.run(
                [*as_user, python, "-c", PROBE, address, *sockets],
                capture_output=True,
                text=True,
                env=env,
                cwd="/",
                timeout=30,
                check=False,
            )
            results = json.loads(probe.stdout) if probe.returncode == 0 else {}
            report.check(
                "the probe ran as the other user",
                probe.returncode == 0,
                probe.returncode,
                probe.stderr[-2000:],
            )
            allowed = [what for what, how in results.items() if how != "denied"]
            report.check(
                "every socket and the directory listing denied",
                bool(results) and not allowed,
                f"{len(results) - len(allowed)}/{len(results)}",
                first_lines(f"{w}: {results[w]}" for w in allowed),
            )
            status = subprocess.run(
                [*as_user, python, "-m", "serval", "status", "--address", address],
                capture_output=True,
                text=True,
                env=env,
                cwd="/",
                timeout=60,
                check=False,
            )
            said = (status.stdout + status.stderr).strip()
            report.check(
                "`serval status --address` as that user says permission denied",
                "permission denied" in said.lower() and status.returncode != 0,
                f"exit {status.returncode}",
                said[-1500:],
            )
        finally:
            if driver is not None:
                driver.stop()
            if address:
                kill_all(address)
            shutil.rmtree(parent, ignore_errors=True)
            subprocess.run(["userdel", name], capture_output=True, check=False)
    return report


def _python_for(as_user: list[str]) -> tuple[str, dict[str, str]]:
    """A Python of this version the other user can run, and an environment in which it finds
    serval and its dependencies (this interpreter's may sit in a directory only root enters)."""
    paths = [str(Path(serval.__file__).parent.parent), *site.getsitepackages()]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/", "TMPDIR": "/tmp", "PYTHONPATH": ":".join(paths)}
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for python in (sys.executable, f"/usr/bin/python{version}", "/usr/bin/python3"):
        if not os.path.exists(python):
            continue
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            ran = subprocess.run(
                [*as_user, python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                env=env,
                cwd="/",
                timeout=30,
                check=False,
            )
            if ran.returncode == 0 and ran.stdout.strip() == version:
                return python, env
    raise ScenarioSkipped(f"no Python {version} that the other user can run")
