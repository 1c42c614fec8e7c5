"""What every chaos scenario uses: its own cluster, the processes of that cluster, load that
records every completion, a raw HTTP client, and a report of figures and goals.

Processes are found by their command lines (``serval::controller``, ``serval::proxy``,
``serval::replica <app>.<deployment>#<n>``) *and* the cluster's runtime directory
(``--address``), so a scenario never signals a process of another cluster or test session.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import serval as serve
from chaos.rawhttp import HttpConn
from serval._private.caller import runtime

T = TypeVar("T")


class ScenarioSkipped(Exception):
    """This machine cannot run the scenario (e.g. not root, so no second Unix user)."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.01) -> T:
    """Call ``predicate`` until it returns something truthy and return that; raise
    AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- processes ----------------------------------------------------------------------------------


def _argv(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return None
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def cluster_processes(address: str, role: str = "") -> dict[int, str]:
    """pid -> command line of the live processes of the cluster at ``address`` whose role
    starts with ``role``: "controller", "proxy", "replica", "replica app.Dep#", ... ("" for
    all)."""
    return _serval_processes(lambda a: a == address, role)


def processes_under(prefix: str) -> dict[int, str]:
    """pid -> command line of the live serval processes of every cluster whose runtime
    directory lies under ``prefix``."""
    return _serval_processes(lambda a: a.startswith(prefix), "")


def _serval_processes(address_matches: Callable[[str], bool], role: str) -> dict[int, str]:
    found = {}
    for pid in _pids():
        argv = _argv(pid)
        if not argv or "--address" not in argv:
            continue
        i = argv.index("--address")
        if i + 1 >= len(argv) or not address_matches(argv[i + 1]):
            continue
        for j, arg in enumerate(argv):
            if arg.startswith("serval::"):
                cmd = " ".join(argv[j:])
                if cmd.startswith(f"serval::{role}"):
                    found[pid] = cmd
                break
    return found


def only_pid(address: str, role: str) -> int | None:
    """The pid of the one process of that role (None if there is none; error if several)."""
    found = cluster_processes(address, role)
    if len(found) > 1:
        raise AssertionError(f"several {role} processes: {found}")
    return next(iter(found), None)


def replica_pids(address: str, app: str, deployment: str) -> dict[str, int]:
    """replica id -> pid of the live replicas of ``app.deployment``."""
    out = {}
    for pid, cmd in cluster_processes(address, f"replica {app}.{deployment}#").items():
        words = cmd.split()
        out[words[words.index("--replica-id") + 1]] = pid
    return out


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of ``pid`` in kB, from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Vm"):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0])
    return out


def fd_soft_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise LookupError(f"no 'Max open files' in /proc/{pid}/limits")


def kill_all(address: str) -> list[str]:
    """SIGCONT then SIGKILL every process of the cluster at ``address``; their command lines."""
    found = cluster_processes(address)
    for pid in found:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    return list(found.values())


# -- a cluster of one's own -----------------------------------------------------------------------


class Cluster:
    """A local cluster owned by this process for one scenario: ``serve.start`` on a free port,
    its processes' stderr going to a log file. ``close()`` shuts it down and says what was left
    (it kills what was left, so a failing scenario leaves nothing either)."""

    def __init__(self, **http_options: Any) -> None:
        serve.shutdown()  # nothing else of this process's may be running
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, self.log_path = tempfile.mkstemp(prefix="chaos-", suffix=".log")
        saved = os.dup(2)
        os.dup2(fd, 2)  # the controller inherits it, and the proxy and replicas from it
        os.close(fd)
        try:
            serve.start(http_options={"port": self.port, **http_options})
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        address = runtime.address()
        assert address is not None
        self.address = address
        self.closed = False

    def pid(self, role: str) -> int | None:
        return only_pid(self.address, role)

    def replicas(self, deployment: str, app: str = "default") -> dict[str, int]:
        return replica_pids(self.address, app, deployment)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def tracebacks(self, role: str = "") -> list[str]:
        """The tracebacks in the cluster's log, each with the log line before it (which names
        the process that logged it: "serval::proxy ..."); only those of ``role`` if given."""
        out: list[list[str]] = []
        current: list[str] | None = None
        previous = ""
        for line in self.log().splitlines():
            if line.startswith("Traceback"):
                current = [previous, line]
                out.append(current)
            elif current is not None:
                current.append(line)
                if line.strip() and not line.startswith((" ", "\t")):
                    current = None  # the exception's own line ends it
            previous = line
        texts = ["\n".join(t) for t in out]
        return [t for t in texts if role in t.split("\n", 1)[0]] if role else texts

    def close(self, timeout: float = 10.0) -> list[str]:
        """Shut down; the command lines of any process still alive ``timeout`` s later (they
        are killed)."""
        if self.closed:
            return []
        self.closed = True
        for pid in cluster_processes(self.address):  # a scenario may have left one stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        try:
            serve.shutdown()
        finally:
            deadline = time.monotonic() + timeout
            while cluster_processes(self.address) and time.monotonic() < deadline:
                time.sleep(0.02)
            left = kill_all(self.address)
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)
        return left

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- load ---------------------------------------------------------------------------------------


class Outcome(NamedTuple):
    """One completed call. A tuple of plain values, so the garbage collector soon stops
    tracking it: tens of thousands of records must not make this process's collections (and
    with them the load's own pauses) longer."""

    kind: str  # "handle" or "http"
    caller: int  # which caller thread
    start: float  # monotonic
    end: float
    ok: bool
    value: str  # the reply (e.g. a replica's pid), or what went wrong


class Load:
    """Callers in background threads, each with one call in flight at a time: ``handles`` threads
    calling ``call()`` (a handle call; what it returns is recorded as the value) and ``conns``
    threads each on its own keep-alive HTTP connection GETting ``path``. Every completion is
    recorded with its monotonic time; an HTTP call succeeds with a 200. A heartbeat thread
    notes when this process itself stood still (see ``longest_stall``)."""

    def __init__(
        self,
        call: Callable[[], Any] | None,
        port: int,
        path: str,
        handles: int = 2,
        conns: int = 2,
        timeout: float = 10.0,
        pause_s: float = 0.0,
    ) -> None:
        self.stop = threading.Event()
        self.pause_s = pause_s  # between a caller's calls: leaves the CPUs some idle time
        self.records: list[list[Outcome]] = []
        self.threads = []
        self.timeout = timeout
        for i in range(handles if call is not None else 0):
            self.threads.append(self._thread(self._handle_loop, i, call))
        for i in range(conns):
            self.threads.append(self._thread(self._http_loop, handles + i, (port, path)))
        self.stalls: list[tuple[float, float]] = []  # (from, how long) beyond 5 ms
        self.threads.append(threading.Thread(target=self._heartbeat, daemon=True))

    def _heartbeat(self) -> None:
        """Sleep 1 ms at a time: waking late means every thread of this process stood still
        (the GIL held, a garbage collection), which tells a gap of the caller's own from one
        of the cluster's."""
        while not self.stop.is_set():
            t0 = time.monotonic()
            time.sleep(0.001)
            late = time.monotonic() - t0 - 0.001
            if late > 0.005:
                self.stalls.append((t0, late))

    def longest_stall(self, t0: float, t1: float) -> float:
        """The longest time (s) within [t0, t1] this process stood still."""
        return max((late for at, late in self.stalls if t0 <= at <= t1), default=0.0)

    def _thread(self, target: Callable[..., None], i: int, arg: Any) -> threading.Thread:
        record: list[Outcome] = []
        self.records.append(record)
        return threading.Thread(target=target, args=(i, arg, record), daemon=True)

    def _handle_loop(self, i: int, call: Callable[[], Any], record: list[Outcome]) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                value = call()
                record.append(Outcome("handle", i, t0, time.monotonic(), True, str(value)))
            except BaseException as exc:  # a SystemExit from a replica is an outcome too
                text = f"{type(exc).__name__}: {exc}"[:300]
                record.append(Outcome("handle", i, t0, time.monotonic(), False, text))
            if self.pause_s:
                time.sleep(self.pause_s)

    def _http_loop(self, i: int, target: tuple[int, str], record: list[Outcome]) -> None:
        port, path = target
        conn = HttpConn(port, timeout=self.timeout)
        try:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = conn.request(path)
                    ok = r.status == 200
                    text = r.text if ok else f"HTTP {r.status}: {r.text[:200]}"
                except Exception as exc:  # a socket error, or a reply that does not parse
                    ok, text = False, f"{type(exc).__name__}: {exc}"
                record.append(Outcome("http", i, t0, time.monotonic(), ok, text))
                if not ok:
                    conn.close()
                    self.stop.wait(0.01)  # the proxy may be down: do not spin
                elif self.pause_s:
                    time.sleep(self.pause_s)
        finally:
            conn.close()

    def __enter__(self) -> Load:
        # The driver is a test process with a large heap (pytest, every module it imported):
        # a full collection of it can stop every thread for 50 ms, which is the caller's own
        # pause, not the cluster's. Freeze what is there (as serval's processes do after their
        # imports), so that the collections during the load are the load's own.
        gc.collect()
        gc.freeze()
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        gc.unfreeze()
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.timeout + 5)
        alive = [t for t in self.threads if t.is_alive()]
        if alive and exc[0] is None:
            raise AssertionError(f"{len(alive)} load threads did not finish")

    def outcomes(self, kind: str | None = None) -> list[Outcome]:
        out = [o for rec in self.records for o in list(rec) if kind is None or o.kind == kind]
        out.sort(key=lambda o: o.end)
        return out

    def failures(self, kind: str | None = None) -> list[Outcome]:
        return [o for o in self.outcomes(kind) if not o.ok]

    def successes_since(self, t: float, kind: str | None = None) -> int:
        return sum(1 for o in self.outcomes(kind) if o.ok and o.end > t)

    def max_gap(self, kind: str, t0: float, t1: float) -> tuple[float, float]:
        """The longest time (s) within [t0, t1] without a successful completion of ``kind``, and
        when it began."""
        times = [t0] + [o.end for o in self.outcomes(kind) if o.ok and t0 <= o.end <= t1] + [t1]
        best, at = 0.0, t0
        for a, b in itertools.pairwise(times):
            if b - a > best:
                best, at = b - a, a
        return best, at

    def first_success(
        self, kind: str, after: float, where: Callable[[Outcome], bool]
    ) -> float | None:
        for o in self.outcomes(kind):
            if o.ok and o.end > after and where(o):
                return o.end
        return None


# -- subprocess drivers ---------------------------------------------------------------------------


class Driver:
    """A driver script (the cluster's owner) in a process of its own. The script prints
    ``READY <anything>`` once it is set up; ``ready`` is that line's rest."""

    def __init__(
        self,
        script: str,
        args: list[str],
        cwd: str,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
        script_dir: str | None = None,
    ) -> None:
        folder = Path(script_dir or tempfile.mkdtemp(prefix="chaos-driver-"))
        self.script_path = folder / "driver.py"
        self.script_path.write_text(script)
        self.err_path = folder / "driver.err"
        self._err = open(self.err_path, "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script_path), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            text=True,
        )
        self.ready = self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> str | None:
        assert self.proc.stdout is not None
        result: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith("READY"):
                    result.append(line[5:].strip())
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        return result[0] if result else None

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._err.close()
        shutil.rmtree(self.script_path.parent, ignore_errors=True)


# -- figures and goals --------------------------------------------------------------------------


@dataclass
class Goal:
    name: str
    value: str
    target: str
    passed: bool
    detail: str = ""


@dataclass
class Report:
    """A scenario's figures, and its goals with whether each was met."""

    scenario: str
    setting: str = ""
    figures: list[tuple[str, str]] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str = ""

    def figure(self, name: str, value: Any, unit: str = "") -> None:
        self.figures.append((name, _fmt(value, unit)))

    def at_most(
        self, name: str, value: float, limit: float, unit: str = "", detail: str = ""
    ) -> bool:
        return self._goal(
            name, value <= limit, _fmt(value, unit), f"<= {_fmt(limit, unit)}", detail
        )

    def below(
        self, name: str, value: float, limit: float, unit: str = "", detail: str = ""
    ) -> bool:
        return self._goal(name, value < limit, _fmt(value, unit), f"< {_fmt(limit, unit)}", detail)

    def check(self, name: str, ok: bool, value: Any = "", detail: str = "") -> bool:
        return self._goal(
            name, ok, str(value) if value != "" else ("yes" if ok else "no"), "yes", detail
        )

    def _goal(self, name: str, ok: bool, value: str, target: str, detail: str) -> bool:
        self.goals.append(Goal(name, value, target, bool(ok), detail))
        return bool(ok)

    def note(self, text: str) -> None:
        self.notes.append(text)

    @property
    def failed(self) -> list[Goal]:
        return [g for g in self.goals if not g.passed]

    def render(self) -> str:
        head = f"== {self.scenario}" + (f" ({self.setting})" if self.setting else "")
        lines = [head]
        if self.skipped:
            lines.append(f"   SKIPPED: {self.skipped}")
        width = max([len(n) for n, _ in self.figures] + [len(g.name) for g in self.goals] + [20])
        for name, value in self.figures:
            lines.append(f"   {name:<{width}}  {value}")
        for g in self.goals:
            mark = "PASS" if g.passed else "FAIL"
            lines.append(f"   {mark}  {g.name:<{width}}  {g.value:>14}   goal {g.target}")
            if g.detail and not g.passed:
                lines.extend(f"         {line}" for line in g.detail.splitlines()[:20])
        lines.extend(f"   note: {n}" for n in self.notes)
        return "\n".join(lines)

    def assert_goals(self) -> None:
        if self.failed:
            names = ", ".join(g.name for g in self.failed)
            raise AssertionError(f"{self.scenario}: goals missed: {names}\n{self.render()}")


def _fmt(value: Any, unit: str) -> str:
    if isinstance(value, float):
        if unit == "ms":
            text = f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
        elif unit == "%":
            text = f"{value:.3f}"
        else:
            text = f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    elif isinstance(value, int) and not isinstance(value, bool):
        text = f"{value:,}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip() if unit and unit != "%" else f"{text}{unit}"


@contextlib.contextmanager
def scenario(name: str, setting: str = "") -> Iterator[Report]:
    """A Report for the scenario in the block; printed at the end, whatever happens. An error
    in the block becomes a missed goal ("ran to the end") and is raised again."""
    report = Report(name, setting)
    try:
        yield report
    except ScenarioSkipped as exc:
        report.skipped = str(exc)
        raise
    except BaseException as exc:
        report.check(
            "ran to the end", False, f"{type(exc).__name__}", detail=traceback.format_exc()[-3000:]
        )
        raise
    finally:
        print(report.render(), flush=True)


def ms(seconds: float) -> float:
    return seconds * 1000.0


def first_lines(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    text = "\n".join(items[:n])
    if len(items) > n:
        text += f"\n... and {len(items) - n} more"
    return text
