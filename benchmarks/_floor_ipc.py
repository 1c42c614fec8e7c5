"""The floor for a call between two Python processes on this machine.

A forked server process and a uvloop client talk over a Unix socket in a private temporary
directory. Each request and each reply is one length-prefixed frame holding a pickle
(protocol 5) of a small tuple: ``(request_id, method, args)`` out, ``(request_id, value)`` back.
The client keeps a table of pending futures keyed by request id, so many calls can be in flight
on the one connection, just as a handle multiplexes calls to a replica.

Nothing here routes, schedules, validates or handles errors: it is the least work any
framework must do to move a pickled call to another process and the answer back, so it is the
yardstick that serval's handle figures are divided by.

Where the two processes run matters a lot on a VM: with both on one CPU a round trip is two
context switches; on two CPUs it is two cross-CPU wake-ups, several times slower when the other
CPU is idle. ``FloorServer.measure`` can pin the client and the server for that reason.

    python benchmarks/_floor_ipc.py [--quick]    # the floor in each placement

``handle_bench.py`` uses ``FloorServer``; it must be started before the process starts any
thread (it forks).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from typing import Any

import uvloop

_LEN = struct.Struct("!I")

# Where the client and the server run: (client CPUs, server CPUs); None means any CPU.
Placement = tuple[set[int] | None, set[int] | None]


def placements() -> dict[str, Placement]:
    """``two_cpus``, ``one_cpu`` (when this process may use two CPUs) and ``unpinned``."""
    allowed = sorted(os.sched_getaffinity(0))
    out: dict[str, Placement] = {}
    if len(allowed) >= 2:
        a, b = allowed[0], allowed[1]
        out["two_cpus"] = ({a}, {b})
        out["one_cpu"] = ({b}, {b})
    out["unpinned"] = (None, None)
    return out


def _pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


# -- server (the forked child) -------------------------------------------------------------------


async def _serve(sock: socket.socket, lifeline_fd: int) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readexactly(_LEN.size)
                body = await reader.readexactly(_LEN.unpack(head)[0])
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            rid, _method, args = pickle.loads(body)
            out = pickle.dumps((rid, args[0]), protocol=5)
            writer.write(_LEN.pack(len(out)) + out)

    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    # The parent holds the write end of the lifeline: EOF here means the parent is gone.
    loop.add_reader(lifeline_fd, lambda: stop.done() or stop.set_result(None))
    server = await asyncio.start_unix_server(connection, sock=sock)
    async with server:
        await stop


def _child(sock: socket.socket, lifeline_fd: int) -> None:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        uvloop.run(_serve(sock, lifeline_fd))
        code = 0
    finally:
        os._exit(code)


# -- client ----------------------------------------------------------------------------------


class _Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_id = 0
        self.reading = self.loop.create_task(self._read())

    async def _read(self) -> None:
        reader, pending = self.reader, self.pending
        while True:
            head = await reader.readexactly(_LEN.size)
            rid, value = pickle.loads(await reader.readexactly(_LEN.unpack(head)[0]))
            pending.pop(rid).set_result(value)

    async def call(self, method: str, *args: Any) -> Any:
        self.next_id += 1
        rid = self.next_id
        fut = self.pending[rid] = self.loop.create_future()
        body = pickle.dumps((rid, method, args), protocol=5)
        self.writer.write(_LEN.pack(len(body)) + body)
        return await fut

    async def close(self) -> None:
        self.reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reading
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def _measure(
    path: str, warmup: int, seq_n: int, tput_n: int, in_flight: int
) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(path)
    client = _Client(reader, writer)
    try:
        for _ in range(warmup):
            assert await client.call("echo", 1) == 1
        lat = []
        clock = time.perf_counter
        for _ in range(seq_n):
            t = clock()
            await client.call("echo", 1)
            lat.append(clock() - t)

        sem = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with sem:
                await client.call("echo", 1)

        await asyncio.gather(*[one() for _ in range(min(tput_n, 2000))])  # warm-up
        t = clock()
        await asyncio.gather(*[one() for _ in range(tput_n)])
        rps = tput_n / (clock() - t)
    finally:
        await client.close()
    return {"latencies_s": lat, "rps": rps}


class FloorServer:
    """The forked echo server; ``close()`` (or leaving the ``with``) always kills it."""

    def __init__(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="serval-floor-")
        self.path = os.path.join(self.tmpdir, "floor.sock")
        self.pid = -1
        self._lifeline_w = -1
        self._all_cpus = os.sched_getaffinity(0)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            sock.listen(128)
            lifeline_r, self._lifeline_w = os.pipe()
            self.pid = os.fork()
            if self.pid == 0:
                try:
                    os.close(self._lifeline_w)
                    _child(sock, lifeline_r)
                finally:
                    os._exit(1)  # the child never runs the parent's code
            os.close(lifeline_r)
        except BaseException:
            self.close()
            raise
        finally:
            sock.close()  # the child has it; connections queue on its backlog

    def measure(
        self,
        placement: Placement = (None, None),
        *,
        warmup: int = 1000,
        seq_n: int = 5000,
        tput_n: int = 50_000,
        in_flight: int = 64,
    ) -> dict[str, Any]:
        """Sequential round trips, then ``tput_n`` calls with ``in_flight`` at a time.

        Runs a uvloop loop in the calling thread, pinned as ``placement`` says for the duration
        (on Linux the affinity is per thread: other threads of this process are not moved).
        Returns ``latencies_s`` (every sequential round trip) and ``rps``.
        """
        client_cpus, server_cpus = placement
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(self.pid, server_cpus or self._all_cpus)
        try:
            if client_cpus:
                os.sched_setaffinity(0, client_cpus)
            return uvloop.run(_measure(self.path, warmup, seq_n, tput_n, in_flight))
        finally:
            os.sched_setaffinity(0, mine)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._lifeline_w)
        if self.pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = -1
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> FloorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sizes = {"seq_n": 3000, "tput_n": 20_000} if "--quick" in sys.argv[1:] else {}
    with FloorServer() as server:
        for name, placement in placements().items():
            figs = server.measure(placement, **sizes)  # type: ignore[arg-type]
            lat = sorted(figs["latencies_s"])
            print(
                f"floor, {name:>8}: sequential p50 {_pct(lat, 0.5) * 1e6:.0f} µs, "
                f"p99 {_pct(lat, 0.99) * 1e6:.0f} µs; 64 in flight {figs['rps']:,.0f} req/s"
            )
