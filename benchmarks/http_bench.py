"""serval's HTTP path against a bare uvicorn ASGI app, in one run, with wrk as the load generator.

    python benchmarks/http_bench.py                 # full run: 3 rounds (about 2.5 min)
    python benchmarks/http_bench.py --quick         # 1 short round (about 25 s), a smoke test
    python benchmarks/http_bench.py --rounds 5      # more rounds, steadier medians
    python benchmarks/http_bench.py --duration 20   # longer 32-connection runs
    python benchmarks/http_bench.py --check         # exit 1 if a goal is missed

Needs ``wrk`` (Debian/Ubuntu: ``apt-get install wrk``). Each round measures, in this order:

1. the floor (``_floor_asgi.py``): a bare ASGI app answering ``ok`` on uvicorn with httptools
   and uvloop, in its own process on a free port; then stops it;
2. serval (``serve.start(http_options={"port": <free port>})``) with three applications, each
   at its own route prefix, all with ``max_ongoing_requests=1000`` and one replica:
   ``/noop``: ``def __call__(self, request): return "ok"``;
   ``/anoop``: the same with ``async def __call__``;
   ``/chain``: an ingress whose ``async def __call__`` returns
   ``await self.child.echo.remote("x")`` on a child deployment (a sync ``echo``).

Each target gets the same treatment: a warm-up (32 connections, discarded), then
``wrk -t2 -c32 --latency`` (req/s, p50, p99, non-2xx/3xx responses, socket errors), then
``wrk -t1 -c1 --latency`` (p50). The CPU time the server processes used during the
32-connection run is read from /proc and shown per request.

The floor and serval are measured in alternating rounds, so that both see the same machine
(on a shared VM the floor alone moves by 15-25% from minute to minute). The table shows each
figure's median over the rounds (errors: the sum) beside the floor's median and their ratio,
the goals (judged on the medians), each goal figure's ratio round by round, Ray Serve's
reference figures (measured on another machine, not in this run), then one JSON line with
every figure. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import exit_cleanly_on_sigterm, free_port  # noqa: E402
from _floor_asgi import uvicorn_args  # noqa: E402

import serval as serve  # noqa: E402

CONNS = 32
THREADS = 2
WRK_TIMEOUT_S = 2  # wrk's default: a response slower than this counts as a socket timeout

# Goals (issue 3, "Speed"), as ratios to the floor measured in the same run.
GOAL_RPS_MIN_X = 0.5  # no-op ingress, 32 connections: req/s >= 0.5x the floor's, zero errors
GOAL_C1_P50_MAX_X = 3.0  # no-op ingress, 1 connection: p50 <= 3x the floor's

# Ray Serve 2.60, measured on a different 2-core machine (2026-11-25) with the same method, NOT
# in this run. The floor measured there (``limit_asgi.py``) is kept to show Ray's ratios too.
RAY = {"noop_c32_rps": 142.0, "noop_c1_p50_ms": 13.8, "chain_c32_rps": 75.0}
RAY_FLOOR = {"c32_rps": 13426.0, "c1_p50_ms": 0.117}


@serve.deployment(max_ongoing_requests=1000)
class Noop:
    def __call__(self, request: Any) -> str:
        return "ok"


@serve.deployment(max_ongoing_requests=1000)
class AsyncNoop:
    async def __call__(self, request: Any) -> str:
        return "ok"


@serve.deployment(max_ongoing_requests=1000)
class Child:
    def echo(self, x: Any) -> Any:
        return x


@serve.deployment(max_ongoing_requests=1000)
class Chain:
    def __init__(self, child: Any) -> None:
        self.child = child

    async def __call__(self, request: Any) -> Any:
        return await self.child.echo.remote("x")


# name -> (application, route prefix, expected body, label for the table)
TARGETS = {
    "noop": (lambda: Noop.bind(), "/noop", b"ok", "no-op ingress (def __call__)"),
    "anoop": (lambda: AsyncNoop.bind(), "/anoop", b"ok", "no-op ingress (async def __call__)"),
    "chain": (lambda: Chain.bind(Child.bind()), "/chain", b"x", "ingress -> child deployment"),
}


# -- wrk ----------------------------------------------------------------------------------------

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_wrk(out: str) -> dict[str, Any]:
    """The figures of ``wrk --latency`` output (latencies in ms)."""
    res: dict[str, Any] = {}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if m is None:
        raise ValueError(f"no Requests/sec in wrk's output:\n{out}")
    res["rps"] = float(m.group(1))
    m = re.search(r"^\s*(\d+) requests in " + _TIME, out, re.M)
    if m:
        res["requests"] = int(m.group(1))
        res["seconds"] = _ms(m.group(2), m.group(3)) / 1e3
    for pct in (50, 75, 90, 99):
        m = re.search(rf"^\s*{pct}%\s+" + _TIME, out, re.M)
        if m:
            res[f"p{pct}_ms"] = _ms(m.group(1), m.group(2))
    m = re.search(r"^\s*Latency\s+" + _TIME + r"\s+" + _TIME + r"\s+" + _TIME, out, re.M)
    if m:
        res["avg_ms"] = _ms(m.group(1), m.group(2))
        res["max_ms"] = _ms(m.group(5), m.group(6))
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors = dict(zip(errors, map(int, m.groups()), strict=True))
    res["socket_errors"] = errors
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    return res


def run_wrk(url: str, conns: int, duration: float, threads: int | None = None) -> dict[str, Any]:
    threads = threads or min(THREADS, conns)
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "--latency",
        url,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=duration + 60
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    res = parse_wrk(proc.stdout)
    res["errors"] = res["non2xx"] + sum(res["socket_errors"].values())
    return res


# -- processes ----------------------------------------------------------------------------------

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) * _TICK_S  # utime, stime


def cluster_processes(address: str) -> dict[str, int]:
    """``{"proxy": pid, "controller": pid, "<app>.<Deployment>#<i>": pid}`` of our cluster only
    (other serval clusters may run on this machine)."""
    found: dict[str, int] = {}
    marker = address.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if marker not in argv or not any(a.startswith(b"serval::") for a in argv):
            continue
        i = next(i for i, a in enumerate(argv) if a.startswith(b"serval::"))
        role = argv[i].decode()[len("serval::") :]
        key = argv[i + 1].decode() if role == "replica" and i + 1 < len(argv) else role
        found[key] = int(entry)
    return found


def source_version() -> str:
    """The git commit of this checkout (``+dirty`` with local changes), or "" outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "-C", HERE, "status", "--porcelain", "--", "../src"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def wait_http(
    port: int,
    path: str,
    expect: bytes,
    proc: subprocess.Popen[bytes] | None = None,
    timeout_s: float = 15.0,
) -> None:
    """Wait until ``GET path`` on 127.0.0.1:``port`` answers 200 with body ``expect``
    (http.client, not urllib: no proxy settings from the environment apply)."""
    deadline = time.monotonic() + timeout_s
    last: BaseException | str | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            if r.status == 200 and body == expect:
                return
            last = f"status {r.status}, body {body[:80]!r}"
        except (OSError, http.client.HTTPException) as exc:
            last = exc
        finally:
            conn.close()
        time.sleep(0.05)
    raise RuntimeError(
        f"http://127.0.0.1:{port}{path} did not answer 200 {expect!r} within {timeout_s:g} s: "
        f"{last}"
    )


def start_floor() -> tuple[subprocess.Popen[bytes], int]:
    """uvicorn serving _floor_asgi:app on a free port, in a session of its own (so that Ctrl-C
    reaches only this process, which then stops it)."""
    for attempt in range(3):
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "_floor_asgi:app",
            "--app-dir",
            HERE,
            *uvicorn_args(port),
        ]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_http(port, "/", b"ok", proc)
            return proc, port
        except RuntimeError:
            stop_floor(proc)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def stop_floor(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def leftovers(address: str, grace_s: float = 3.0) -> dict[str, int]:
    deadline = time.monotonic() + grace_s
    while True:
        left = cluster_processes(address)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# -- measuring ----------------------------------------------------------------------------------


def measure(url: str, opts: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    """Warm-up, 32 connections (with the CPU used by ``pids``), then 1 connection."""
    run_wrk(url, CONNS, opts.warmup)
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    c32 = run_wrk(url, CONNS, opts.duration)
    after = {k: cpu_seconds(p) for k, p in pids.items()}
    used: dict[str, float] = {}
    for k in pids:
        b, a = before[k], after[k]
        if a is not None and b is not None:  # None: the process is gone
            used[k] = a - b
    n = max(c32.get("requests", 0), 1)
    c32["cpu_s"] = {k: round(v, 2) for k, v in used.items()}
    c32["cpu_us_per_req"] = {k: round(v / n * 1e6, 1) for k, v in used.items()}
    c1 = run_wrk(url, 1, opts.c1_duration, threads=1)
    return {"c32": c32, "c1": c1}


def measure_floor(opts: argparse.Namespace) -> dict[str, Any]:
    proc, port = start_floor()
    try:
        return measure(f"http://127.0.0.1:{port}/", opts, {"floor": proc.pid})
    finally:
        stop_floor(proc)


def measure_serval(
    opts: argparse.Namespace, names: list[str]
) -> tuple[dict[str, Any], str | None, list[str]]:
    """Start serval, deploy every target, measure each; shuts serval down on the way out.

    Returns the figures, the cluster's address and the serval processes that were replaced
    while a target was measured (killed from outside, say): those figures are suspect."""
    port = free_port()
    results: dict[str, Any] = {}
    restarts: list[str] = []
    address = None
    serve.start(http_options={"port": port})
    try:
        try:
            from serval._private.caller import runtime

            address = runtime.address()
        except Exception:
            address = None
        for name in names:
            make, prefix, _, _ = TARGETS[name]
            serve.run(make(), name=name, route_prefix=prefix)
        for name in names:
            _, prefix, expect, label = TARGETS[name]
            url = f"http://127.0.0.1:{port}{prefix}"
            wait_http(port, prefix, expect)
            procs = cluster_processes(address) if address else {}
            pids = {k: p for k, p in procs.items() if k == "proxy" or k.startswith(name + ".")}
            print(f"measuring serval: {label} ...", flush=True)
            results[name] = measure(url, opts, pids)
            after = cluster_processes(address) if address else {}
            for key in (k for k, p in procs.items() if after.get(k) != p):
                restarts.append(f"{key} while measuring {name}")
                print(
                    f"WARNING: serval's {key} process (pid {procs[key]}) was replaced while "
                    f"measuring {name}: its figures are suspect",
                    file=sys.stderr,
                )
    finally:
        serve.shutdown()
    return results, address, restarts


# -- rounds ---------------------------------------------------------------------------------------

# Counts that a round adds to rather than varies: any error in any round is an error.
_SUMMED = frozenset({"errors", "non2xx", "connect", "read", "write", "timeout"})


def combine(rounds: list[Any]) -> Any:
    """One set of figures from several rounds': field by field, the median of numbers, the
    sum of error counts; nested dicts likewise (a key missing from a round is left out)."""
    first = rounds[0]
    if isinstance(first, dict):
        keys = [k for k in first if all(isinstance(r, dict) and k in r for r in rounds)]
        out = {}
        for k in keys:
            values = [r[k] for r in rounds]
            if k in _SUMMED and all(isinstance(v, int) for v in values):
                out[k] = sum(values)
            else:
                out[k] = combine(values)
        return out
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in rounds):
        return statistics.median(rounds)
    return first


def ratios_by_round(
    rounds: list[tuple[dict[str, Any], dict[str, Any]]],
) -> dict[str, list[float]]:
    """Each goal figure's serval/floor ratio, round by round."""
    out: dict[str, list[float]] = {}
    for floor, sv in rounds:
        for name in ("noop", "anoop"):
            if name in sv:
                out.setdefault(f"{name}_c32_rps", []).append(
                    round(sv[name]["c32"]["rps"] / floor["c32"]["rps"], 3)
                )
                out.setdefault(f"{name}_c1_p50", []).append(
                    round(sv[name]["c1"]["p50_ms"] / floor["c1"]["p50_ms"], 2)
                )
    return out


# -- report -------------------------------------------------------------------------------------


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1e3:,.0f} µs" if v < 1 else f"{v:,.2f} ms"


def fmt_rps(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}/s"


def fmt_errors(r: dict[str, Any]) -> str:
    se = r["socket_errors"]
    sock = sum(se.values())
    text = f"non-2xx {r['non2xx']}, socket {sock}"
    if sock:
        text += " (" + ", ".join(f"{k} {v}" for k, v in se.items() if v) + ")"
    return text


def fmt_cpu(r: dict[str, Any]) -> str:
    cpu = r["cpu_us_per_req"]
    return f"{sum(cpu.values()):,.0f} µs" if cpu else "-"


def report(
    floor: dict[str, Any],
    sv: dict[str, Any],
    by_round: dict[str, list[float]],
    opts: argparse.Namespace,
    load: dict[str, Any],
    elapsed: float,
    leftover: dict[str, int],
    restarts: list[str],
) -> dict[str, Any]:
    f32, f1 = floor["c32"], floor["c1"]
    goals: dict[str, bool] = {}
    for name in ("noop", "anoop"):
        if name in sv:
            s32, s1 = sv[name]["c32"], sv[name]["c1"]
            goals[f"{name}_c32_rps"] = s32["rps"] >= GOAL_RPS_MIN_X * f32["rps"]
            goals[f"{name}_c32_zero_errors"] = s32["errors"] == 0 and s32.get("requests", 0) > 0
            # Only answered requests count: a run of nothing but errors has no latency to judge.
            goals[f"{name}_c1_p50"] = (
                s1["errors"] == 0
                and s1.get("requests", 0) > 0
                and s1["p50_ms"] <= GOAL_C1_P50_MAX_X * f1["p50_ms"]
            )

    rows: list[tuple[str, ...]] = []

    def row(
        label: str,
        floor_s: str,
        serval_s: str,
        ratio: str = "",
        goal: str = "",
        ok: bool | None = None,
        ray: str = "",
    ) -> None:
        verdict = "" if ok is None else ("yes" if ok else "NO")
        rows.append((label, floor_s, serval_s, ratio, goal, verdict, ray))

    def x(a: float | None, b: float | None, digits: int = 2) -> str:
        return f"{a / b:.{digits}f}x" if a is not None and b else ""

    ray_ratio_rps = RAY["noop_c32_rps"] / RAY_FLOOR["c32_rps"]
    ray_ratio_p50 = RAY["noop_c1_p50_ms"] / RAY_FLOOR["c1_p50_ms"]
    for name, s in sv.items():
        label = TARGETS[name][3]
        s32, s1 = s["c32"], s["c1"]
        noopish = name in ("noop", "anoop")
        if rows:
            rows.append(("",) * 7)
        ray_rps = ""
        if name == "noop":
            ray_rps = f"{RAY['noop_c32_rps']:,.0f}/s ({ray_ratio_rps:.3f}x)"
        elif name == "chain":
            ray_rps = (
                f"{RAY['chain_c32_rps']:,.0f}/s "
                f"({RAY['chain_c32_rps'] / RAY_FLOOR['c32_rps']:.4f}x)"
            )
        rows.append((label + ":", *("",) * 6))
        row(
            f"  {CONNS} conns, req/s",
            fmt_rps(f32["rps"]),
            fmt_rps(s32["rps"]),
            x(s32["rps"], f32["rps"], 3),
            f">= {GOAL_RPS_MIN_X:g}x" if noopish else "",
            goals.get(f"{name}_c32_rps"),
            ray_rps,
        )
        row(
            f"  {CONNS} conns, p50",
            fmt_ms(f32.get("p50_ms")),
            fmt_ms(s32.get("p50_ms")),
            x(s32.get("p50_ms"), f32.get("p50_ms")),
        )
        row(
            f"  {CONNS} conns, p99",
            fmt_ms(f32.get("p99_ms")),
            fmt_ms(s32.get("p99_ms")),
            x(s32.get("p99_ms"), f32.get("p99_ms")),
        )
        row(
            f"  {CONNS} conns, max",
            fmt_ms(f32.get("max_ms")),
            fmt_ms(s32.get("max_ms")),
            x(s32.get("max_ms"), f32.get("max_ms")),
        )
        row(
            f"  {CONNS} conns, errors",
            fmt_errors(f32),
            fmt_errors(s32),
            "",
            "0" if noopish else "",
            goals.get(f"{name}_c32_zero_errors"),
        )
        row(
            f"  {CONNS} conns, server CPU/request",
            fmt_cpu(f32),
            fmt_cpu(s32),
            x(
                sum(s32["cpu_us_per_req"].values()) or None,
                sum(f32["cpu_us_per_req"].values()) or None,
            ),
        )
        row(
            "  1 conn, p50",
            fmt_ms(f1.get("p50_ms")),
            fmt_ms(s1.get("p50_ms")),
            x(s1.get("p50_ms"), f1.get("p50_ms")),
            f"<= {GOAL_C1_P50_MAX_X:g}x" if noopish else "",
            goals.get(f"{name}_c1_p50"),
            f"{RAY['noop_c1_p50_ms']:g} ms ({ray_ratio_p50:.0f}x)" if name == "noop" else "",
        )
        row(
            "  1 conn, p99",
            fmt_ms(f1.get("p99_ms")),
            fmt_ms(s1.get("p99_ms")),
            x(s1.get("p99_ms"), f1.get("p99_ms")),
        )
        row("  1 conn, req/s", fmt_rps(f1["rps"]), fmt_rps(s1["rps"]), x(s1["rps"], f1["rps"], 3))
        if s1["errors"]:
            row("  1 conn, errors", fmt_errors(f1), fmt_errors(s1))

    head = ("figure", "floor", "serval", "x floor", "goal", "met", "Ray Serve 2.60 *")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
    mode = "quick" if opts.quick else "full"
    print()
    print(
        f"serval HTTP benchmark ({mode} run): Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}, serval {serve.__version__}"
        + (f" ({opts.source})" if opts.source else "")
    )
    print(
        f"  {opts.rounds} round(s), floor and serval in turn; each: wrk warm-up {opts.warmup:g} s "
        f"at {CONNS} conns, then -t{THREADS} -c{CONNS} {opts.duration:g} s, then -t1 -c1 "
        f"{opts.c1_duration:g} s, per target"
    )
    print(
        f"  load average (1 min) {load['start'][0]:.2f} at start, {load['end'][0]:.2f} at end; "
        + ("figures are medians over the rounds (errors: sums)" if opts.rounds > 1 else "")
    )
    print()
    print(line.format(*head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*r).rstrip())
    print()
    print(
        "  floor: bare ASGI app (_floor_asgi.py) on uvicorn with httptools + uvloop, one "
        "process, measured in this run."
    )
    print(
        "  x floor: serval / floor (latency and CPU: lower is better; req/s: higher is "
        "better). errors: wrk's"
    )
    print(
        f"    non-2xx/3xx responses and socket errors (connect/read/write/timeout > "
        f"{WRK_TIMEOUT_S} s)."
    )
    print(
        "  server CPU/request: CPU time of the server processes during the "
        f"{CONNS}-connection run / requests (wrk's own CPU excluded); serval's by process:"
    )
    for name, s in sv.items():
        parts = ", ".join(f"{k} {v:,.0f} µs" for k, v in s["c32"]["cpu_us_per_req"].items())
        print(f"    {name}: {parts}")
    print(
        "  * Ray Serve: measured ELSEWHERE (another 2-core machine, same method), not in this "
        "run; in brackets, its"
    )
    print(
        f"    ratio to the floor measured there ({RAY_FLOOR['c32_rps']:,.0f}/s, "
        f"{RAY_FLOOR['c1_p50_ms'] * 1e3:.0f} µs p50 at 1 conn)."
    )
    if restarts:
        print(
            f"  WARNING: serval processes replaced during the run (figures suspect): "
            f"{'; '.join(restarts)}"
        )
    if leftover:
        print(
            f"  WARNING: {len(leftover)} serval process(es) outlived serve.shutdown() by 3 s: "
            + ", ".join(f"{k} (pid {p})" for k, p in leftover.items())
        )
    if opts.rounds > 1:
        print("  goal figures round by round (serval / floor of the same round):")
        for key, values in by_round.items():
            print(f"    {key}: " + ", ".join(f"{v:g}x" for v in values))
    missed = [k for k, v in goals.items() if not v]
    print(
        f"  goals met: {len(goals) - len(missed)}/{len(goals)}"
        + (f" (missed: {', '.join(missed)})" if missed else "")
    )
    print(f"  total run time: {elapsed:.1f} s")
    print()

    def r2(v: float | None) -> float | None:
        return None if v is None else round(v, 3)

    def figures(prefix: str, m: dict[str, Any]) -> dict[str, Any]:
        c32, c1 = m["c32"], m["c1"]
        return {
            f"{prefix}_c32_rps": round(c32["rps"]),
            f"{prefix}_c32_p50_ms": r2(c32.get("p50_ms")),
            f"{prefix}_c32_p99_ms": r2(c32.get("p99_ms")),
            f"{prefix}_c32_max_ms": r2(c32.get("max_ms")),
            f"{prefix}_c32_requests": c32.get("requests"),
            f"{prefix}_c32_non2xx": c32["non2xx"],
            f"{prefix}_c32_socket_errors": c32["socket_errors"],
            f"{prefix}_c32_cpu_us_per_req": c32["cpu_us_per_req"],
            f"{prefix}_c1_rps": round(c1["rps"]),
            f"{prefix}_c1_p50_ms": r2(c1.get("p50_ms")),
            f"{prefix}_c1_p99_ms": r2(c1.get("p99_ms")),
            f"{prefix}_c1_errors": c1["errors"],
        }

    result: dict[str, Any] = {"mode": mode, "source": opts.source, **figures("floor", floor)}
    for name, s in sv.items():
        result.update(figures(name, s))
        result[f"x_{name}_c32_rps"] = round(s["c32"]["rps"] / f32["rps"], 4)
        result[f"x_{name}_c1_p50"] = round(s["c1"]["p50_ms"] / f1["p50_ms"], 2)
    result.update(
        {
            "goals_met": goals,
            "rounds": opts.rounds,
            "x_by_round": by_round,
            "rayserve_measured_elsewhere": {
                **RAY,
                "floor_c32_rps": RAY_FLOOR["c32_rps"],
                "floor_c1_p50_ms": RAY_FLOOR["c1_p50_ms"],
            },
            "loadavg_start": load["start"],
            "loadavg_end": load["end"],
            "leftover_processes": len(leftover),
            "restarted_processes": restarts,
            "duration_s": opts.duration,
            "elapsed_s": round(elapsed, 1),
        }
    )
    print(json.dumps(result))
    return result


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    ap.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"seconds of each {CONNS}-connection run (default 10; --quick: 3)",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=list(TARGETS),
        default=list(TARGETS),
        help="serval targets to measure (default: all)",
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="rounds of floor + serval (default 3; --quick: 1)"
    )
    ap.add_argument("--check", action="store_true", help="exit 1 if any goal is missed")
    opts = ap.parse_args()
    if opts.rounds is None:
        opts.rounds = 1 if opts.quick else 3
    if opts.rounds < 1:
        ap.error("--rounds must be at least 1")
    if opts.duration is None:
        opts.duration = 3.0 if opts.quick else 6.0
    opts.warmup = 1.0 if opts.quick else 2.0
    opts.c1_duration = max(2.0, round(opts.duration / 2))
    if shutil.which("wrk") is None:
        print("wrk not found on PATH (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    exit_cleanly_on_sigterm()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    started = time.perf_counter()
    opts.source = source_version()
    load = {"start": [round(v, 2) for v in os.getloadavg()]}

    rounds: list[tuple[dict[str, Any], dict[str, Any]]] = []
    restarts: list[str] = []
    address = None
    for i in range(opts.rounds):
        print(f"round {i + 1}/{opts.rounds}: the floor (bare uvicorn ASGI app) ...", flush=True)
        floor = measure_floor(opts)
        print(f"round {i + 1}/{opts.rounds}: starting serval ...", flush=True)
        sv, address, replaced = measure_serval(opts, opts.only)
        rounds.append((floor, sv))
        restarts += replaced
    leftover = leftovers(address) if address else {}
    for key, pid in leftover.items():
        print(
            f"WARNING: still running 3 s after serve.shutdown(): {key} (pid {pid})", file=sys.stderr
        )
    load["end"] = [round(v, 2) for v in os.getloadavg()]

    floor = combine([f for f, _ in rounds])
    sv = combine([s for _, s in rounds])
    elapsed = time.perf_counter() - started
    result = report(floor, sv, ratios_by_round(rounds), opts, load, elapsed, leftover, restarts)
    if opts.check and not all(result["goals_met"].values()):
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
