"""The processes of a cluster as the OS shows them (Linux ``/proc``).

Which live processes name a runtime directory on their command line (every serval process
does: ``--address <dir>``), whether a pid still is the process it was (pids are reused; the
start time tells), and where a process's output goes (to say where a component's log is).
Where ``/proc`` is missing, the answers are empty: nothing is found, nothing is alive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat


def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` from the third (the state) on; the command name
    before them may hold spaces and parentheses, so split after its last ``)``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if there is no such process.
    With the pid it names one process for good: a reused pid has another start time."""
    fields = _stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])  # field 22 of stat(5)


def is_alive(pid: int, started: int | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, given ``started``, is the same process."""
    fields = _stat_fields(pid)
    if fields is None or not fields or (fields[0] == b"Z" and not _threads_left(pid)):
        return False
    return started is None or (len(fields) >= 20 and int(fields[19]) == started)


def _threads_left(pid: int) -> bool:
    # A zombie main thread may leave other threads running (and holding the process's files)
    # for a moment, or for good if it exited alone.
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def _names(cmd: bytes, marker: bytes) -> bool:
    return b"serval::" in cmd and marker in cmd


def _marker(address: str) -> bytes:
    return b"\0" + os.fsencode(address) + b"\0"  # a whole argument, not a prefix of one


def names(pid: int, address: str) -> bool:
    """Whether ``pid`` is a live serval process of the cluster at ``address``."""
    return _names(cmdline(pid), _marker(address)) and is_alive(pid)


def naming(address: str, exclude: tuple[int, ...] = ()) -> list[int]:
    """Live serval processes (not zombies) with ``address`` as a whole command-line argument."""
    marker = _marker(address)
    return [
        pid
        for pid in _pids()
        if pid not in exclude and _names(cmdline(pid), marker) and is_alive(pid)
    ]


def output_location(fd: int = 2) -> str:
    """Where this process's ``fd`` goes, in words: the children it starts write there too."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        info = os.fstat(fd)
    except OSError:
        return "the standard error of the process that started the cluster"
    if stat.S_ISREG(info.st_mode) and not target.endswith(" (deleted)"):
        return target
    if target == "/dev/null":
        return "nowhere (standard error is /dev/null)"
    if os.isatty(fd):
        return f"the terminal {target}"
    return f"the standard error of the process that started the cluster ({target})"


def exit_reason(code: int | None) -> str:
    """A ``Popen`` return code in words: ``exit code 1``, ``killed by SIGKILL``."""
    if code is None:
        return "exit code unknown: not a child of this process"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
