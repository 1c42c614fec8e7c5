"""The processes of a benchmark run, from /proc: a process and everything below it, their CPU
time over a window and their memory, and what outlives the run (ray_bench.py)."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    start: int  # start time in ticks: a pid seen again with another start is another process
    cpu_s: float
    rss: int
    name: str


def _read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    cpu = (int(fields[11]) + int(fields[12])) * _TICK_S  # utime + stime, every thread
    return Proc(pid, int(fields[1]), int(fields[19]), cpu, int(fields[21]) * _PAGE, _name(argv))


def _name(argv: list[bytes]) -> str:
    """A short name to group processes by: ``ray::ReplicaActor``, ``raylet``, ``serval::proxy``,
    ``dashboard.py``..."""
    first = argv[0].decode(errors="replace") if argv else ""
    if first.startswith("ray::"):
        return first.split(".", 1)[0].split(" ", 1)[0]  # "ray::ReplicaActor.run" -> actor class
    for arg in argv:
        text = arg.decode(errors="replace")
        if text.startswith("serval::"):
            return text
    base = os.path.basename(first)
    if base.startswith("python") and len(argv) > 1:
        script = next((a for a in argv[1:] if a and not a.startswith(b"-")), b"")
        return os.path.basename(script.decode(errors="replace")) or base
    return base


# Every process tree() found, for the leak check at the end (also after an interrupted slot).
SEEN: dict[int, Proc] = {}


def tree(root: int) -> dict[int, Proc]:
    """``root`` and every process below it (Ray's daemons and workers descend from the driver
    that started Ray; a local serval cluster from the process that started it); wrk excluded,
    it is the load, not the server."""
    procs = {p.pid: p for p in map(_read_proc, _pids()) if p is not None}
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found: dict[int, Proc] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in found and procs[pid].name != "wrk":
            found[pid] = procs[pid]
            todo.extend(children.get(pid, []))
    SEEN.update(found)
    return found


def _pids() -> Iterator[int]:
    return (int(e) for e in os.listdir("/proc") if e.isdigit())


class CpuWindow:
    """CPU time used by a process tree between its creation and ``stop()``, by process name."""

    def __init__(self, root: int, names: dict[int, str] | None = None) -> None:
        self.root = root
        self.names = names or {}
        self.before = tree(root)

    def stop(self) -> dict[str, float]:
        used: dict[str, float] = {}
        for pid, p in tree(self.root).items():
            b = self.before.get(pid)
            delta = p.cpu_s - b.cpu_s if b is not None and b.start == p.start else p.cpu_s
            name = self.names.get(pid, p.name)
            used[name] = used.get(name, 0.0) + delta
        return {k: v for k, v in used.items() if v > 0}


def tree_rss(root: int, skip_root: bool = False) -> int:
    return sum(p.rss for pid, p in tree(root).items() if not (skip_root and pid == root))


def quiesce(root: int, max_s: float = 10.0) -> None:
    """Wait (at most ``max_s``) until the run's processes use under 15% of one CPU: what a
    target left behind (Ray Serve's shutdown, a worker exiting) must not load the next one."""
    deadline = time.monotonic() + max_s
    while time.monotonic() < deadline:
        w = CpuWindow(root)
        time.sleep(0.5)
        if sum(w.stop().values()) < 0.075:
            return


def leftovers(seen: dict[int, Proc], temp_dir: str, addresses: list[str]) -> dict[int, str]:
    """Processes of this run alive after it stopped everything, after a grace period: any seen
    during the run (same pid, same start time), any naming its Ray temp dir (raylet,
    gcs_server) or one of its local serval clusters."""
    markers = [temp_dir.encode(), *(a.encode() for a in addresses)]
    deadline = time.monotonic() + 10.0
    while True:
        left: dict[int, str] = {}
        for pid in _pids():
            if pid == os.getpid():
                continue
            p = _read_proc(pid)
            if p is None:
                continue
            if (s := seen.get(pid)) is not None and s.start == p.start:
                left[pid] = p.name
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if any(m in cmd for m in markers):
                left[pid] = p.name
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)
