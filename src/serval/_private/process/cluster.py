"""A local cluster owned by this process: its runtime directory, lifeline and controller.

The runtime directory is private (0700) and holds every Unix socket of the cluster. The owner
keeps the lifeline's write end; when the owner exits, however it exits, the controller, the
proxy and the replicas see the lifeline close and exit too. The owner also watches the
controller: if it dies without being asked to, a new one is started that re-reads the
checkpoint and adopts the replicas that are still alive. A controller that keeps dying is
restarted less and less often (0.2 s, doubled each time, up to 10 s), and reported as an error
after three deaths in a row; the replicas and the proxy serve on meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import threading
import time
from typing import Any

from serval._private.backends.local import system_env, worker_argv
from serval._private.process import lifeline, procs, rundir
from serval._private.process.dashboard import Dashboard, DashboardOptions
from serval._private.process.dashboard import bind as bind_dashboard
from serval._private.process.rundir import is_running
from serval._private.process.rundir import make_private as make_private_dir
from serval._private.process.settings import http_options_argv, http_options_env, settings
from serval._private.telemetry import log_files
from serval.config import HTTPOptions
from serval.exceptions import ServalError

__all__ = ["LocalCluster", "default_address", "is_ray_address", "is_running", "make_private_dir"]

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 30.0
_RESTART_DELAY_S = 0.2  # the first restart; doubled for each death in a row
_MAX_RESTART_DELAY_S = 10.0
_STABLE_S = 10.0  # a controller that ran this long before it died starts the count over
_FAILING_AFTER = 3  # deaths in a row that make it an error, not a warning


def is_ray_address(text: str) -> bool:
    """Whether ``text`` names a Ray cluster the way Ray's tools do (``auto``, ``ray://host:port``
    for a Ray client, ``host:port`` of the head node's GCS), rather than a local cluster's
    runtime directory."""
    if text == "auto" or text.startswith("ray://"):
        return True
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and "/" not in text)


def default_address() -> str:
    """The runtime directory of the per-user default cluster (``serval start``)."""
    return os.path.join(tempfile.gettempdir(), f"serval-{os.getuid()}-default")


class LocalCluster:
    def __init__(
        self,
        http_options: HTTPOptions,
        address: str | None = None,
        dashboard: DashboardOptions | None = None,
        logging: dict[str, Any] | None = None,
    ) -> None:
        _clear_the_way(address)
        # Bound first: a dashboard port asked for and taken fails before anything starts.
        dashboard_socket = bind_dashboard(dashboard or DashboardOptions())
        try:
            self.address = make_private_dir(address)
            rundir.record_owner(self.address)
            self.logs_dir = log_files.new_session(self.address, logging)
        except BaseException:
            if dashboard_socket is not None:
                dashboard_socket.close()
            raise
        self.http_options = http_options
        self._user_pythonpath = settings().user_pythonpath
        self._lifeline_r, self._lifeline_w = lifeline.create()
        self._stopping = False
        self._stop_asked = threading.Event()
        self._lock = threading.Lock()
        # Set while the controller keeps dying; control calls of this process fail with it.
        self.controller_error: str | None = None
        self.controller = self._spawn_controller(recover=False)
        self.dashboard: Dashboard | None = None
        if dashboard_socket is not None:
            self.dashboard = Dashboard(
                self.address,
                dashboard or DashboardOptions(),
                dashboard_socket,
                self._lifeline_r,
                self._user_pythonpath,
            )
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
            http_options_argv(self.http_options.to_json()),  # (a password: in its env)
        ]
        if recover:
            args.append("--recover")
        return subprocess.Popen(
            worker_argv("controller", os.path.basename(self.address), *args),
            pass_fds=(self._lifeline_r,),
            stdin=subprocess.DEVNULL,
            env=http_options_env(system_env(self._user_pythonpath), self.http_options),
            start_new_session=True,  # Ctrl-C in the terminal reaches only the owner
        )

    def _watch(self) -> None:
        """Restart a controller that died unasked, with back-off; return when one exits
        cleanly or the cluster is shut down."""
        deaths = 0
        while True:
            try:
                code = self.controller.wait(_STABLE_S)
            except subprocess.TimeoutExpired:
                deaths = 0  # this one is up for good
                self.controller_error = None
                code = self.controller.wait()
            with self._lock:
                if self._stopping or code == 0:
                    break
            deaths += 1
            delay = min(_RESTART_DELAY_S * 2 ** (deaths - 1), _MAX_RESTART_DELAY_S)
            self._report_death(code, deaths, delay)
            if self._stop_asked.wait(delay):
                break
            with self._lock:
                if self._stopping:
                    break
                self.controller = self._spawn_controller(recover=True)
        self.stopped.set()

    def _report_death(self, code: int | None, deaths: int, delay: float) -> None:
        reason = procs.exit_reason(code)
        if deaths < _FAILING_AFTER:
            logger.warning("the serval controller died (%s); restarting it in %.1fs", reason, delay)
            return
        self.controller_error = (
            f"the serval controller keeps dying ({deaths} times in a row, last {reason}); "
            f"its log is in {self._log_places()}"
        )
        logger.error(
            "%s; restarting it in %.1fs (the replicas and the proxy serve on meanwhile)",
            self.controller_error,
            delay,
        )

    def _log_places(self) -> str:
        controller_log = os.path.join(self.logs_dir, "controller.log")
        return f"{controller_log} and {procs.output_location()}"

    def _wait_for_controller(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.controller.poll() is not None:
                self.close()
                raise ServalError(
                    "the serval controller exited at start-up "
                    f"({procs.exit_reason(self.controller.returncode)}); "
                    f"its log is in {self._log_places()}"
                )
            if is_running(self.address):
                return
            time.sleep(0.002)
        self.close()
        raise ServalError(
            f"the serval controller did not start within {_START_TIMEOUT_S}s; "
            f"its log is in {self._log_places()}"
        )

    def begin_shutdown(self) -> None:
        """From now on a controller exit is the end, not a crash."""
        with self._lock:
            self._stopping = True
        self._stop_asked.set()

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
        if self.dashboard is not None:
            self.dashboard.close()
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
        rundir.remove(self.address)


def _clear_the_way(address: str | None) -> None:
    """Remove what killed clusters of this user left behind; refuse a live address."""
    rundir.clean_stale()
    if address is None:
        return
    if is_running(address):
        raise ServalError(f"a serval cluster is already running at {address}")
    if rundir.is_stale(address):
        rundir.remove(address)


def _wait_for_cluster_processes(address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    me = (os.getpid(),)  # a daemon's own command line names the address too
    while procs.naming(address, exclude=me) and time.monotonic() < deadline:
        time.sleep(0.01)
