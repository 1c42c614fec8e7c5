"""The chaos and abuse suite, long form: the scenarios of tests/chaos/ at full size.

    python benchmarks/chaos/run.py                     # every scenario (about 6 minutes)
    python benchmarks/chaos/run.py --list              # their names
    python benchmarks/chaos/run.py --only replica-kill,fuzz
    python benchmarks/chaos/run.py --duration 120      # longer load, more kills and examples

Each scenario prints its figures beside its goals (PASS/FAIL), then a summary follows; the last
line on stdout is one JSON object with every scenario's outcome. The exit status is 1 if a goal
was missed. serval's own log lines go to a log file per scenario, not to the terminal.

The short form (the same scenarios scaled down, the same goals asserted) is the test suite's
tests/chaos/, run by ``python -m pytest``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Every cluster of this run lives under a directory of its own, so the check at the end counts
# this run's processes only; set before serval (or tempfile) reads it.
RUN_TMP = tempfile.mkdtemp(prefix="serval-chaos-")
os.environ["TMPDIR"] = RUN_TMP
tempfile.tempdir = RUN_TMP
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from chaos import abuse, faults, floods, hosts, values  # noqa: E402
from chaos.harness import Report, ScenarioSkipped, processes_under  # noqa: E402


def scenarios(duration: float) -> dict[str, Callable[[], Report]]:
    """Name -> the scenario at its long-form size; ``duration`` (s) scales the ones that run
    for a while or repeat a fault."""
    n = max(1, round(duration / 6))  # faults or rounds per scenario
    return {
        "replica-kill": lambda: faults.replica_kill(duration_s=duration, kills=n),
        "controller-kill": lambda: faults.controller_fault("kill", settle_s=min(duration / 3, 10)),
        "controller-stall": lambda: faults.controller_fault("stall", stall_s=5.0),
        "controller-slow-restart": lambda: faults.controller_fault("slow-restart", stall_s=5.0),
        "proxy-kill": lambda: faults.proxy_kill(kills=max(1, n // 2)),
        "rolling-update": lambda: faults.rolling_update(updates=n),
        "driver-kill": lambda: hosts.driver_kill(rounds=n),
        "shadowing": lambda: hosts.shadowing(crash=False),
        "shadowing-crash": lambda: hosts.shadowing(crash=True),
        "pythonpath": lambda: hosts.shadowing(crash=False, where="pythonpath"),
        "pythonpath-crash": lambda: hosts.shadowing(crash=True, where="pythonpath"),
        "other-user": hosts.other_user,
        "malformed": abuse.malformed,
        "pipelined": lambda: abuse.pipelined(requests=50_000),
        "half-sent": abuse.half_sent,  # the proxy's default timeouts: about 35 s
        "fuzz": lambda: abuse.fuzz(examples=round(duration * 700)),
        "slowloris": lambda: floods.slowloris(connections=4000),
        "fd-exhaustion": lambda: floods.fd_exhaustion(measure_s=min(duration / 3, 10)),
        "uploads": lambda: floods.uploads(count=10, size_mb=90, rounds=max(1, n // 2)),
        "slow-readers": lambda: floods.slow_readers(count=10, size_mb=200),
        "values-handles": lambda: values.through_handles(huge_mb=256),
        "values-http": lambda: values.through_http(huge_mb=256),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated scenario names (see --list)")
    parser.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds of load for the long scenarios; faults scale with it",
    )
    parser.add_argument("--list", action="store_true", help="print the scenario names and exit")
    args = parser.parse_args()
    table = scenarios(args.duration)
    if args.list:
        print("\n".join(table))
        return 0
    names = args.only.split(",") if args.only else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)} (see --list)")
    summary: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    try:
        for name in names:
            summary[name] = run_one(name, table[name])
    finally:
        leaked = leftovers()
        shutil.rmtree(RUN_TMP, ignore_errors=True)
    print(f"\n== summary ({time.monotonic() - started:.0f} s)")
    for name, result in summary.items():
        print(
            f"   {result['outcome']:<7} {name}"
            + (f": {', '.join(result['missed'])}" if result["missed"] else "")
        )
    if leaked:
        print(f"   LEAKED  {len(leaked)} serval processes were left and killed: {leaked[:3]}")
    print(json.dumps({"scenarios": summary, "leaked": leaked}))
    bad = leaked or any(r["outcome"] == "FAIL" for r in summary.values())
    return 1 if bad else 0


def run_one(name: str, fn: Callable[[], Report]) -> dict[str, Any]:
    print(f"\n-- {name}", flush=True)
    t0 = time.monotonic()
    try:
        report = fn()
    except ScenarioSkipped as exc:
        return {"outcome": "SKIP", "missed": [], "reason": str(exc)}
    except Exception as exc:  # the report (printed already) has the traceback
        traceback.print_exc(limit=3)
        return {"outcome": "FAIL", "missed": [f"{type(exc).__name__}: {exc}"[:200]]}
    missed = [g.name for g in report.failed]
    return {
        "outcome": "FAIL" if missed else "PASS",
        "missed": missed,
        "seconds": round(time.monotonic() - t0, 1),
        "figures": dict(report.figures),
        "goals": {
            g.name: {"value": g.value, "goal": g.target, "met": g.passed} for g in report.goals
        },
    }


def leftovers() -> list[str]:
    """Command lines of serval processes of this run still alive (killed here)."""
    found = processes_under(RUN_TMP)
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return list(found.values())


if __name__ == "__main__":
    try:
        code = main()
    finally:  # --list, a usage error or Ctrl-C too: leave no directory behind
        shutil.rmtree(RUN_TMP, ignore_errors=True)
    sys.exit(code)
