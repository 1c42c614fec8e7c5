"""The detached owner of a cluster started by ``serval start``.

It holds the lifeline and restarts a crashed controller, like a script that called
``serve.run`` would; it exits when the cluster is shut down (``serval shutdown``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

from serval._private.backends.local import system_env, worker_argv
from serval._private.process import procs, rundir
from serval._private.process.cluster import LocalCluster, is_running, make_private_dir
from serval._private.process.dashboard import DashboardOptions
from serval._private.process.settings import http_options_argv, http_options_env, settings
from serval.config import HTTPOptions
from serval.exceptions import ServalError

logger = logging.getLogger(__name__)


def log_path(address: str) -> str:
    """Beside the runtime directory, not in it: it must outlive a daemon that failed."""
    return f"{address.rstrip(os.sep)}.log"


def run_daemon(
    address: str, http_options: HTTPOptions, dashboard: DashboardOptions | None = None
) -> None:
    """The daemon's body: own the cluster until its controller exits cleanly."""
    cluster = LocalCluster(http_options, address=address, dashboard=dashboard)
    cluster.stopped.wait()
    cluster.close()


def start_detached(
    address: str,
    http_options: HTTPOptions,
    timeout: float = 30.0,
    dashboard: DashboardOptions | None = None,
) -> None:
    """Start a daemon-owned cluster at ``address`` and return once it accepts calls."""
    if is_running(address):
        raise ServalError(f"a serval cluster is already running at {address}")
    if rundir.is_stale(address):  # left by a daemon that was killed
        rundir.remove(address)
    make_private_dir(address)
    log_file = log_path(address)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with open(fd, "ab") as log:
        proc = subprocess.Popen(
            worker_argv(
                "daemon",
                os.path.basename(address),
                "--address",
                address,
                "--http-options",
                http_options_argv(http_options.to_json()),  # (a password: in its env)
                "--dashboard-options",
                (dashboard or DashboardOptions()).to_json(),
            ),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=http_options_env(system_env(settings().user_pythonpath), http_options),
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_running(address):
            return
        if proc.poll() is not None:
            reason = procs.exit_reason(proc.returncode)
            raise ServalError(f"the serval daemon exited at start-up ({reason}); see {log_file}")
        time.sleep(0.01)
    proc.kill()
    raise ServalError(f"the serval daemon did not start within {timeout}s; see {log_file}")


if __name__ == "__main__":  # pragma: no cover - started through the worker entry point
    sys.exit("use serval start")
