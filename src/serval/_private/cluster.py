"""A local cluster owned by this process: its runtime directory, lifeline and controller.

The runtime directory is private (0700) and holds every Unix socket of the cluster. The owner
keeps the lifeline's write end; when the owner exits, however it exits, the controller, the
proxy and the replicas see the lifeline close and exit too. The owner also watches the
controller: if it dies without being asked to, a new one is started that re-reads the
checkpoint and adopts the replicas that are still alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time

from serval._private import lifeline
from serval._private.backends.local import worker_argv
from serval._private.client import controller_path
from serval.config import HTTPOptions
from serval.exceptions import ServalError

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 30.0
_RESTART_DELAY_S = 0.2


def default_address() -> str:
    """The runtime directory of the per-user default cluster (``serval start``)."""
    return os.path.join(tempfile.gettempdir(), f"serval-{os.getuid()}-default")


def is_running(address: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(controller_path(address))
        except OSError:
            return False
    return True


def make_private_dir(address: str | None) -> str:
    """Create the runtime directory (0700), or check that an existing one is private and ours."""
    if address is None:
        return tempfile.mkdtemp(prefix="serval-")
    try:
        os.mkdir(address, 0o700)
    except FileExistsError:
        info = os.lstat(address)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise ServalError(f"{address} exists and is not a directory of this user") from None
        if stat.S_IMODE(info.st_mode) & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise ServalError(f"{address} is not private (mode {mode:o})") from None
    return address


class LocalCluster:
    def __init__(self, http_options: HTTPOptions, address: str | None = None) -> None:
        self.address = make_private_dir(address)
        self.http_options = http_options
        self._lifeline_r, self._lifeline_w = lifeline.create()
        self._stopping = False
        self._lock = threading.Lock()
        self.controller = self._spawn_controller(recover=False)
        self._wait_for_controller()
        self.stopped = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="serval-owner", daemon=True)
        self._watcher.start()

    def _spawn_controller(self, recover: bool) -> subprocess.Popen[bytes]:
        args = [
            "--address",
            self.address,
            "--lifeline-fd",
            str(self._lifeline_r),
            "--http-options",
            self.http_options.to_json(),
        ]
        if recover:
            args.append("--recover")
        return subprocess.Popen(
            worker_argv("controller", os.path.basename(self.address), *args),
            pass_fds=(self._lifeline_r,),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal reaches only the owner
        )

    def _watch(self) -> None:
        """Restart a controller that died unasked; return when one exits cleanly."""
        while True:
            code = self.controller.wait()
            with self._lock:
                if self._stopping or code == 0:
                    break
                logger.warning("the serval controller died (code %s); restarting it", code)
                time.sleep(_RESTART_DELAY_S)
                self.controller = self._spawn_controller(recover=True)
        self.stopped.set()

    def _wait_for_controller(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.controller.poll() is not None:
                self.close()
                raise ServalError(
                    f"the serval controller exited at start-up (code {self.controller.returncode})"
                )
            if is_running(self.address):
                return
            time.sleep(0.002)
        self.close()
        raise ServalError(f"the serval controller did not start within {_START_TIMEOUT_S}s")

    def begin_shutdown(self) -> None:
        """From now on a controller exit is the end, not a crash."""
        with self._lock:
            self._stopping = True

    def wait_stopped(self, timeout: float) -> None:
        self.begin_shutdown()
        try:
            self.controller.wait(timeout)
        except subprocess.TimeoutExpired:
            self.controller.kill()
            self.controller.wait()

    def close(self) -> None:
        """Cut the lifeline (every process of the cluster exits) and remove the directory."""
        self.begin_shutdown()
        if self.controller.poll() is None:
            self.controller.kill()
            self.controller.wait()
        with contextlib.suppress(OSError):
            os.close(self._lifeline_w)
        with contextlib.suppress(OSError):
            os.close(self._lifeline_r)
        # Replicas exit on the closed lifeline; give them a moment so none is left behind
        # holding sockets in a directory that no longer exists.
        _wait_for_cluster_processes(self.address, timeout=5.0)
        shutil.rmtree(self.address, ignore_errors=True)


def _wait_for_cluster_processes(address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    marker = b"\0" + os.fsencode(address) + b"\0"  # a whole argument, not a prefix of one
    me = os.getpid()  # a daemon's own command line names the address too
    while time.monotonic() < deadline:
        if not any(marker in _cmdline(pid) for pid in _pids() if pid != me):
            return
        time.sleep(0.01)


def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
