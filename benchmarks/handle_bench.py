"""serval's handle path against the floor of a cross-process Python call, in one run.

    python benchmarks/handle_bench.py           # full run (about half a minute)
    python benchmarks/handle_bench.py --quick   # a few seconds, for a smoke test
    python benchmarks/handle_bench.py --check   # exit 1 if a goal is missed

Measures, in this order:

1. the floor (``_floor_ipc.py``): a forked server and a uvloop client over a Unix socket,
   pickled frames; sequential round trip p50/p99 and throughput with 64 calls in flight;
2. serval cold start: a fresh ``python -c`` process times itself from before
   ``import serval`` to the first ``.result()`` of a no-op deployment;
3. serval on a no-op deployment (``max_ongoing_requests=1000``): sequential p50/p99 with the
   sync API (``h.echo.remote(1).result()``) and the async API (``await h.echo.remote(1)``
   inside ``asyncio.run``), and async throughput with 64 in flight for a sync method
   (``echo``) and an async one (``aecho``).

Prints a table with each serval figure's ratio to the floor and its goal, Ray Serve's
reference figures (measured on another machine, not in this run), then one JSON line.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _floor_ipc import cpu_pair, measure_floor  # noqa: E402

import serval as serve  # noqa: E402

IN_FLIGHT = 64

# Goals, as ratios to the floor measured in the same run (cold start: absolute).
GOAL_SEQ_P50_MAX_X = 2.0
GOAL_RPS_MIN_X = 0.6
GOAL_COLD_START_MAX_S = 1.0

# Ray Serve 2.60, measured on a different 2-core machine (2026-11-25), NOT in this run. The
# floor measured there with the same method is kept so that Ray's ratios can be shown too.
RAY = {"seq_p50_us": 5980.0, "rps": 222.0, "cold_start_s": 11.9}
RAY_FLOOR = {"seq_p50_us": 68.0, "rps": 23459.0}

APP = "handle_bench"

# Which placement of the floor's client and server the ratios divide by: each on its own CPU,
# like a caller and a replica process that both have work to do (and like the reference
# floor of 68 µs). One CPU and unpinned are measured and printed too; see README.
FLOOR_PLACEMENT = "two_cpus"
PLACEMENT_LABELS = {"two_cpus": "two CPUs", "one_cpu": "one CPU", "unpinned": "unpinned"}


@serve.deployment(max_ongoing_requests=1000)
class Noop:
    def echo(self, x: Any) -> Any:
        return x

    async def aecho(self, x: Any) -> Any:
        return x


# -- measurements -------------------------------------------------------------------------------


def pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def summarize(lat_s: list[float]) -> dict[str, float]:
    lat = sorted(lat_s)
    return {
        "p50_us": pct(lat, 0.50) * 1e6,
        "p99_us": pct(lat, 0.99) * 1e6,
        "p999_us": pct(lat, 0.999) * 1e6,
        "max_us": lat[-1] * 1e6,
    }


def free_port() -> int:
    """A TCP port nobody listens on now, for the HTTP proxy (8000 may be taken by another
    serval cluster on this machine; the proxy is idle in this benchmark)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_address() -> str | None:
    """The runtime directory of this process's cluster (it appears in its processes' argv)."""
    try:
        from serval._private import runtime

        return runtime.address()
    except Exception:  # private API: the leak check is skipped if it moves
        return None


# Timed from before `import serval` to the first result; serve.start only picks the HTTP port.
COLD_START_CODE = textwrap.dedent(
    """
    import time
    t0 = time.perf_counter()
    import serval as serve

    @serve.deployment(max_ongoing_requests=1000)
    class Noop:
        def echo(self, x):
            return x

    serve.start(http_options={"port": %d})
    h = serve.run(Noop.bind(), name="cold")
    assert h.echo.remote(1).result() == 1
    t1 = time.perf_counter()
    try:
        from serval._private import runtime
        address = runtime.address()
    except Exception:
        address = None
    serve.shutdown()
    t2 = time.perf_counter()
    print("COLD", t1 - t0, t2 - t1, address, flush=True)
    """
)


def cold_start_once() -> dict[str, Any]:
    """One fresh interpreter: import serval, serve.run, first result; timed inside it."""
    # Output goes to files, not pipes: a pipe would also wait for any process that inherited it.
    with tempfile.TemporaryFile("w+") as out:
        t = time.perf_counter()
        try:
            code = subprocess.run(
                [sys.executable, "-c", COLD_START_CODE % free_port()],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=60,
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
        wall = time.perf_counter() - t
        out.seek(0)
        text = out.read()
    line = next((ln for ln in text.splitlines() if ln.startswith("COLD ")), None)
    if code != 0 or line is None:
        what = "timed out after 60 s" if code is None else f"failed (exit {code})"
        raise RuntimeError(f"cold-start subprocess {what}; its output:\n{text}")
    _, first, down, address = line.split()
    return {
        "first_result_s": float(first),
        "shutdown_s": float(down),
        "process_wall_s": wall,
        "address": None if address == "None" else address,
    }


def seq_sync(h: Any, warmup: int, n: int) -> dict[str, float]:
    for _ in range(warmup):
        assert h.echo.remote(1).result() == 1
    lat = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        h.echo.remote(1).result()
        lat.append(clock() - t)
    return summarize(lat)


async def seq_async(h: Any, warmup: int, n: int) -> dict[str, float]:
    for _ in range(warmup):
        assert await h.echo.remote(1) == 1
    lat = []
    clock = time.perf_counter
    for _ in range(n):
        t = clock()
        await h.echo.remote(1)
        lat.append(clock() - t)
    return summarize(lat)


async def burst(h: Any, method: str, n: int) -> float:
    """``n`` calls, at most IN_FLIGHT at a time; returns requests per second."""
    target = getattr(h, method)
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def one() -> None:
        async with sem:
            await target.remote(1)

    t = time.perf_counter()
    await asyncio.gather(*[one() for _ in range(n)])
    return n / (time.perf_counter() - t)


async def async_suite(h: Any, warmup: int, seq_n: int, tput_n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"seq_async": await seq_async(h, warmup, seq_n)}
    for method in ("echo", "aecho"):
        await burst(h, method, min(tput_n, 2000))  # warm-up
        out[f"rps_{method}"] = await burst(h, method, tput_n)
    return out


def cluster_processes(address: str) -> dict[int, str]:
    """Live serval processes of the cluster at ``address`` (other clusters are not ours)."""
    found = {}
    marker = address.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"serval::" in cmd and marker in cmd and state != "Z":
            found[int(entry)] = cmd.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def leftovers(addresses: list[str], grace_s: float = 3.0) -> dict[int, str]:
    """Processes of these (shut down) clusters still alive after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while True:
        left: dict[int, str] = {}
        for address in addresses:
            left.update(cluster_processes(address))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# -- report -------------------------------------------------------------------------------------


def fmt_us(v: float) -> str:
    return f"{v:,.0f} µs"


def fmt_rps(v: float) -> str:
    return f"{v:,.0f}/s"


def report(floors: dict[str, dict[str, float]], cold: list[dict[str, Any]], sv: dict[str, Any],
           opts: argparse.Namespace, elapsed: float) -> dict[str, Any]:
    ref = FLOOR_PLACEMENT if FLOOR_PLACEMENT in floors else "unpinned"
    fseq, fp99, frps = (floors[ref][k] for k in ("seq_p50_us", "seq_p99_us", "rps"))
    ss, sa = sv["seq_sync"], sv["seq_async"]
    cold_med = statistics.median(c["first_result_s"] for c in cold)
    goals = {
        "seq_sync_p50": ss["p50_us"] <= GOAL_SEQ_P50_MAX_X * fseq,
        "seq_async_p50": sa["p50_us"] <= GOAL_SEQ_P50_MAX_X * fseq,
        "rps_echo": sv["rps_echo"] >= GOAL_RPS_MIN_X * frps,
        "rps_aecho": sv["rps_aecho"] >= GOAL_RPS_MIN_X * frps,
        "cold_start": cold_med < GOAL_COLD_START_MAX_S,
    }

    rows: list[tuple[str, ...]] = []

    def row(label: str, floor_v: float | None, serval_v: float, fmt: Any,
            goal: str = "", ok: bool | None = None, ray: str = "") -> None:
        ratio = f"{serval_v / floor_v:.2f}x" if floor_v else ""
        verdict = "" if ok is None else ("yes" if ok else "NO")
        rows.append((label, fmt(floor_v) if floor_v else "-", fmt(serval_v), ratio, goal,
                     verdict, ray))

    seq_goal, rps_goal = f"<= {GOAL_SEQ_P50_MAX_X:g}x", f">= {GOAL_RPS_MIN_X:g}x"
    ray_seq = f"{RAY['seq_p50_us']:,.0f} µs ({RAY['seq_p50_us'] / RAY_FLOOR['seq_p50_us']:.0f}x)"
    ray_rps = f"{RAY['rps']:,.0f}/s ({RAY['rps'] / RAY_FLOOR['rps']:.3f}x)"
    row("sequential p50, sync .result()", fseq, ss["p50_us"], fmt_us, seq_goal,
        goals["seq_sync_p50"], ray_seq)
    row("sequential p99, sync .result()", fp99, ss["p99_us"], fmt_us)
    row("sequential p50, async await", fseq, sa["p50_us"], fmt_us, seq_goal,
        goals["seq_async_p50"])
    row("sequential p99, async await", fp99, sa["p99_us"], fmt_us)
    row(f"throughput, {IN_FLIGHT} in flight, sync echo", frps, sv["rps_echo"], fmt_rps,
        rps_goal, goals["rps_echo"], ray_rps)
    row(f"throughput, {IN_FLIGHT} in flight, async aecho", frps, sv["rps_aecho"], fmt_rps,
        rps_goal, goals["rps_aecho"])
    row("cold start, import -> first result", None, cold_med, lambda v: f"{v:.2f} s",
        f"< {GOAL_COLD_START_MAX_S:g} s", goals["cold_start"], f"{RAY['cold_start_s']:g} s")

    head = ("figure", "floor", "serval", "x floor", "goal", "met", "Ray Serve 2.60 *")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
    mode = "quick" if opts.quick else "full"
    print()
    print(f"serval handle benchmark ({mode} run): Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}, serval {serve.__version__}")
    print(f"  sequential: {opts.seq_n:,} calls after {opts.warmup:,} warm-up; throughput: "
          f"{opts.tput_n:,} calls (floor: {opts.floor_tput_n:,}); cold start: median of "
          f"{len(cold)} fresh process(es)")
    print()
    print(line.format(*head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*r))
    print()
    print("  floor: forked server + uvloop client, Unix socket in a private temp dir, pickled "
          "frames, measured in this run;")
    print(f"    the floor column has client and server on {PLACEMENT_LABELS[ref]}; all placements"
          " (sequential p50 / p99, req/s):")
    for name, f in floors.items():
        mark = "  <- floor" if name == ref else ""
        print(f"      {PLACEMENT_LABELS[name]:<9} {f['seq_p50_us']:>6,.0f} / {f['seq_p99_us']:>6,.0f}"
              f" µs   {f['rps']:>8,.0f}/s{mark}")
    print("  x floor: serval / floor (latency: lower is better; throughput: higher is better).")
    print("  * Ray Serve: measured ELSEWHERE (another 2-core machine), not in this run; in")
    print(f"    brackets, its ratio to the floor measured there ({RAY_FLOOR['seq_p50_us']:.0f} µs,"
          f" {RAY_FLOOR['rps']:,.0f}/s).")
    colds = ", ".join(f"{c['first_result_s']:.2f}" for c in cold)
    print(f"  cold start runs: {colds} s; whole process incl. interpreter start and shutdown: "
          f"{statistics.median(c['process_wall_s'] for c in cold):.2f} s, of which "
          f"serve.shutdown() {statistics.median(c['shutdown_s'] for c in cold):.2f} s")
    print(f"  tails, p99.9 / max: sync {ss['p999_us']:,.0f} / {ss['max_us']:,.0f} µs; "
          f"async {sa['p999_us']:,.0f} / {sa['max_us']:,.0f} µs")
    if sv["leftover_processes"]:
        print(f"  WARNING: {len(sv['leftover_processes'])} serval process(es) outlived "
              "serve.shutdown() by 3 s")
    missed = [k for k, v in goals.items() if not v]
    print(f"  goals met: {len(goals) - len(missed)}/{len(goals)}"
          + (f" (missed: {', '.join(missed)})" if missed else ""))
    print(f"  total run time: {elapsed:.1f} s")
    print()

    r1 = lambda v: round(v, 1)  # noqa: E731
    result = {
        "mode": mode,
        "floor_placement": ref,
        "floor_seq_p50_us": r1(fseq),
        "floor_seq_p99_us": r1(fp99),
        "floor_rps_c64": round(frps),
        "floor_placements": {
            name: {"seq_p50_us": r1(f["seq_p50_us"]), "seq_p99_us": r1(f["seq_p99_us"]),
                   "rps_c64": round(f["rps"])}
            for name, f in floors.items()
        },
        "serval_seq_sync_p50_us": r1(ss["p50_us"]),
        "serval_seq_sync_p99_us": r1(ss["p99_us"]),
        "serval_seq_sync_p999_us": r1(ss["p999_us"]),
        "serval_seq_sync_max_us": r1(ss["max_us"]),
        "serval_seq_async_p50_us": r1(sa["p50_us"]),
        "serval_seq_async_p99_us": r1(sa["p99_us"]),
        "serval_seq_async_p999_us": r1(sa["p999_us"]),
        "serval_seq_async_max_us": r1(sa["max_us"]),
        "serval_rps_c64_echo": round(sv["rps_echo"]),
        "serval_rps_c64_aecho": round(sv["rps_aecho"]),
        "serval_cold_start_s": round(cold_med, 3),
        "serval_cold_start_runs_s": [round(c["first_result_s"], 3) for c in cold],
        "serval_cold_process_wall_s": round(
            statistics.median(c["process_wall_s"] for c in cold), 3),
        "serval_cold_shutdown_s": round(statistics.median(c["shutdown_s"] for c in cold), 3),
        "x_seq_sync_p50": round(ss["p50_us"] / fseq, 2),
        "x_seq_async_p50": round(sa["p50_us"] / fseq, 2),
        "x_rps_echo": round(sv["rps_echo"] / frps, 3),
        "x_rps_aecho": round(sv["rps_aecho"] / frps, 3),
        "goals_met": goals,
        "leftover_processes": len(sv["leftover_processes"]),
        "rayserve_measured_elsewhere": {
            "seq_p50_us": RAY["seq_p50_us"], "rps_c64": RAY["rps"],
            "cold_start_s": RAY["cold_start_s"],
        },
        "elapsed_s": round(elapsed, 1),
    }
    print(json.dumps(result))
    return result


# -- main ---------------------------------------------------------------------------------------


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwind through the finally blocks that clean up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations (a smoke test)")
    ap.add_argument("--check", action="store_true", help="exit 1 if any goal is missed")
    opts = ap.parse_args()
    if opts.quick:
        opts.warmup, opts.seq_n, opts.tput_n, opts.floor_tput_n, opts.cold_n = 200, 1000, 5000, 10_000, 1
    else:
        opts.warmup, opts.seq_n, opts.tput_n, opts.floor_tput_n, opts.cold_n = 1000, 5000, 20_000, 50_000, 3
    signal.signal(signal.SIGTERM, _sigterm)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    started = time.perf_counter()

    # 1. The floor first: it forks, so this process must not have started any thread yet.
    #    Measured with client and server on two CPUs (the floor), on one CPU, and unpinned:
    #    on a VM the sequential round trip differs a lot between them (see README).
    print("measuring the floor ...", flush=True)
    placements = {"two_cpus": cpu_pair(), "one_cpu": cpu_pair(shared=True), "unpinned": None}
    floors = {
        name: measure_floor(warmup=opts.warmup, seq_n=opts.seq_n, tput_n=opts.floor_tput_n,
                            in_flight=IN_FLIGHT, cpus=cpus)
        for name, cpus in placements.items()
        if cpus is not None or name == "unpinned"
    }

    # 2. Cold start, in fresh processes, while nothing else of serval runs.
    print("measuring serval cold start ...", flush=True)
    cold = [cold_start_once() for _ in range(opts.cold_n)]

    # 3. The handle paths, on one no-op deployment.
    print("measuring serval handles ...", flush=True)
    sv: dict[str, Any] = {}
    addresses = [c["address"] for c in cold if c["address"]]
    try:
        serve.start(http_options={"port": free_port()})
        address = cluster_address()
        if address:
            addresses.append(address)
        h = serve.run(Noop.bind(), name=APP)
        sv["seq_sync"] = seq_sync(h, opts.warmup, opts.seq_n)
        sv.update(asyncio.run(async_suite(h, opts.warmup, opts.seq_n, opts.tput_n)))
    finally:
        serve.shutdown()
    sv["leftover_processes"] = leftovers(addresses)
    for pid, cmd in sv["leftover_processes"].items():
        print(f"WARNING: still running 3 s after serve.shutdown(): pid {pid}: {cmd}",
              file=sys.stderr)

    result = report(floors, cold, sv, opts, time.perf_counter() - started)
    if opts.check and not all(result["goals_met"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
