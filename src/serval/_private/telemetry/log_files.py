"""Where a cluster's log files are, and what each is called: the contract between the
processes that write them and what reads them (``serval logs``, the dashboard).

A local cluster logs to a session directory of its own,
``<tmp>/serval_<uid>/logs/session_<time>_<pid>/`` (0700; ``session_latest`` beside it names
the newest), which its runtime directory names in the file ``logs_dir``; the system processes'
``LoggingConfig`` (``serve.start``'s) is in ``logging.json`` there. On Ray the directory is
``<Ray's session directory>/logs/serve/`` on each node. The files: ``controller.log``,
``proxy.log`` (``proxy_<node ip>.log`` on Ray), ``dashboard.log`` and one per replica,
``replica_<app>_<deployment>_<replica id>.log``; each rotates to ``<name>.1``, ``.2``, ...
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from typing import Any

__all__ = [
    "LATEST",
    "LOGGING_FILE",
    "LOGS_DIR_FILE",
    "logs_dir",
    "logs_root",
    "new_session",
    "replica_file",
    "system_logging",
]

LOGS_DIR_FILE = "logs_dir"  # in the runtime directory: the session directory's path
LOGGING_FILE = "logging.json"  # in the runtime directory: the system processes' LoggingConfig
LATEST = "session_latest"


def logs_root() -> str:
    """This user's log directories' parent (private: logs may hold request data)."""
    return os.path.join(tempfile.gettempdir(), f"serval_{os.getuid()}", "logs")


def new_session(address: str, logging_config: dict[str, Any] | None) -> str:
    """Make a new cluster's session directory, and name it (and the system processes'
    logging config) in the runtime directory at ``address``."""
    root = logs_root()
    os.makedirs(root, mode=0o700, exist_ok=True)
    mine = os.path.dirname(root)
    if os.lstat(mine).st_uid != os.getuid():  # (another user made it first, in /tmp)
        raise PermissionError(f"{mine} is not this user's: serval cannot log there")
    os.chmod(mine, 0o700)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    session = os.path.join(root, f"session_{stamp}_{os.getpid()}")
    os.makedirs(session, mode=0o700, exist_ok=True)
    _point_latest(root, session)
    _write_private(os.path.join(address, LOGS_DIR_FILE), session)
    _write_private(os.path.join(address, LOGGING_FILE), json.dumps(logging_config or {}))
    return session


def _point_latest(root: str, session: str) -> None:
    link = os.path.join(root, LATEST)
    tmp = f"{link}.{os.getpid()}"
    with contextlib.suppress(OSError):
        os.symlink(os.path.basename(session), tmp)
        os.replace(tmp, link)  # atomic: a reader sees the old session or the new one


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def logs_dir(address: str) -> str | None:
    """The session directory of the local cluster at ``address``, if it names one."""
    try:
        with open(os.path.join(address, LOGS_DIR_FILE), encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def system_logging(address: str) -> dict[str, Any]:
    """The ``LoggingConfig`` fields of the cluster's system processes ({}: the defaults)."""
    try:
        with open(os.path.join(address, LOGGING_FILE), encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def replica_file(app: str, deployment: str, replica_id: str) -> str:
    """A replica's log file's name (its directory: the cluster's, or ``logs_dir``)."""
    return f"replica_{app}_{deployment}_{replica_id}.log"
