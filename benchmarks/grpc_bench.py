"""gRPC ingress: serval's gRPC proxy against the floor, on one no-op unary method.

    python benchmarks/grpc_bench.py            # 5 rounds, about a minute
    python benchmarks/grpc_bench.py --quick    # one short round (a smoke test)

Needs serval[grpc] and grpcio-tools (the test extra): the .proto is compiled at start.

- **floor**: a bare ``grpc.aio`` server (uvloop) in a process of its own, whose servicer parses
  the request and returns a response built from it: the least any gRPC server does.
- **serval**: ``serve.start(grpc_options=...)`` with the same servicer function, and an async
  deployment whose ``__call__`` builds the same response; a request crosses the proxy (its
  gRPC server, routing) and a replica (two processes, serval's wire between them).

The client is a ``grpc.aio`` channel in this process (its CPU is not the servers'). Each
round measures both targets, alternating: sequential (one call at a time: p50, p99) and 64
calls in flight (req/s, and the servers' CPU per request: the floor's process; serval's proxy,
replica and controller). Medians of the rounds and serval/floor ratios; one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import exit_cleanly_on_sigterm, free_port
from _proc_tree import CpuWindow

PROTO = """
syntax = "proto3";
package benchgrpc;
message Req { string name = 1; int64 num = 2; }
message Resp { string greeting = 1; int64 num = 2; }
service Bench { rpc __call__(Req) returns (Resp); }
"""

FLOOR = """
import asyncio, sys
import grpc, grpc.aio, uvloop
import benchgrpc_pb2 as pb2, benchgrpc_pb2_grpc as pb2_grpc

class Servicer(pb2_grpc.BenchServicer):
    async def __call__(self, request, context):
        return pb2.Resp(greeting=request.name, num=request.num)

async def main():
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb2_grpc.add_BenchServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

uvloop.run(main())
"""

APP = """
import serval as serve

@serve.deployment(max_ongoing_requests=1000)
class Noop:
    async def __call__(self, request):
        from benchgrpc_pb2 import Resp
        return Resp(greeting=request.name, num=request.num)

app = Noop.bind()
"""

SEQUENTIAL = 1000
IN_FLIGHT = 64


def compile_protos(directory: Path) -> None:
    from grpc_tools import protoc

    (directory / "benchgrpc.proto").write_text(PROTO)
    args = ["protoc", f"-I{directory}", f"--python_out={directory}"]
    args += [f"--grpc_python_out={directory}", str(directory / "benchgrpc.proto")]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


async def measure(port: int, calls: int, root: int, skip_root: bool) -> dict[str, float]:
    import benchgrpc_pb2 as pb2
    import benchgrpc_pb2_grpc as pb2_grpc
    import grpc.aio

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb2_grpc.BenchStub(channel)
        request = pb2.Req(name="x", num=1)
        for _ in range(50):  # warm up
            await stub.__call__(request)
        times = []
        for _ in range(SEQUENTIAL):
            started = time.perf_counter()
            await stub.__call__(request)
            times.append(time.perf_counter() - started)
        times.sort()
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            async with gate:
                await stub.__call__(request)

        window = CpuWindow(root)
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(calls)))
        elapsed = time.perf_counter() - started
        used = window.stop()
    if skip_root:  # this process is the client (and serval's idle driver): not the server's
        used.pop(_own_name(), None)
    by_process = {name: round(cpu / calls * 1e6, 1) for name, cpu in used.items()}
    print(f"  CPU µs per request, by process: {by_process}", file=sys.stderr)
    return {
        "p50_us": times[len(times) // 2] * 1e6,
        "p99_us": times[int(len(times) * 0.99)] * 1e6,
        "rps": calls / elapsed,
        "cpu_us_per_req": sum(used.values()) / calls * 1e6,
    }


def _own_name() -> str:
    from _proc_tree import tree

    return tree(os.getpid())[os.getpid()].name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rounds, calls = (1, 2000) if args.quick else (args.rounds, 10000)
    exit_cleanly_on_sigterm()
    import uvloop

    import serval as serve

    with tempfile.TemporaryDirectory(prefix="grpc-bench-") as tmp:
        directory = Path(tmp)
        compile_protos(directory)
        (directory / "floor.py").write_text(FLOOR)
        (directory / "bench_app.py").write_text(APP)
        sys.path.insert(0, tmp)
        floor_port, serval_port = free_port(), free_port()
        floor = subprocess.Popen(
            [sys.executable, str(directory / "floor.py"), str(floor_port)],
            cwd=tmp,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert floor.stdout is not None and floor.stdout.readline().strip() == "ready"
            serve.start(
                http_options={"port": free_port()},
                grpc_options={
                    "port": serval_port,
                    "grpc_servicer_functions": ["benchgrpc_pb2_grpc.add_BenchServicer_to_server"],
                },
            )
            from bench_app import app

            serve.run(app, name="bench", route_prefix="/bench")
            figures: dict[str, list[dict[str, float]]] = {"floor": [], "serval": []}
            for r in range(rounds):
                for name in ("floor", "serval") if r % 2 == 0 else ("serval", "floor"):
                    port, root = (
                        (floor_port, floor.pid) if name == "floor" else (serval_port, os.getpid())
                    )
                    got = uvloop.run(measure(port, calls, root, skip_root=name == "serval"))
                    figures[name].append(got)
                    print(f"round {r + 1} {name}: {json.dumps(got)}", file=sys.stderr)
        finally:
            serve.shutdown()
            floor.terminate()
            floor.wait(timeout=10)
    report(figures)


def report(figures: dict[str, list[dict[str, float]]]) -> None:
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in figures.items()
    }
    floor, serval = medians["floor"], medians["serval"]
    print(f"{'':<8}{'p50 µs':>10}{'p99 µs':>10}{'req/s @64':>12}{'CPU µs/req':>12}")
    for name, m in medians.items():
        print(
            f"{name:<8}{m['p50_us']:>10.0f}{m['p99_us']:>10.0f}{m['rps']:>12.0f}"
            f"{m['cpu_us_per_req']:>12.0f}"
        )
    ratios = {
        "p50": serval["p50_us"] / floor["p50_us"],
        "rps": serval["rps"] / floor["rps"],
        "cpu_per_req": serval["cpu_us_per_req"] / floor["cpu_us_per_req"],
    }
    print(
        f"serval/floor: p50 x{ratios['p50']:.2f}, throughput x{ratios['rps']:.2f}, "
        f"CPU per request x{ratios['cpu_per_req']:.2f} (medians of {len(figures['floor'])} "
        "rounds; serval's CPU is its proxy, replica and controller)"
    )
    print(json.dumps({"medians": medians, "ratios": ratios, "rounds": figures}))


if __name__ == "__main__":
    main()
