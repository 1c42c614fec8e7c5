"""serval on Ray against its floor (a bare Ray actor call), serval's local backend and Ray Serve
2.60, all on one Ray instance, in one run.

    python benchmarks/ray_bench.py             # full run: 3 rounds (about 7 min)
    python benchmarks/ray_bench.py --quick     # 1 short round (about 1.5 min), a smoke test
    python benchmarks/ray_bench.py --nodes 3   # a 3-node ray.cluster_utils.Cluster: replicas on
                                               # worker nodes, calls over serval's TCP path
    python benchmarks/ray_bench.py --check     # exit 1 if a goal is missed

Needs Ray Serve (``pip install -e '.[dev,bench]'``) and ``wrk``. The benchmark starts a Ray
instance of its own on 127.0.0.1 (``ray.init``, or a Cluster with ``--nodes``) and measures, in
every round, one target at a time (nothing else deployed meanwhile):

1. a bare Ray actor (``@ray.remote(num_cpus=0) class Echo``), the floor of any Ray-backed call:
   ``ray.get(actor.echo.remote(1))`` sequentially, ``await actor.echo.remote(1)`` sequentially
   and with 64 in flight;
2. serval on Ray (``serve.start`` / ``serve.run`` after ``ray.init``: the Ray backend): the same
   handle workloads, ``h.echo.remote(1).result()`` and ``await h.echo.remote(1)``, then HTTP
   with wrk: a no-op at 32 connections and at 1, an ingress calling a child at 32; and, where
   this serval has it, the same handle workloads by reference
   (``h.options(_by_reference=True)``: each call a Ray actor call);
3. serval's local backend (``serve.start(backend="local")``), in a child process that never
   imports Ray: the same workloads;
4. Ray Serve 2.60 on the same Ray instance: the same workloads.

Every deployment has ``max_ongoing_requests=1000`` and ``ray_actor_options={"num_cpus": 0}``.
Rounds alternate the targets (serval on Ray and serval local swap places every round); latency
percentiles pool every round's samples, every other figure is the median of the rounds. Prints
a table of the figures, the goals of issue 12 as ratios measured in this run, and, last on
stdout, one JSON line with every figure. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

# Before Ray is imported anywhere: otherwise Ray rewrites 127.0.0.1 into the machine's own
# address, where nothing of a loopback instance listens.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import uvloop  # noqa: E402
from _common import exit_cleanly_on_sigterm, free_port  # noqa: E402
from _proc_tree import SEEN, CpuWindow, leftovers, quiesce, tree_rss  # noqa: E402
from http_bench import run_wrk, source_version, wait_http  # noqa: E402

import serval as serve  # noqa: E402

IN_FLIGHT = 64
CONNS = 32
CALL_TIMEOUT_S = 60.0  # every single call; a whole handle suite is bounded too
SUITE_TIMEOUT_S = 300.0
# A target's slot in a round takes under a minute: past this, every thread's stack is dumped to
# stderr (and again every as long), so that a hang says where it is.
WATCHDOG_S = 300.0

# Goals (issue 12, "Speed"), as ratios measured in this run.
GOAL_LOCAL_X = 1.5  # serval on Ray vs serval local: p50 at most 1.5x, req/s at least 1/1.5
GOAL_RAYSERVE_X = 20.0  # serval on Ray HTTP (no-op and ingress -> child) >= 20x Ray Serve's
GOAL_ACTOR_X = 1.5  # by reference vs a bare Ray actor call: within 1.5x

TARGETS = ("actor", "serval_ray", "serval_local", "rayserve")
LABELS = {
    "actor": "bare Ray actor",
    "serval_byref": "serval on Ray, by ref",
    "serval_ray": "serval on Ray",
    "serval_local": "serval local",
    "rayserve": "Ray Serve 2.60",
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    rounds: int
    warmup_s: float  # handle calls before each timed figure
    seq_s: float  # each sequential figure
    burst_s: float  # each throughput figure
    wrk_warmup_s: int
    wrk_c32_s: int
    wrk_c1_s: int


SIZES = {
    "full": Sizes(
        rounds=3, warmup_s=1.0, seq_s=3.0, burst_s=4.0, wrk_warmup_s=2, wrk_c32_s=6, wrk_c1_s=3
    ),
    "quick": Sizes(
        rounds=1, warmup_s=0.3, seq_s=1.0, burst_s=1.5, wrk_warmup_s=1, wrk_c32_s=2, wrk_c1_s=1
    ),
}

_DEPLOYMENT = {"max_ongoing_requests": 1000, "ray_actor_options": {"num_cpus": 0}}


@serve.deployment(**_DEPLOYMENT)
class Noop:
    def __call__(self, request: Any) -> str:
        return "ok"

    def echo(self, x: Any) -> Any:
        return x


@serve.deployment(**_DEPLOYMENT)
class Child:
    def echo(self, x: Any) -> Any:
        return x


@serve.deployment(**_DEPLOYMENT)
class Chain:
    def __init__(self, child: Any) -> None:
        self.child = child

    async def __call__(self, request: Any) -> Any:
        return await self.child.echo.remote("x")


# -- handle workloads, the same for every target ------------------------------------------------


@dataclasses.dataclass
class Caller:
    """One target's call: ``sync()`` blocks for the answer, ``call()`` returns an awaitable."""

    sync: Callable[[], Any]
    call: Callable[[], Awaitable[Any]]


def seq_sync(c: Caller, warmup_s: float, seconds: float) -> list[float]:
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        assert c.sync() == 1
    lat: list[float] = []
    clock = time.perf_counter
    deadline = clock() + seconds
    while (t := clock()) < deadline:
        c.sync()
        lat.append(clock() - t)
    return lat


async def seq_async(c: Caller, warmup_s: float, seconds: float) -> list[float]:
    deadline = time.perf_counter() + warmup_s
    while time.perf_counter() < deadline:
        assert await c.call() == 1
    lat: list[float] = []
    clock = time.perf_counter
    deadline = clock() + seconds
    while (t := clock()) < deadline:
        await c.call()
        lat.append(clock() - t)
    return lat


async def burst(c: Caller, seconds: float) -> tuple[int, float]:
    """IN_FLIGHT callers, each issuing its next call when its last one is answered (always
    IN_FLIGHT in flight, as a semaphore over a queue of calls keeps them), until ``seconds``
    have passed; (calls answered, seconds until the last answer)."""
    clock = time.perf_counter
    deadline = clock() + seconds
    done = 0

    async def caller() -> None:
        nonlocal done
        while clock() < deadline:
            await c.call()
            done += 1

    t = clock()
    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return done, clock() - t


async def _async_part(c: Caller, s: Sizes, cpu_root: int) -> dict[str, Any]:
    async with asyncio.timeout(SUITE_TIMEOUT_S):
        out: dict[str, Any] = {"seq_async": await seq_async(c, s.warmup_s, s.seq_s)}
        await burst(c, s.warmup_s)
        window = CpuWindow(cpu_root, {os.getpid(): "driver"})
        n, elapsed = await burst(c, s.burst_s)
        cpu = window.stop()
    out.update(rps=n / elapsed, calls=n, cpu_s=cpu, cpu_us_per_req=sum(cpu.values()) / n * 1e6)
    return out


def handle_suite(c: Caller, s: Sizes, cpu_root: int) -> dict[str, Any]:
    """Sequential sync, sequential async, then throughput with IN_FLIGHT in flight (with the
    CPU time of the whole process tree under ``cpu_root``, this driver included)."""
    out: dict[str, Any] = {"seq_sync": seq_sync(c, s.warmup_s, s.seq_s)}
    # uvloop: the loop serval's own processes run on, for every target alike.
    out.update(uvloop.run(_async_part(c, s, cpu_root)))
    return out


# -- HTTP workloads -----------------------------------------------------------------------------


def http_suite(port: int, s: Sizes) -> dict[str, Any]:
    """wrk against ``/noop`` at CONNS connections and 1, then ``/chain`` at CONNS; the CPU time
    of every process of the run (wrk excluded) during each CONNS-connection run."""
    out: dict[str, Any] = {}
    for name, expect in (("noop", b"ok"), ("chain", b"x")):
        url = f"http://127.0.0.1:{port}/{name}"
        wait_http(port, f"/{name}", expect, timeout_s=CALL_TIMEOUT_S)
        run_wrk(url, CONNS, s.wrk_warmup_s)
        window = CpuWindow(os.getpid(), {os.getpid(): "driver"})
        c32 = run_wrk(url, CONNS, s.wrk_c32_s)
        cpu = window.stop()
        c32["cpu_s"] = cpu
        c32["cpu_us_per_req"] = sum(cpu.values()) / max(c32.get("requests", 0), 1) * 1e6
        out[f"{name}_c32"] = c32
        if name == "noop":
            out["noop_c1"] = run_wrk(url, 1, s.wrk_c1_s, threads=1)
    return out


# -- the targets on Ray -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Placement:
    """Ray resources that put the ingress (and the bare actor) and the child on chosen nodes;
    empty on one node."""

    ingress: dict[str, float]
    child: dict[str, float]
    # On a Cluster, each framework's one HTTP proxy on the head: every request crosses nodes
    # (and Ray Serve's proxies, one per node on one machine, would contend for one port).
    proxy_location: str | None = None

    def options(self, child: bool = False) -> dict[str, Any]:
        resources = self.child if child else self.ingress
        return {"num_cpus": 0, **({"resources": resources} if resources else {})}


def measure_actor(s: Sizes, where: Placement) -> dict[str, Any]:
    import ray

    @ray.remote
    class Echo:
        def echo(self, x: Any) -> Any:
            return x

    before = tree_rss(os.getpid())
    t = time.perf_counter()
    actor = Echo.options(**where.options()).remote()  # type: ignore[attr-defined]
    out: dict[str, Any] = {}
    try:
        assert ray.get(actor.echo.remote(1), timeout=CALL_TIMEOUT_S) == 1
        out["cold_s"] = time.perf_counter() - t
        c = Caller(
            sync=lambda: ray.get(actor.echo.remote(1), timeout=CALL_TIMEOUT_S),
            call=lambda: actor.echo.remote(1),
        )
        out.update(handle_suite(c, s, os.getpid()))
    finally:
        out["rss_added"] = tree_rss(os.getpid()) - before
        ray.kill(actor)
    return out


def _serval_apps(where: Placement) -> tuple[Any, Any]:
    noop = Noop.options(ray_actor_options=where.options()).bind()
    child = Child.options(ray_actor_options=where.options(child=True)).bind()
    return noop, Chain.options(ray_actor_options=where.options()).bind(child)


def measure_serval_ray(s: Sizes, where: Placement, by_ref: bool) -> dict[str, Any]:
    import ray

    before = tree_rss(os.getpid())
    port = free_port()
    t = time.perf_counter()
    serve.start(http_options={"port": port}, proxy_location=where.proxy_location)
    try:
        noop, chain = _serval_apps(where)
        h = serve.run(noop, name="noop", route_prefix="/noop")
        assert h.echo.remote(1).result(timeout_s=CALL_TIMEOUT_S) == 1
        out: dict[str, Any] = {"cold_s": time.perf_counter() - t}
        serve.run(chain, name="chain", route_prefix="/chain")
        replicas = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serval" and a["name"].startswith("SERVAL_REPLICA:")
        ]
        if len(replicas) != 3:  # noop, chain, child: on Ray, or this is not what it claims
            raise RuntimeError(f"serval's replicas are not Ray actors here: {replicas}")
        c = Caller(
            sync=lambda: h.echo.remote(1).result(timeout_s=CALL_TIMEOUT_S),
            call=lambda: h.echo.remote(1),
        )
        out.update(handle_suite(c, s, os.getpid()))
        if by_ref:
            out["byref"] = measure_by_reference(h, s)
        out.update(http_suite(port, s))
        out["rss_added"] = tree_rss(os.getpid()) - before
    finally:
        t = time.perf_counter()
        serve.shutdown()
    out["shutdown_s"] = time.perf_counter() - t
    return out


def by_reference(h: Any) -> tuple[Any, str | None]:
    """``h.options(_by_reference=True)`` and None, or None and why this serval has none."""
    try:
        ref = h.options(_by_reference=True)
        assert ref.echo.remote(1).result(timeout_s=CALL_TIMEOUT_S) == 1
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return ref, None


def measure_by_reference(h: Any, s: Sizes) -> dict[str, Any]:
    ref, why = by_reference(h)
    if ref is None:
        return {"unavailable": why}
    c = Caller(
        sync=lambda: ref.echo.remote(1).result(timeout_s=CALL_TIMEOUT_S),
        call=lambda: ref.echo.remote(1),
    )
    return handle_suite(c, s, os.getpid())


def _rayserve_apps(where: Placement) -> tuple[Any, Any]:
    from ray import serve as rserve

    @rserve.deployment(max_ongoing_requests=1000)
    class RNoop:
        def __call__(self, request: Any) -> str:
            return "ok"

        def echo(self, x: Any) -> Any:
            return x

    @rserve.deployment(max_ongoing_requests=1000)
    class RChild:
        def echo(self, x: Any) -> Any:
            return x

    @rserve.deployment(max_ongoing_requests=1000)
    class RChain:
        def __init__(self, child: Any) -> None:
            self.child = child

        async def __call__(self, request: Any) -> Any:
            return await self.child.echo.remote("x")

    noop = RNoop.options(ray_actor_options=where.options()).bind()
    child = RChild.options(ray_actor_options=where.options(child=True)).bind()
    return noop, RChain.options(ray_actor_options=where.options()).bind(child)


def measure_rayserve(s: Sizes, where: Placement) -> dict[str, Any]:
    from ray import serve as rserve

    before = tree_rss(os.getpid())
    port = free_port()
    t = time.perf_counter()
    rserve.start(
        http_options={"host": "127.0.0.1", "port": port},
        **({"proxy_location": where.proxy_location} if where.proxy_location else {}),
    )
    try:
        noop, chain = _rayserve_apps(where)
        h = rserve.run(noop, name="noop", route_prefix="/noop")
        assert h.echo.remote(1).result(timeout_s=CALL_TIMEOUT_S) == 1
        out: dict[str, Any] = {"cold_s": time.perf_counter() - t}
        rserve.run(chain, name="chain", route_prefix="/chain")
        c = Caller(
            sync=lambda: h.echo.remote(1).result(timeout_s=CALL_TIMEOUT_S),
            call=lambda: h.echo.remote(1),
        )
        out.update(handle_suite(c, s, os.getpid()))
        out.update(http_suite(port, s))
        out["rss_added"] = tree_rss(os.getpid()) - before
    finally:
        t = time.perf_counter()
        rserve.shutdown()
    out["shutdown_s"] = time.perf_counter() - t
    return out


# -- serval local, in a child process that never imports Ray ------------------------------------


class LocalChild:
    """``ray_bench.py --local-child``: a driver with a local serval cluster. Commands go to its
    stdin, one a line; it answers ``RB <kind> <json>`` lines on a pipe of their own (its own
    stdout and its cluster's go to stderr)."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVAL_", "RAY_"))}
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--local-child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buf = b""
        self.stopped = False

    def ask(self, command: str, payload: Any = None, timeout_s: float = SUITE_TIMEOUT_S) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{command} {json.dumps(payload)}\n".encode())
        self.proc.stdin.flush()
        return self.answer(command, timeout_s)

    def answer(self, kind: str, timeout_s: float) -> Any:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"serval local: no answer to {kind!r} in {timeout_s:g} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"serval local's driver exited (code {self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        tag, got, body = line.decode().split(" ", 2)
        if tag != "RB" or got not in (kind, "error"):
            raise RuntimeError(f"serval local: unexpected answer {line[:200]!r}")
        if got == "error":
            raise RuntimeError(f"serval local failed at {kind!r}: {json.loads(body)}")
        return json.loads(body)

    def stop(self) -> float:
        """Shut its cluster down; how long ``serve.shutdown()`` took."""
        self.stopped = True
        return float(self.ask("stop", timeout_s=60)["shutdown_s"])

    def close(self) -> None:
        if not self.stopped and self.proc.poll() is None:
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                self.stop()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def measure_serval_local(s: Sizes) -> dict[str, Any]:
    child = LocalChild()
    try:
        ready = child.answer("ready", timeout_s=120)
        out: dict[str, Any] = {"cold_s": ready["cold_s"], "address": ready["address"]}
        out.update(child.ask("handle", dataclasses.asdict(s)))
        out.update(http_suite(ready["port"], s))
        # Its cluster's processes; its driver is counted no more than the Ray targets' one is.
        out["rss_added"] = tree_rss(child.proc.pid, skip_root=True)
        out["shutdown_s"] = child.stop()
    finally:
        child.close()
    return out


def local_child_main() -> int:
    """The child's side of ``LocalChild``."""
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed here, or by the cluster's processes, goes to stderr

    def say(kind: str, body: Any) -> None:
        proto.write(f"RB {kind} {json.dumps(body)}\n")
        proto.flush()

    port = free_port()
    try:
        t = time.perf_counter()
        serve.start(http_options={"port": port}, backend="local")
        noop, chain = _serval_apps(Placement({}, {}))
        h = serve.run(noop, name="noop", route_prefix="/noop")
        assert h.echo.remote(1).result(timeout_s=CALL_TIMEOUT_S) == 1
        cold = time.perf_counter() - t
        serve.run(chain, name="chain", route_prefix="/chain")
        say("ready", {"cold_s": cold, "port": port, "address": _serval_address()})
        for line in sys.stdin:
            command, payload = line.split(" ", 1)
            if command == "handle":
                c = Caller(
                    sync=lambda: h.echo.remote(1).result(timeout_s=CALL_TIMEOUT_S),
                    call=lambda: h.echo.remote(1),
                )
                say("handle", handle_suite(c, Sizes(**json.loads(payload)), os.getpid()))
            elif command == "stop":
                break
    except Exception as exc:
        say("error", f"{type(exc).__name__}: {exc}")
        raise
    finally:
        t = time.perf_counter()
        serve.shutdown()
    say("stop", {"shutdown_s": time.perf_counter() - t})
    return 0


def _serval_address() -> str | None:
    try:  # private API: only the leak check needs it
        from serval._private.caller import runtime

        return runtime.address()
    except Exception:
        return None


# -- the Ray instance ---------------------------------------------------------------------------


@contextlib.contextmanager
def ray_instance(nodes: int, temp_dir: str) -> Iterator[Placement]:
    """A Ray instance of this run's own on 127.0.0.1: ``ray.init`` (one node), or a head and
    ``nodes - 1`` workers; yields where the ingress and the child go (worker nodes, so that
    calls cross nodes)."""
    import ray

    if nodes == 1:
        ray.init(
            num_cpus=2,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            _temp_dir=temp_dir,
            log_to_driver=False,
        )
        try:
            yield Placement({}, {})
        finally:
            ray.shutdown()
        return
    from ray.cluster_utils import Cluster

    head = {
        "num_cpus": 2,
        "node_ip_address": "127.0.0.1",
        "include_dashboard": False,
        "temp_dir": temp_dir,
        "resources": {"head": 100},
    }
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for i in range(1, nodes):
            cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources={f"w{i}": 100})
        cluster.wait_for_nodes()
        port = cluster.address.rpartition(":")[2]  # Ray reports the machine's IP: keep loopback
        ray.init(address=f"127.0.0.1:{port}", _node_ip_address="127.0.0.1", log_to_driver=False)
        yield Placement({"w1": 0.001}, {f"w{min(2, nodes - 1)}": 0.001}, "HeadOnly")
    finally:
        ray.shutdown()
        cluster.shutdown()


# -- figures ------------------------------------------------------------------------------------


def pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def latency(rounds: list[list[float]]) -> dict[str, Any]:
    pooled = sorted(x for r in rounds for x in r)
    return {
        "p50_us": pct(pooled, 0.5) * 1e6,
        "p99_us": pct(pooled, 0.99) * 1e6,
        "p999_us": pct(pooled, 0.999) * 1e6,
        "max_us": pooled[-1] * 1e6,
        "n": len(pooled),
        "round_p50_us": [pct(sorted(r), 0.5) * 1e6 for r in rounds],
    }


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's figures over its rounds."""
    if not rounds:
        return {}
    f: dict[str, Any] = {}
    for key in ("seq_sync", "seq_async"):
        f[key] = latency([r[key] for r in rounds])
    f["rps"] = med([r["rps"] for r in rounds])
    f["rps_rounds"] = [r["rps"] for r in rounds]
    f["cpu_us_per_req"] = med([r["cpu_us_per_req"] for r in rounds])
    f["cpu_by_process_s"] = _median_by_key([r["cpu_s"] for r in rounds])
    for key in ("cold_s", "shutdown_s", "rss_added"):
        if all(key in r for r in rounds):
            f[key] = med([r[key] for r in rounds])
    if "noop_c32" in rounds[0]:
        for run in ("noop_c32", "noop_c1", "chain_c32"):
            f[run] = _wrk_figures([r[run] for r in rounds])
    return f


def _wrk_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds_rps": [r["rps"] for r in runs]}
    for key in ("rps", "p50_ms", "p99_ms", "max_ms", "cpu_us_per_req"):
        if all(key in r for r in runs):
            out[key] = med([r[key] for r in runs])
    out["errors"] = sum(r["errors"] for r in runs)
    out["requests"] = sum(r.get("requests", 0) for r in runs)
    if all("cpu_s" in r for r in runs):
        out["cpu_by_process_s"] = _median_by_key([r["cpu_s"] for r in runs])
    return out


def _median_by_key(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in dicts for k in d})
    return {k: round(statistics.median(d.get(k, 0.0) for d in dicts), 3) for k in keys}


@dataclasses.dataclass
class Goal:
    name: str
    label: str
    ratio: float | None  # None: not measured
    bound: str  # "<= 1.5x"
    ok: bool | None
    by_round: list[float]
    why: str = ""


def goals(fig: dict[str, dict[str, Any]], raw: dict[str, list[dict[str, Any]]]) -> list[Goal]:
    ray, local, rs, actor = fig["serval_ray"], fig["serval_local"], fig["rayserve"], fig["actor"]
    out: list[Goal] = []

    def add(
        name: str,
        label: str,
        a: float | None,
        b: float | None,
        bound: float,
        most: bool,
        by_round: list[float],
        why: str = "",
    ) -> None:
        ratio = a / b if a is not None and b else None
        ok = None if ratio is None else (ratio <= bound if most else ratio >= bound)
        sign = "<=" if most else ">="
        out.append(Goal(name, label, ratio, f"{sign} {bound:.3g}x", ok, by_round, why))

    def rounds_of(a: str, b: str, get: Callable[[dict[str, Any]], float]) -> list[float]:
        return [get(x) / get(y) for x, y in zip(raw[a], raw[b], strict=False) if get(y)]

    def p50(r: dict[str, Any], key: str) -> float:
        return pct(sorted(r[key]), 0.5)

    for key, what in (("seq_sync", "sync .result()"), ("seq_async", "async await")):
        add(
            f"{key}_p50_vs_local",
            f"seq p50 {what}: serval on Ray / serval local",
            ray.get(key, {}).get("p50_us"),
            local.get(key, {}).get("p50_us"),
            GOAL_LOCAL_X,
            True,
            rounds_of("serval_ray", "serval_local", lambda r, k=key: p50(r, k)),
        )
    add(
        "rps_vs_local",
        f"{IN_FLIGHT} in flight req/s: serval on Ray / serval local",
        ray.get("rps"),
        local.get("rps"),
        1 / GOAL_LOCAL_X,
        False,
        rounds_of("serval_ray", "serval_local", lambda r: r["rps"]),
    )
    for run, what in (
        ("noop_c32", f"HTTP no-op, {CONNS} conns"),
        ("chain_c32", f"HTTP ingress -> child, {CONNS} conns"),
    ):
        add(
            f"{run}_vs_rayserve",
            f"{what} req/s: serval on Ray / Ray Serve",
            ray.get(run, {}).get("rps"),
            rs.get(run, {}).get("rps"),
            GOAL_RAYSERVE_X,
            False,
            rounds_of("serval_ray", "rayserve", lambda r, k=run: r[k]["rps"]),
        )
    byref = fig.get("serval_byref", {})
    why = "" if byref else raw.get("byref_unavailable", [{}])[0].get("why", "not measured")
    add(
        "byref_seq_p50_vs_actor",
        "by ref seq p50 sync: serval by ref / bare Ray actor",
        byref.get("seq_sync", {}).get("p50_us"),
        actor.get("seq_sync", {}).get("p50_us"),
        GOAL_ACTOR_X,
        True,
        rounds_of("serval_byref", "actor", lambda r: p50(r, "seq_sync")),
        why,
    )
    add(
        "byref_rps_vs_actor",
        f"by ref {IN_FLIGHT} in flight req/s: by ref / bare Ray actor",
        byref.get("rps"),
        actor.get("rps"),
        1 / GOAL_ACTOR_X,
        False,
        rounds_of("serval_byref", "actor", lambda r: r["rps"]),
        why,
    )
    return out


# -- report -------------------------------------------------------------------------------------


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f} µs" if v < 10_000 else f"{v / 1e3:,.1f} ms"


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else fmt_us(v * 1e3)


def fmt_rps(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}/s"


def fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def fmt_mb(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:,.0f} MB"


def fmt_n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _get(f: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(f, dict) or part not in f:
            return None
        f = f[part]
    return f


ROWS: list[tuple[str, str, Callable[[float | None], str]]] = [
    ("deploy: start -> first result", "cold_s", fmt_s),
    ("seq p50, sync", "seq_sync.p50_us", fmt_us),
    ("seq p99, sync", "seq_sync.p99_us", fmt_us),
    ("seq p50, async", "seq_async.p50_us", fmt_us),
    ("seq p99, async", "seq_async.p99_us", fmt_us),
    (f"{IN_FLIGHT} in flight, req/s", "rps", fmt_rps),
    (f"{IN_FLIGHT} in flight, CPU/request", "cpu_us_per_req", fmt_us),
    (f"HTTP no-op {CONNS} conns, req/s", "noop_c32.rps", fmt_rps),
    (f"HTTP no-op {CONNS} conns, p50", "noop_c32.p50_ms", fmt_ms),
    (f"HTTP no-op {CONNS} conns, p99", "noop_c32.p99_ms", fmt_ms),
    (f"HTTP no-op {CONNS} conns, errors", "noop_c32.errors", fmt_n),
    (f"HTTP no-op {CONNS} conns, CPU/req", "noop_c32.cpu_us_per_req", fmt_us),
    ("HTTP no-op 1 conn, p50", "noop_c1.p50_ms", fmt_ms),
    ("HTTP no-op 1 conn, req/s", "noop_c1.rps", fmt_rps),
    (f"HTTP ingress->child {CONNS} c, req/s", "chain_c32.rps", fmt_rps),
    (f"HTTP ingress->child {CONNS} c, p99", "chain_c32.p99_ms", fmt_ms),
    (f"HTTP ingress->child {CONNS} c, err", "chain_c32.errors", fmt_n),
    (f"HTTP ingress->child {CONNS} c, CPU", "chain_c32.cpu_us_per_req", fmt_us),
    ("RSS added by the target", "rss_added", fmt_mb),
    ("serve.shutdown()", "shutdown_s", fmt_s),
]


def print_table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(("{:<%d}" if i == 0 else "{:>%d}") % w for i, w in enumerate(widths))
    print(line.format(*head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*r).rstrip())


def report(ctx: dict[str, Any], raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    s: Sizes = ctx["sizes"]
    names = [
        n for n in ("actor", "serval_byref", "serval_ray", "serval_local", "rayserve") if raw.get(n)
    ]
    fig = {n: figures(raw.get(n, [])) for n in (*TARGETS, "serval_byref")}
    gs = goals(fig, raw)

    print()
    print(
        f"serval on Ray benchmark ({ctx['mode']} run): Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, Ray {ctx['ray_version']}, serval {serve.__version__}"
        + (f" ({ctx['source']})" if ctx["source"] else "")
    )
    where = (
        "one node (ray.init on 127.0.0.1)"
        if ctx["nodes"] == 1
        else (
            f"a {ctx['nodes']}-node ray.cluster_utils.Cluster; ingress and bare actor on node w1, "
            f"child on w{min(2, ctx['nodes'] - 1)}, drivers and proxies on the head"
        )
    )
    print(f"  Ray: {where}; ray.init took {ctx['ray_init_s']:.1f} s")
    print(
        f"  {s.rounds} round(s), one target at a time; each: {s.seq_s:g} s per sequential "
        f"figure and {s.burst_s:g} s at {IN_FLIGHT} in flight after {s.warmup_s:g} s warm-up; "
        f"wrk {s.wrk_warmup_s} s warm-up, -t2 -c{CONNS} {s.wrk_c32_s} s, -t1 -c1 {s.wrk_c1_s} s"
    )
    print(
        f"  load average (1 min) {ctx['load_start'][0]:.2f} at start, "
        f"{ctx['load_end'][0]:.2f} at end; latency: every round's samples pooled, the rest: "
        "medians of the rounds"
    )
    print()
    rows = [[label, *(fn(_get(fig[n], path)) for n in names)] for label, path, fn in ROWS]
    rows = [r for r in rows if any(v != "-" for v in r[1:])]
    print_table(["figure", *(LABELS[n] for n in names)], rows)
    print()
    print("goals (issue 12), ratios of this run's medians:")
    grows = []
    for g in gs:
        ratio = "-" if g.ratio is None else f"{g.ratio:.2f}x"
        verdict = "not measured" if g.ok is None else ("yes" if g.ok else "NO")
        rounds = ", ".join(f"{v:.2f}x" for v in g.by_round) if len(g.by_round) > 1 else ""
        grows.append([g.label, ratio, g.bound, verdict, rounds])
    print_table(["goal", "ratio", "goal", "met", "round by round"], grows)
    print()
    notes(ctx, fig, names, gs)
    return result_json(ctx, fig, gs)


def notes(ctx: dict[str, Any], fig: dict[str, Any], names: list[str], gs: list[Goal]) -> None:
    print("  deploy: serve.start -> serve.run(no-op) -> first result, on the Ray instance already")
    print("    running (Ray Serve's published 7-14 s cold start also counts import and ray.init);")
    print("    bare Ray actor: actor creation -> first result. serval local: in a child process")
    print("    that never imports Ray (its interpreter start and imports not counted).")
    print("  CPU/request: CPU time of every process of the run (Ray's daemons, the workers, the")
    print("    driver; wrk excluded) during the throughput run, per request. By process, 64 in")
    print("    flight (median s of CPU per round):")
    for n in names:
        top = sorted(fig[n].get("cpu_by_process_s", {}).items(), key=lambda kv: -kv[1])[:5]
        print(f"      {LABELS[n]}: " + ", ".join(f"{k} {v:.2f}" for k, v in top))
    print("  RSS added: the run's processes' RSS with the target deployed, less just before it")
    print("    (serval local: its cluster's processes, not its driver's interpreter);")
    print(f"    Ray with nothing deployed: {ctx['rss_base'] / 2**20:,.0f} MB (driver included)")
    ray, local = fig["serval_ray"], fig["serval_local"]
    if ray and local:
        pairs = [
            (f"{IN_FLIGHT} in flight", "cpu_us_per_req"),
            ("HTTP no-op", "noop_c32.cpu_us_per_req"),
            ("HTTP ingress->child", "chain_c32.cpu_us_per_req"),
        ]
        parts = [f"{what} {_get(ray, k) / _get(local, k):.2f}x" for what, k in pairs]
        print(
            "  CPU/request, serval on Ray / serval local (steadier than req/s on a busy "
            "machine): " + ", ".join(parts)
        )
    for n in ("serval_ray", "serval_local"):
        if fig[n] and fig[n]["rps_rounds"]:
            rr = ", ".join(f"{v:,.0f}" for v in fig[n]["rps_rounds"])
            sp = ", ".join(f"{v:,.0f}" for v in fig[n]["seq_sync"]["round_p50_us"])
            print(
                f"  {LABELS[n]} round by round: seq p50 sync {sp} µs; {IN_FLIGHT} in flight "
                f"{rr} req/s"
            )
    for g in gs:
        if g.why:
            print(f"  {g.name}: not measured: {g.why}")
            break
    if ctx["leftover"]:
        print(
            f"  WARNING: {len(ctx['leftover'])} process(es) of this run outlived it: "
            + ", ".join(f"{name} (pid {pid})" for pid, name in ctx["leftover"].items())
        )
    missed = [g.name for g in gs if g.ok is False]
    measured = [g for g in gs if g.ok is not None]
    print(
        f"  goals met: {len(measured) - len(missed)}/{len(measured)} measured"
        + (f" (missed: {', '.join(missed)})" if missed else "")
    )
    print(f"  total run time: {ctx['elapsed_s']:.1f} s")
    print()


def result_json(ctx: dict[str, Any], fig: dict[str, Any], gs: list[Goal]) -> dict[str, Any]:
    def r(v: Any) -> Any:
        if isinstance(v, float):
            return round(v, 3 if abs(v) < 100 else 1)
        if isinstance(v, dict):
            return {k: r(x) for k, x in v.items()}
        if isinstance(v, list):
            return [r(x) for x in v]
        return v

    result: dict[str, Any] = {
        "mode": ctx["mode"],
        "source": ctx["source"],
        "nodes": ctx["nodes"],
        "rounds": ctx["sizes"].rounds,
        "ray_version": ctx["ray_version"],
        "ray_init_s": ctx["ray_init_s"],
        "rss_base_mb": ctx["rss_base"] / 2**20,
    }
    for n, f in fig.items():
        if not f:
            continue
        for key in ("seq_sync", "seq_async"):
            for stat in ("p50_us", "p99_us", "p999_us", "max_us", "n"):
                result[f"{n}_{key}_{stat}"] = f[key][stat]
        result[f"{n}_rps_c64"] = f["rps"]
        result[f"{n}_rps_c64_rounds"] = f["rps_rounds"]
        result[f"{n}_rps_c64_cpu_us_per_req"] = f["cpu_us_per_req"]
        result[f"{n}_rps_c64_cpu_by_process_s"] = f["cpu_by_process_s"]
        for key in ("cold_s", "shutdown_s"):
            if key in f:
                result[f"{n}_{key}"] = f[key]
        if "rss_added" in f:
            result[f"{n}_rss_added_mb"] = f["rss_added"] / 2**20
        for run in ("noop_c32", "noop_c1", "chain_c32"):
            if run in f:
                for key, v in f[run].items():
                    result[f"{n}_http_{run}_{key}"] = v
    for g in gs:
        result[f"x_{g.name}"] = g.ratio
        result[f"x_{g.name}_rounds"] = g.by_round
    ray, local = fig["serval_ray"], fig["serval_local"]
    for key, path in (
        ("c64", "cpu_us_per_req"),
        ("http_noop_c32", "noop_c32.cpu_us_per_req"),
        ("http_chain_c32", "chain_c32.cpu_us_per_req"),
    ):
        a, b = _get(ray, path), _get(local, path)
        result[f"x_cpu_per_req_{key}_vs_local"] = a / b if a and b else None
    result["goals_met"] = {g.name: g.ok for g in gs}
    if "byref_why" in ctx:
        result["byref_unavailable"] = ctx["byref_why"]
    result.update(
        loadavg_start=ctx["load_start"],
        loadavg_end=ctx["load_end"],
        leftover_processes=len(ctx["leftover"]),
        elapsed_s=ctx["elapsed_s"],
    )
    result = r(result)
    print(json.dumps(result))
    return result


# -- main ---------------------------------------------------------------------------------------


def round_order(i: int) -> list[str]:
    """Serval on Ray and serval local swap places every round (so neither always runs first);
    the bare actor sits beside serval on Ray (and its by-reference calls); Ray Serve, whose
    shutdown leaves work behind, last."""
    if i % 2 == 0:
        return ["actor", "serval_ray", "serval_local", "rayserve"]
    return ["serval_local", "serval_ray", "actor", "rayserve"]


def run_rounds(
    opts: argparse.Namespace, s: Sizes, where: Placement, ctx: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    raw: dict[str, list[dict[str, Any]]] = {n: [] for n in (*TARGETS, "serval_byref")}
    for i in range(s.rounds):
        for target in round_order(i):
            if target not in opts.targets:
                continue
            quiesce(os.getpid())
            print(f"round {i + 1}/{s.rounds}: {LABELS[target]} ...", flush=True)
            faulthandler.dump_traceback_later(WATCHDOG_S, repeat=True)
            try:
                out = measure(target, opts, s, where, ctx, raw)
            finally:
                faulthandler.cancel_dump_traceback_later()
            raw[target].append(out)
    return raw


def measure(
    target: str,
    opts: argparse.Namespace,
    s: Sizes,
    where: Placement,
    ctx: dict[str, Any],
    raw: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """One target's slot in a round."""
    if target == "actor":
        return measure_actor(s, where)
    if target == "serval_ray":
        out = measure_serval_ray(s, where, by_ref=not opts.no_by_reference)
        byref = out.pop("byref", None)
        if byref is not None and "unavailable" in byref:
            ctx["byref_why"] = byref["unavailable"]
            raw["byref_unavailable"] = [{"why": byref["unavailable"]}]
        elif byref is not None:
            raw["serval_byref"].append(byref)
        return out
    if target == "serval_local":
        out = measure_serval_local(s)
        ctx["addresses"].append(out.pop("address") or "")
        return out
    return measure_rayserve(s, where)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round (a smoke test)")
    ap.add_argument("--rounds", type=int, help="override the number of rounds")
    ap.add_argument("--nodes", type=int, default=1, help="Ray nodes (1, or a Cluster of 2-3)")
    ap.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    ap.add_argument("--no-by-reference", action="store_true", help="skip the by-ref figures")
    ap.add_argument("--check", action="store_true", help="exit 1 if a measured goal is missed")
    ap.add_argument("--local-child", action="store_true", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.local_child:
        return local_child_main()
    if not 1 <= opts.nodes <= 3:
        ap.error("--nodes: 1, 2 or 3")
    if shutil.which("wrk") is None:
        print("wrk not found on PATH (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    mode = "quick" if opts.quick else "full"
    s = SIZES[mode]
    if opts.rounds:
        s = dataclasses.replace(s, rounds=opts.rounds)
    # This run starts its own Ray and its own serval clusters: none named by the environment.
    for var in ("RAY_ADDRESS", "SERVAL_ADDRESS", "SERVAL_BACKEND"):
        os.environ.pop(var, None)
    exit_cleanly_on_sigterm()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    started = time.perf_counter()
    ctx: dict[str, Any] = {
        "mode": mode,
        "sizes": s,
        "nodes": opts.nodes,
        "source": source_version(),
        "addresses": [],
        "load_start": [round(v, 2) for v in os.getloadavg()],
    }
    temp_dir = tempfile.mkdtemp(prefix="ray-bench-")  # short: Ray's socket paths live in it
    failed = True
    try:
        import ray

        ctx["ray_version"] = ray.__version__
        print(f"starting Ray ({opts.nodes} node(s), temp dir {temp_dir}) ...", flush=True)
        t = time.perf_counter()
        with ray_instance(opts.nodes, temp_dir) as where:
            ctx["ray_init_s"] = time.perf_counter() - t
            exit_cleanly_on_sigterm()  # again: ray.init put its own handler, which just dies
            quiesce(os.getpid())
            ctx["rss_base"] = tree_rss(os.getpid())
            raw = run_rounds(opts, s, where, ctx)
        failed = False
    except (KeyboardInterrupt, SystemExit):
        failed = False  # interrupted: nothing to look into in Ray's logs
        raise
    finally:
        ctx["leftover"] = leftovers(SEEN, temp_dir, [a for a in ctx["addresses"] if a])
        for pid, name in ctx["leftover"].items():
            print(f"WARNING: still running after the run: {name} (pid {pid})", file=sys.stderr)
        if not failed and not ctx["leftover"]:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:
            print(f"Ray's logs of this run are kept in {temp_dir}", file=sys.stderr)
    ctx["load_end"] = [round(v, 2) for v in os.getloadavg()]
    ctx["elapsed_s"] = time.perf_counter() - started
    result = report(ctx, raw)
    if opts.check and any(v is False for v in result["goals_met"].values()):
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
