"""A local cluster owned by this process: its runtime directory, lifeline and controller.

The runtime directory is private (``mkdtemp`` makes it 0700) and holds every Unix socket of the
cluster. The owner keeps the lifeline's write end; when the owner exits, however it exits, the
controller and the replicas see the lifeline close and exit too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time

from serval._private import lifeline
from serval._private.backends.local import worker_argv
from serval._private.client import controller_path
from serval.config import HTTPOptions
from serval.exceptions import ServalError

_START_TIMEOUT_S = 30.0


class LocalCluster:
    def __init__(self, http_options: HTTPOptions) -> None:
        self.address = tempfile.mkdtemp(prefix="serval-")
        self._lifeline_r, self._lifeline_w = lifeline.create()
        self.controller = subprocess.Popen(
            worker_argv(
                "controller",
                os.path.basename(self.address),
                "--address",
                self.address,
                "--lifeline-fd",
                str(self._lifeline_r),
                "--http-options",
                http_options.to_json(),
            ),
            pass_fds=(self._lifeline_r,),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal reaches only the owner
        )
        os.close(self._lifeline_r)
        self._wait_for_controller()

    def _wait_for_controller(self) -> None:
        path = controller_path(self.address)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.controller.poll() is not None:
                self.close()
                raise ServalError(
                    f"the serval controller exited at start-up (code {self.controller.returncode})"
                )
            with socket.socket(socket.AF_UNIX) as probe:
                try:
                    probe.connect(path)
                    return
                except OSError:
                    time.sleep(0.002)
        self.close()
        raise ServalError(f"the serval controller did not start within {_START_TIMEOUT_S}s")

    def wait_stopped(self, timeout: float) -> None:
        try:
            self.controller.wait(timeout)
        except subprocess.TimeoutExpired:
            self.controller.kill()
            self.controller.wait()

    def close(self) -> None:
        """Cut the lifeline (every process of the cluster exits) and remove the directory."""
        if self.controller.poll() is None:
            self.controller.kill()
            self.controller.wait()
        with contextlib.suppress(OSError):
            os.close(self._lifeline_w)
        # Replicas exit on the closed lifeline; give them a moment so none is left behind
        # holding sockets in a directory that no longer exists.
        _wait_for_cluster_processes(self.address, timeout=5.0)
        shutil.rmtree(self.address, ignore_errors=True)


def _wait_for_cluster_processes(address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    marker = address.encode()
    while time.monotonic() < deadline:
        if not any(marker in _cmdline(pid) for pid in _pids()):
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
