"""Faults under load: a replica, the controller or the proxy SIGKILLed, the controller stalled
(SIGSTOP) or slow to restart, and a rolling update, each while handle callers and HTTP
keep-alive clients run back to back.

Every deployment is defined inside a function so that it travels to the replicas by value
(no replica has to import this package).
"""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import serval as serve
from chaos.harness import Cluster, Load, Report, first_lines, ms, scenario, wait_for

# The goals.
MAX_FAILED_FRACTION = 0.001  # replica kill: at most 0.1% of requests fail
MAX_REPLACE_S = 2.0  # a killed replica's replacement serves within 2 s
MAX_GAP_S = 0.050  # controller kill or stall: no 50 ms without a completion
# Where a gap is the figure, each caller pauses this long between calls: callers back to back
# keep both CPUs of a small machine busy, and then a gap measures the scheduler (a restarted
# process's start-up taking a CPU from the callers) rather than whether serval kept serving.
PACED_S = 0.002
# The suite's own bound (the issue sets none): a killed proxy serves HTTP again within 5 s.
MAX_PROXY_RECOVERY_S = 5.0


def pid_deployment(num_replicas: int) -> Any:
    @serve.deployment(name="Pid", num_replicas=num_replicas, max_ongoing_requests=100)
    class Pid:
        async def __call__(self, request: Any = None) -> str:
            return str(os.getpid())

    return Pid


def _flowing(load: Load, since: float = 0.0, n: int = 20) -> bool:
    return load.successes_since(since, "handle") >= n and load.successes_since(since, "http") >= n


def _load_figures(report: Report, load: Load, t0: float, t1: float) -> None:
    for kind in ("handle", "http"):
        done = [o for o in load.outcomes(kind) if t0 <= o.end <= t1]
        if done:
            report.figure(f"{kind} requests", len(done), f"({len(done) / (t1 - t0):,.0f}/s)")


# -- replica SIGKILL ------------------------------------------------------------------------------


def replica_kill(
    duration_s: float = 30.0, kills: int = 5, handles: int = 4, conns: int = 4, replicas: int = 2
) -> Report:
    """SIGKILL a replica ``kills`` times over ``duration_s`` seconds of load. Only the calls in
    flight on the killed replica may fail (handles: ReplicaDiedError; HTTP: 502 or 503), at most
    0.1% of all, and a replacement serves within 2 s."""
    setting = f"{duration_s:g} s, {kills} kills, {handles} handle + {conns} HTTP callers"
    with scenario("replica SIGKILL under load", setting) as report:
        cluster = Cluster()
        try:
            handle = serve.run(pid_deployment(replicas).bind(), route_prefix="/pid")
            load = Load(
                lambda: handle.remote().result(timeout_s=10),
                cluster.port,
                "/pid",
                handles=handles,
                conns=conns,
            )
            kill_log: list[tuple[float, float | None, int]] = []  # (killed at, served after, pid)
            with load:
                wait_for(lambda: _flowing(load), 10, "load to flow")
                t0 = time.monotonic()
                step = duration_s / (kills + 1)
                for k in range(kills):
                    time.sleep(max(0.0, t0 + step * (k + 1) - time.monotonic()))
                    before = cluster.replicas("Pid")
                    old = {str(p) for p in before.values()}
                    victim = random.choice(list(before.values()))
                    killed_at = time.monotonic()
                    os.kill(victim, signal.SIGKILL)
                    served = _wait_new_pid(load, killed_at, old, timeout=10)
                    kill_log.append((killed_at, served - killed_at if served else None, victim))
                    wait_for(lambda: len(cluster.replicas("Pid")) == replicas, 10, "replicas back")
                time.sleep(max(0.0, t0 + duration_s - time.monotonic()))
                t1 = time.monotonic()
            _judge_replica_kill(report, load, kill_log, t0, t1)
        finally:
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


def _wait_new_pid(load: Load, after: float, old: set[str], timeout: float) -> float | None:
    """When the first reply from a replica not in ``old`` arrived (None: none in time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = [
            t
            for kind in ("handle", "http")
            if (t := load.first_success(kind, after, lambda o: o.value not in old)) is not None
        ]
        if times:
            return min(times)
        time.sleep(0.01)
    return None


def _allowed_failure(o: Any) -> bool:
    if o.kind == "handle":
        return o.value.startswith("ReplicaDiedError")
    return o.value.startswith(("HTTP 502", "HTTP 503"))


def _failure_line(o: Any, kill_times: list[float]) -> str:
    at = max((t for t in kill_times if t <= o.end), default=None)
    if at is None:
        return f"{o.kind} #{o.caller} (before any kill): {o.value}"
    return (
        f"{o.kind} #{o.caller} sent {ms(o.start - at):+.0f} ms, ended {ms(o.end - at):+.0f} ms "
        f"after a kill: {o.value}"
    )


def _judge_replica_kill(
    report: Report,
    load: Load,
    kill_log: list[tuple[float, float | None, int]],
    t0: float,
    t1: float,
) -> None:
    _load_figures(report, load, t0, t1)
    done = [o for o in load.outcomes() if t0 <= o.end <= t1]
    failed = [o for o in load.failures() if t0 <= o.end <= t1]
    report.figure("failed requests", len(failed))
    replace = [s for _, s, _ in kill_log]
    if replace and None not in replace:
        report.figure("replacement serves after", ", ".join(f"{ms(s):.0f}" for s in replace), "ms")  # type: ignore[arg-type]
    fraction = len(failed) / max(1, len(done))
    report.at_most(
        "failed fraction",
        fraction * 100,
        MAX_FAILED_FRACTION * 100,
        "%",
        first_lines(f"{o.kind}: {o.value}" for o in failed),
    )
    unexpected = [o for o in failed if not _allowed_failure(o)]
    report.check(
        "failures are ReplicaDiedError / 502 / 503",
        not unexpected,
        len(unexpected),
        first_lines(f"{o.kind}: {o.value}" for o in unexpected),
    )
    # Only calls in flight on the killed replica may fail: at most one per caller per kill,
    # and each one ends soon after a kill.
    per_kill: dict[tuple[int, int], int] = {}
    stray = []
    for o in failed:
        # The last kill before it: kills come about 2 s apart, so the window after one may
        # overlap the next kill's, and a failure of the next must not count against this one.
        k = max((i for i, (at, _, _) in enumerate(kill_log) if at <= o.end), default=None)
        if k is None or o.end > kill_log[k][0] + 2.0:
            stray.append(o)
        else:
            per_kill[(k, o.caller)] = per_kill.get((k, o.caller), 0) + 1
    worst = max(per_kill.values(), default=0)
    kill_times = [at for at, _, _ in kill_log]
    report.check(
        "only in-flight calls failed (<= 1 per caller per kill)",
        worst <= 1 and not stray,
        f"{worst} max, {len(stray)} stray",
        # Each failure with its caller and when it started and ended after the last kill
        # before it: two from one caller tell whether the second was sent after the first.
        first_lines(_failure_line(o, kill_times) for o in failed),
    )
    if None in replace:
        report.check("a replacement served", False, "no", f"kills: {kill_log}")
    else:
        report.below("time until a replacement serves", ms(max(replace)), ms(MAX_REPLACE_S), "ms")  # type: ignore[arg-type]


# -- controller SIGKILL, stall, slow restart -------------------------------------------------


def controller_fault(
    mode: str = "kill",
    stall_s: float = 5.0,
    handles: int = 4,
    conns: int = 4,
    settle_s: float = 2.0,
) -> Report:
    """``mode``: "kill" (SIGKILL the controller), "stall" (SIGSTOP it for ``stall_s``) or
    "slow-restart" (SIGKILL it, then SIGSTOP its successor for ``stall_s`` before it can
    answer). Completions never stop: no gap over 50 ms for handles or HTTP, and 0 failures."""
    titles = {
        "kill": "controller SIGKILL under load",
        "stall": f"controller stalled (SIGSTOP {stall_s:g} s) under load",
        "slow-restart": f"controller SIGKILL, successor stalled {stall_s:g} s, under load",
    }
    setting = f"{handles} handle + {conns} HTTP callers, {ms(PACED_S):g} ms between calls"
    with scenario(titles[mode], setting) as report:
        cluster = Cluster()
        stopped: list[int] = []
        try:
            handle = serve.run(pid_deployment(2).bind(), route_prefix="/pid")
            load = Load(
                lambda: handle.remote().result(timeout_s=10),
                cluster.port,
                "/pid",
                handles=handles,
                conns=conns,
                pause_s=PACED_S,
            )
            with load:
                wait_for(lambda: _flowing(load), 10, "load to flow")
                base0 = time.monotonic()
                time.sleep(1.0)
                old = cluster.pid("controller")
                assert old is not None
                fault = time.monotonic()
                if mode == "stall":
                    os.kill(old, signal.SIGSTOP)
                    stopped.append(old)
                else:
                    os.kill(old, signal.SIGKILL)
                if mode == "slow-restart":
                    new = wait_for(
                        lambda: (p := cluster.pid("controller")) not in (None, old) and p,
                        10,
                        "the controller's successor",
                        interval=0.001,
                    )
                    os.kill(new, signal.SIGSTOP)
                    stopped.append(new)
                    report.figure("successor stopped after", ms(time.monotonic() - fault), "ms")
                if stopped:
                    time.sleep(stall_s)
                    os.kill(stopped[-1], signal.SIGCONT)
                    stopped.clear()
                wait_for(lambda: _app_running(), 20, "serve.status() to answer again")
                recovered = time.monotonic()
                time.sleep(settle_s)
                t1 = time.monotonic()
            report.figure("control plane answers again after", ms(recovered - fault), "ms")
            _load_figures(report, load, fault, t1)
            for kind in ("handle", "http"):
                gap, _ = load.max_gap(kind, base0, fault)
                report.figure(f"{kind} longest gap before the fault", ms(gap), "ms")
            report.figure(
                "longest stall of the calling process itself",
                ms(load.longest_stall(fault, t1)),
                "ms",
            )
            for kind in ("handle", "http"):
                gap, at = load.max_gap(kind, fault, t1)
                report.at_most(
                    f"{kind} longest gap without a completion",
                    ms(gap),
                    ms(MAX_GAP_S),
                    "ms",
                    f"from {ms(at - fault):.0f} ms after the fault",
                )
            failed = [o for o in load.failures() if o.end >= base0]
            report.check(
                "0 failed requests",
                not failed,
                len(failed),
                first_lines(f"{o.kind}: {o.value}" for o in failed),
            )
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


def _app_running() -> bool:
    try:
        app = serve.status().applications.get("default")
    except Exception:
        return False
    return app is not None and app.status == "RUNNING"


# -- proxy SIGKILL ---------------------------------------------------------------------------


def proxy_kill(kills: int = 3, handles: int = 4, conns: int = 4, settle_s: float = 2.0) -> Report:
    """SIGKILL the proxy: a new one serves HTTP again (within 5 s, the suite's bound), and the
    handle callers never notice (0 failures, no gap over 50 ms)."""
    with scenario(
        "proxy SIGKILL under load",
        f"{kills} kills, {handles} handle + {conns} HTTP callers, {ms(PACED_S):g} ms between calls",
    ) as report:
        cluster = Cluster()
        try:
            handle = serve.run(pid_deployment(2).bind(), route_prefix="/pid")
            load = Load(
                lambda: handle.remote().result(timeout_s=10),
                cluster.port,
                "/pid",
                handles=handles,
                conns=conns,
                pause_s=PACED_S,
            )
            recoveries: list[float] = []
            with load:
                wait_for(lambda: _flowing(load), 10, "load to flow")
                t0 = time.monotonic()
                for _ in range(kills):
                    old = cluster.pid("proxy")
                    assert old is not None
                    killed = time.monotonic()
                    os.kill(old, signal.SIGKILL)
                    wait_for(
                        lambda old=old: cluster.pid("proxy") not in (None, old), 15, "a new proxy"
                    )
                    served = wait_for(
                        lambda t=killed: load.first_success("http", t, lambda o: o.start > t),
                        15,
                        "HTTP to serve again",
                    )
                    recoveries.append(served - killed)
                    time.sleep(settle_s)
                t1 = time.monotonic()
            _load_figures(report, load, t0, t1)
            http_failed = [o for o in load.failures("http") if o.end >= t0]
            report.figure("HTTP attempts that failed while the proxy was down", len(http_failed))
            report.figure(
                "HTTP serves again after", ", ".join(f"{ms(s):.0f}" for s in recoveries), "ms"
            )
            report.below(
                "time until HTTP serves again", ms(max(recoveries)), ms(MAX_PROXY_RECOVERY_S), "ms"
            )
            failed = [o for o in load.failures("handle") if o.end >= t0]
            report.check(
                "0 failed handle calls",
                not failed,
                len(failed),
                first_lines(o.value for o in failed),
            )
            gap, at = load.max_gap("handle", t0, t1)
            report.at_most(
                "handle longest gap without a completion",
                ms(gap),
                ms(MAX_GAP_S),
                "ms",
                f"from {ms(at - t0):.0f} ms after the first kill",
            )
        finally:
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report


# -- rolling update --------------------------------------------------------------------------


def versioned_deployment(version: int) -> Any:
    """The same deployment with different code each version (the constant is in the code)."""
    source = f"""
@serve.deployment(name="Echo", num_replicas=2, graceful_shutdown_timeout_s=2)
class Echo:
    async def __call__(self, request=None):
        return "v{version}:" + str(os.getpid())
"""
    # Not an importable module's: cloudpickle ships the class by value.
    namespace: dict[str, Any] = {"__name__": "chaos_echo_code", "serve": serve, "os": os}
    exec(compile(source, f"<Echo v{version}>", "exec"), namespace)
    return namespace["Echo"]


def rolling_update(updates: int = 5, handles: int = 4, conns: int = 4) -> Report:
    """Redeploy changed code ``updates`` times under load: 0 failed requests, and every
    update replaces the replica processes."""
    with scenario(
        "rolling update under load", f"{updates} updates, {handles} handle + {conns} HTTP callers"
    ) as report:
        cluster = Cluster()
        try:
            handle = serve.run(versioned_deployment(1).bind(), route_prefix="/echo")
            load = Load(
                lambda: handle.remote().result(timeout_s=10),
                cluster.port,
                "/echo",
                handles=handles,
                conns=conns,
            )
            rollouts, stale = [], []
            with load:
                wait_for(lambda: _flowing(load), 10, "load to flow")
                t0 = time.monotonic()
                for version in range(2, updates + 2):
                    old = set(cluster.replicas("Echo").values())
                    start = time.monotonic()
                    serve.run(versioned_deployment(version).bind(), route_prefix="/echo")
                    rollouts.append(time.monotonic() - start)
                    wait_for(
                        lambda old=old: not old & set(cluster.replicas("Echo").values()),
                        15,
                        "the old replicas to exit",
                    )
                    exited = time.monotonic()
                    wait_for(lambda t=exited: _flowing(load, t, 10), 10, "load after the update")
                    stale += [
                        o
                        for o in load.outcomes()
                        if o.ok and o.start > exited and not o.value.startswith(f"v{version}:")
                    ]
                t1 = time.monotonic()
            _load_figures(report, load, t0, t1)
            report.figure(
                "serve.run of an update took", ", ".join(f"{ms(s):.0f}" for s in rollouts), "ms"
            )
            for kind in ("handle", "http"):
                gap, _ = load.max_gap(kind, t0, t1)
                report.figure(f"{kind} longest gap without a completion", ms(gap), "ms")
            failed = [o for o in load.failures() if o.end >= t0]
            report.check(
                "0 failed requests",
                not failed,
                len(failed),
                first_lines(f"{o.kind}: {o.value}" for o in failed),
            )
            report.check(
                "only new code answers once the old replicas exited",
                not stale,
                len(stale),
                first_lines(o.value for o in stale),
            )
        finally:
            left = cluster.close()
        report.check("no process left after shutdown", not left, len(left), first_lines(left))
    return report
