"""The dashboard's owner side: its options, its port, its token, its process.

The cluster's owner binds the dashboard's port itself, before anything of the cluster starts,
and hands the listening socket to the ``serval::dashboard`` process: a port that is taken is
known at once (an explicitly asked one fails ``serve.start`` with the reason; the default one,
8265 — often held by another cluster or by Ray's own dashboard — is warned about and the
cluster runs without a dashboard), and a dashboard that died is restarted on the same socket.
The process inherits the lifeline, so it ends with the cluster.

The token is made here, at cluster start, and written to ``dashboard.token`` (0600) in the
runtime directory (0700); ``dashboard.json`` says where the dashboard listens, so that
``serval`` commands find both.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

from serval._private.backends.local import system_env, worker_argv
from serval._private.process import procs
from serval._private.wire import endpoints, layout
from serval.exceptions import ServalError

__all__ = [
    "DEFAULT_PORT",
    "RAY_DEFAULT_PORT",
    "Dashboard",
    "DashboardOptions",
    "dashboard_options",
    "read_token",
    "read_url",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8265
# On Ray, whose own dashboard usually holds 8265 on the head node.
RAY_DEFAULT_PORT = 8266
_RESTART_DELAY_S = 0.5  # doubled for each death in a row
_MAX_RESTART_DELAY_S = 10.0
_STABLE_S = 10.0


@dataclass(frozen=True)
class DashboardOptions:
    """``serve.start(dashboard_options={"host": ..., "port": ...})``; port 0: no dashboard."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    explicit: bool = False  # the port was asked for (taken: an error, not a warning)

    def to_json(self) -> str:
        return json.dumps({"host": self.host, "port": self.port, "explicit": self.explicit})

    @classmethod
    def from_json(cls, text: str) -> DashboardOptions:
        data = json.loads(text)
        return cls(str(data["host"]), int(data["port"]), bool(data["explicit"]))


def dashboard_options(
    given: dict[str, Any] | DashboardOptions | None, default_port: int = DEFAULT_PORT
) -> DashboardOptions:
    """``serve.start``'s ``dashboard_options``, checked."""
    if given is None:
        return DashboardOptions(port=default_port)
    if isinstance(given, DashboardOptions):
        return given
    if not isinstance(given, dict):
        raise TypeError(f"dashboard_options must be a dict, got {type(given).__name__}")
    unknown = set(given) - {"host", "port"}
    if unknown:
        raise ValueError(f"unknown dashboard_options: {', '.join(sorted(unknown))}")
    port = given.get("port", default_port)
    host = given.get("host", "127.0.0.1")
    if type(port) is not int or not 0 <= port <= 65535:
        raise ValueError(f"dashboard_options port must be an int from 0 to 65535, got {port!r}")
    if not isinstance(host, str) or not host:
        raise ValueError(f"dashboard_options host must be a host name or address, got {host!r}")
    return DashboardOptions(host, port, explicit="port" in given)


def bind(options: DashboardOptions) -> socket.socket | None:
    """The dashboard's listening socket; None when it is disabled or (the default port) taken."""
    if options.port == 0:
        return None
    family = socket.AF_INET6 if ":" in options.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((options.host, options.port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        where = f"{options.host}:{options.port}"
        reason = "is taken" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc})"
        if options.explicit:
            raise ServalError(f"the dashboard's address {where} {reason}") from None
        logger.warning(
            "the dashboard's default address %s %s (another serval cluster, or Ray's own "
            "dashboard?); running without a dashboard — choose another port with "
            "dashboard_options={'port': N} or --dashboard-port N",
            where,
            reason,
        )
        return None
    return sock


def read_token(address: str) -> str:
    with open(layout.dashboard_token_path(address), encoding="utf-8") as f:
        return f.read().strip()


def read_url(address: str, with_token: bool = True) -> str | None:
    """The URL of the dashboard of the cluster at ``address`` (with its token), if it has one."""
    try:
        with open(layout.dashboard_path(address), encoding="utf-8") as f:
            url = str(json.load(f)["url"])
        if not with_token:
            return url
        token = read_token(address)
    except (OSError, ValueError, KeyError):
        return None
    return f"{url}?token={token}"


class Dashboard:
    """The dashboard process of a local cluster, restarted with back-off if it dies."""

    def __init__(
        self,
        address: str,
        options: DashboardOptions,
        sock: socket.socket,
        lifeline_fd: int,
        user_pythonpath: str | None,
    ) -> None:
        self.address = address
        self.options = options
        self._sock = sock
        self._lifeline_fd = lifeline_fd
        self._user_pythonpath = user_pythonpath
        self._cwd = os.getcwd()
        self.port = sock.getsockname()[1]
        self.url = f"{endpoints.url_base('http', options.host, self.port)}/"
        self.token = secrets.token_urlsafe(32)
        self._write_files()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.proc = self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="serval-dashboard", daemon=True)
        self._watcher.start()

    @property
    def token_url(self) -> str:
        return f"{self.url}?token={self.token}"

    def _write_files(self) -> None:
        _write_private(layout.dashboard_token_path(self.address), self.token + "\n")
        info = {"url": self.url, "host": self.options.host, "port": self.port}
        _write_private(layout.dashboard_path(self.address), json.dumps(info) + "\n")

    def _spawn(self) -> subprocess.Popen[bytes]:
        fd = self._sock.fileno()
        argv = worker_argv(
            "dashboard",
            os.path.basename(self.address),
            "--address",
            self.address,
            "--lifeline-fd",
            str(self._lifeline_fd),
            "--dashboard-fd",
            str(fd),
            "--dashboard-options",
            json.dumps({"host": self.options.host, "port": self.port, "cwd": self._cwd}),
        )
        return subprocess.Popen(
            argv,
            pass_fds=(self._lifeline_fd, fd),
            stdin=subprocess.DEVNULL,
            env=system_env(self._user_pythonpath),
            start_new_session=True,
        )

    def _watch(self) -> None:
        deaths = 0
        while True:
            try:
                code = self.proc.wait(_STABLE_S)
            except subprocess.TimeoutExpired:
                deaths = 0
                code = self.proc.wait()
            if self._stopping.is_set():
                return
            deaths += 1
            delay = min(_RESTART_DELAY_S * 2 ** (deaths - 1), _MAX_RESTART_DELAY_S)
            logger.warning(
                "the serval dashboard exited (%s); restarting it in %.1fs",
                procs.exit_reason(code),
                delay,
            )
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.proc = self._spawn()

    def close(self) -> None:
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            self._sock.close()


def _write_private(path: str, text: str) -> None:
    """Write ``path`` as a 0600 file, whatever the umask (replacing any old one)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)
