"""A cluster's runtime directory: private, naming its owner, gone when the cluster is.

The directory (mode 0700) holds the cluster's Unix sockets and the controller's checkpoint,
which holds the user's pickled code, so nothing of it may stay behind. The owner (the script
that called ``serve.run``, or the ``serval start`` daemon) writes its pid and start time to
``owner``. The cluster removes the directory when it ends: the owner after a shutdown, the
controller when the owner was killed. What a cluster could not remove (its controller was
down or killed too) is stale, and the next cluster started by this user removes it: a
directory is stale when its owner is dead, no live process names it and no controller answers
on its socket. One without an owner record is left alone for a minute: it may be starting.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import tempfile
import time

from serval._private.process import procs
from serval._private.wire import layout
from serval._private.wire.layout import controller_path
from serval.exceptions import ServalError

_PREFIX = "serval-"
_REMOVING = ".removing-"
_UNOWNED_GRACE_S = 60.0


def make_private(address: str | None) -> str:
    """Create the runtime directory (0700), or check that an existing one is private and ours."""
    if address is None:
        return tempfile.mkdtemp(prefix=_PREFIX)
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


def is_running(address: str) -> bool:
    """Whether a controller answers at ``address``; ServalError if this user may not look."""
    path = controller_path(address)
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except PermissionError:
            raise ServalError(_denied(address, path)) from None
        except OSError:
            return False
    return True


def _denied(address: str, path: str) -> str:
    owner = ""
    with contextlib.suppress(OSError, KeyError, ImportError):
        import pwd

        uid = os.stat(address).st_uid
        owner = f"; it belongs to user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    return (
        f"permission denied: {path} (the serval cluster at {address} is not this user's: "
        f"only its own user can reach it{owner})"
    )


def record_owner(address: str) -> None:
    """Name this process the owner of the cluster at ``address``."""
    started = procs.start_time(os.getpid())
    target = layout.owner_path(address)
    tmp = f"{target}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w") as f:
        f.write(f"{os.getpid()} {started if started is not None else ''}\n")
    os.replace(tmp, target)


def _owner(address: str) -> tuple[int, int | None] | None:
    try:
        with open(layout.owner_path(address)) as f:
            pid, _, started = f.read().strip().partition(" ")
        return int(pid), int(started) if started else None
    except (OSError, ValueError):
        return None


def remove(address: str) -> None:
    """Remove the runtime directory. It is renamed first, so that a cluster started at the
    same address meanwhile gets a directory of its own, never half of this one."""
    doomed = f"{address}{_REMOVING}{os.getpid()}"
    try:
        os.rename(address, doomed)
    except FileNotFoundError:
        return
    except OSError:
        doomed = address
    shutil.rmtree(doomed, ignore_errors=True)


def is_stale(address: str) -> bool:
    """Whether ``address`` is a runtime directory of this user left by a dead cluster."""
    try:
        info = os.lstat(address)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return False
    owner = _owner(address)
    if owner is not None:
        if procs.is_alive(*owner):
            return False
    elif not any(os.path.lexists(os.path.join(address, m)) for m in layout.MARKS):
        return False  # not a runtime directory (or one whose controller has not started)
    elif time.time() - info.st_mtime < _UNOWNED_GRACE_S:
        return False  # its owner may not have recorded itself yet
    try:
        if is_running(address):
            return False
    except ServalError:
        return False
    return not procs.naming(address)


def clean_stale(parent: str | None = None) -> list[str]:
    """Remove the stale runtime directories of this user in ``parent`` (the temp dir)."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for entry in entries:
        if not entry.name.startswith(_PREFIX):
            continue
        if _REMOVING in entry.name:
            if _abandoned_removal(entry.path):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
        elif is_stale(entry.path):
            remove(entry.path)
            removed.append(entry.path)
    return removed


def _abandoned_removal(path: str) -> bool:
    """A directory renamed for removal by a process that died before it had finished."""
    pid = path.rpartition(_REMOVING)[2]
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return (
        pid.isdigit()
        and stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and not procs.is_alive(int(pid))
    )
