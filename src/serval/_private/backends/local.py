"""The local backend: every replica is an OS process on this machine.

Replicas listen on Unix sockets in the cluster's private runtime directory (mode 0700) and
inherit the owner's lifeline, so they exit with the owner. They run in the controller's session,
not the terminal's, so Ctrl-C reaches only the owner, which then shuts the cluster down.

What a serval process may import: nothing from the directory it was started in (``-P``: a
``uvloop.py`` or ``http.py`` in the user's current directory must not run in the proxy). The
controller, the proxy and the daemon see none of the user's ``PYTHONPATH`` either, only the
entries serval itself was installed through; replicas get the user's ``PYTHONPATH`` (and, from
the deploy, the driver's ``sys.path``), which travels through the others in
``SERVAL_USER_PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from serval._private.backends.base import Backend, Exit, HostRef, ReplicaHost
from serval._private.process import procs
from serval._private.process.settings import (
    PASSWORD_ENV,
    USER_PYTHONPATH_VAR,
    http_options_argv,
    settings,
)
from serval._private.telemetry import log_files
from serval._private.wire import layout
from serval.config import DeploymentConfig


def worker_argv(role: str, label: str, *args: str) -> list[str]:
    """The command line of a serval process; ``ps`` shows its role and name. ``-P``: the
    current directory is not put first on ``sys.path``, as ``-m`` would."""
    return [
        sys.executable,
        "-P",
        "-m",
        "serval._private.process.worker",
        f"serval::{role}",
        label,
        *args,
    ]


def system_env(user_pythonpath: str | None) -> dict[str, str]:
    """The environment of the controller, the proxy and the daemon: this process's, with only
    serval's own entries of ``PYTHONPATH``; the user's travels on for the replicas."""
    env = dict(os.environ)
    env.pop(USER_PYTHONPATH_VAR, None)
    own = own_pythonpath(env.pop("PYTHONPATH", None))
    if own:
        env["PYTHONPATH"] = own
    if user_pythonpath:
        env[USER_PYTHONPATH_VAR] = user_pythonpath
    return env


def replica_env(user_pythonpath: str | None, extra: dict[str, str] | None) -> dict[str, str]:
    """A replica's environment: this process's, with the user's ``PYTHONPATH`` back."""
    env = dict(os.environ)
    env.pop(USER_PYTHONPATH_VAR, None)
    env.pop("PYTHONPATH", None)
    env.pop(PASSWORD_ENV, None)  # the proxy's secret, not the user's code's
    if user_pythonpath:
        env["PYTHONPATH"] = user_pythonpath
    return {**env, **extra} if extra else env


def own_pythonpath(pythonpath: str | None) -> str:
    """The entries of ``pythonpath`` serval needs to be imported: the one it was found through
    and those holding installed distributions (its dependencies may be among them), made
    absolute; a directory of the user's sources is left out."""
    if not pythonpath:
        return ""
    # where the serval package is found: src/serval/_private/backends/local.py, four up
    home = str(Path(__file__).resolve().parents[3])
    kept = []
    for entry in pythonpath.split(os.pathsep):
        path = os.path.abspath(entry) if entry else ""
        if path and path not in kept and (path == home or _holds_distributions(path)):
            kept.append(path)
    return os.pathsep.join(kept)


def _holds_distributions(path: str) -> bool:
    try:
        return any(name.endswith(".dist-info") for name in os.listdir(path))
    except OSError:
        return False


class LocalProcess(ReplicaHost):
    """A replica (or the proxy) as an OS process, watched through a pidfd.

    Either a child this process started (``proc``), or a process adopted after a controller
    restart, whose exit code nobody here can read. Its ``ref`` is its pid with its start time
    (a pid alone may be reused by another process).
    """

    def __init__(
        self, host_id: str, proc: subprocess.Popen[bytes] | None, pid: int | None = None
    ) -> None:
        self.host_id = host_id
        self._proc = proc
        found = proc.pid if proc is not None else pid
        assert found is not None
        self._pid = found
        self._started = procs.start_time(found)
        self._done: asyncio.Future[Exit] = asyncio.get_running_loop().create_future()
        self._poller: asyncio.Task[None] | None = None
        self._watch()

    @property
    def ref(self) -> HostRef:
        return {"pid": self._pid, "started": self._started}

    def kill(self) -> None:
        if not self._done.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: what the owner uses to stop a controller (the others drain on message)."""
        if not self._done.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGTERM)

    async def wait(self) -> Exit:
        return await asyncio.shield(self._done)

    def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(self._pid)
        except ProcessLookupError:
            self._reap()
            return
        except (AttributeError, OSError):
            self._poller = loop.create_task(self._poll())
            return

        def readable() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._reap()

        loop.add_reader(pidfd, readable)

    async def _poll(self) -> None:
        # No pidfd on this platform: look every 100 ms (nothing would wake us on exit).
        while self._alive():  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        self._reap()

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return procs.is_alive(self._pid, self._started)

    def _reap(self) -> None:
        code = self._proc.wait() if self._proc is not None else None
        if not self._done.done():
            self._done.set_result(Exit(code, procs.exit_reason(code)))


def local_limits(config: DeploymentConfig) -> str | None:
    """What of a deployment's options only a Ray cluster honours."""
    if config.placement_group_bundles is not None:
        return "placement_group_bundles needs the Ray backend (placement groups are Ray's)"
    if config.max_replicas_per_node is not None:
        return "max_replicas_per_node needs the Ray backend (the local backend has one node)"
    runtime_env = config.ray_actor_options.get("runtime_env") or {}
    others = sorted(set(runtime_env) - {"env_vars"})
    if others:
        return (
            f"runtime_env {', '.join(others)} needs the Ray backend (on this machine, install "
            "packages in serval's own environment; env_vars work everywhere)"
        )
    return None


class LocalBackend(Backend):
    name = "local"

    def __init__(
        self, address: str, lifeline_fd: int | None, user_pythonpath: str | None = None
    ) -> None:
        self.address = address
        self.lifeline_fd = lifeline_fd
        self.user_pythonpath = user_pythonpath
        # (mkdir, not makedirs: never re-create a runtime directory that is gone, unprivately)
        with contextlib.suppress(FileExistsError):
            os.mkdir(layout.replicas_dir(address), 0o700)

    @classmethod
    def for_controller(cls, address: str, lifeline_fd: int | None) -> LocalBackend:
        return cls(address, lifeline_fd, settings().user_pythonpath)

    def log_location(self) -> str:
        # replicas and the proxy inherit our standard error, and write a file each
        directory = log_files.logs_dir(self.address)
        where = procs.output_location()
        return where if directory is None else f"{directory} (and {where})"

    def replica_address(self, replica_id: str) -> str:
        return layout.replica_path(self.address, replica_id)

    def unsupported(self, config: DeploymentConfig) -> str | None:
        return local_limits(config)

    def start_replica(
        self,
        replica_id: str,
        label: str,
        env: dict[str, str] | None = None,
        config: DeploymentConfig | None = None,
    ) -> ReplicaHost:
        env = replica_env(self.user_pythonpath, env)
        return self._spawn("replica", label, replica_id, ["--replica-id", replica_id], env)

    def adopt(self, host_id: str, ref: HostRef) -> ReplicaHost | None:
        pid, started = ref.get("pid"), ref.get("started")
        if type(pid) is not int or not procs.is_alive(pid, started):
            return None  # gone, or its pid now another process's
        # (the same process, of this cluster, and the host it was: its command line says so)
        if not procs.names(pid, self.address) or host_id.encode() not in procs.cmdline(pid):
            return None
        return LocalProcess(host_id, None, pid)

    def start_proxy(self, http_options_json: str, node: str = "") -> ReplicaHost:
        label = os.path.basename(self.address)
        # (the key's password, if any, is in this process's environment, which it inherits)
        args = ["--http-options", http_options_argv(http_options_json)]
        # (no user PYTHONPATH to carry on: the proxy starts nothing)
        return self._spawn("proxy", label, "serval::proxy", args, system_env(None))

    def _spawn(
        self,
        role: str,
        label: str,
        host_id: str,
        extra: list[str],
        env: dict[str, str],
    ) -> ReplicaHost:
        args = ["--address", self.address, *extra]
        fds: tuple[int, ...] = ()
        if self.lifeline_fd is not None:
            args += ["--lifeline-fd", str(self.lifeline_fd)]
            fds = (self.lifeline_fd,)
        proc = subprocess.Popen(
            worker_argv(role, label, *args),
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        return LocalProcess(host_id, proc)
