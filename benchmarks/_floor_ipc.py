"""The floor for a call between two Python processes on this machine.

A forked server process and a uvloop client talk over a Unix socket in a private temporary
directory. Each request and each reply is one length-prefixed frame holding a pickle
(protocol 5) of a small tuple: ``(request_id, method, args)`` out, ``(request_id, value)`` back.
The client keeps a table of pending futures keyed by request id, so many calls can be in flight
on the one connection, just as a handle multiplexes calls to a replica.

Nothing here routes, schedules, validates or handles errors: it is the least work any
framework must do to move a pickled call to another process and the answer back, so it is the
yardstick that serval's handle figures are divided by.

Run on its own: ``python benchmarks/_floor_ipc.py [--quick]``; ``handle_bench.py`` imports
``measure_floor``. It must run before the calling process starts any thread (it forks).
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
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
        uvloop.run(_serve(sock, lifeline_fd))
    except BaseException:
        code = 1
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
) -> dict[str, float]:
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
        lat.sort()

        sem = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with sem:
                await client.call("echo", 1)

        await asyncio.gather(*[one() for _ in range(min(tput_n, 5000))])  # warm-up
        t = clock()
        await asyncio.gather(*[one() for _ in range(tput_n)])
        rps = tput_n / (clock() - t)
    finally:
        await client.close()
    return {
        "seq_p50_us": _pct(lat, 0.50) * 1e6,
        "seq_p99_us": _pct(lat, 0.99) * 1e6,
        "rps": rps,
    }


def cpu_pair(shared: bool = False) -> tuple[int, int] | None:
    """Two CPUs this process may use (one CPU twice if ``shared``); None if only one."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None
    return (allowed[0], allowed[0]) if shared else (allowed[0], allowed[1])


def measure_floor(
    *,
    warmup: int = 1000,
    seq_n: int = 5000,
    tput_n: int = 50_000,
    in_flight: int = 64,
    cpus: tuple[int, int] | None = None,
) -> dict[str, float]:
    """Fork the server, measure from this process, and always kill the server after.

    ``cpus``: pin (client, server) to these CPUs for the measurement; this process's own
    affinity is restored afterwards. Unpinned, the scheduler may put both on one CPU or on two,
    and on a VM the sequential round trip differs a lot between the two (see README).
    """
    original = os.sched_getaffinity(0)
    tmpdir = tempfile.mkdtemp(prefix="serval-floor-")
    path = os.path.join(tmpdir, "floor.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    lifeline_r, lifeline_w = os.pipe()
    pid = -1
    try:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[0]})
        pid = os.fork()
        if pid == 0:
            try:
                os.close(lifeline_w)
                if cpus is not None:
                    os.sched_setaffinity(0, {cpus[1]})
                _child(sock, lifeline_r)
            finally:
                os._exit(1)  # the child never runs the parent's code
        os.close(lifeline_r)
        sock.close()  # the child listens; connecting now queues on its backlog
        return uvloop.run(_measure(path, warmup, seq_n, tput_n, in_flight))
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        with contextlib.suppress(OSError):
            os.close(lifeline_w)
        if pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        shutil.rmtree(tmpdir, ignore_errors=True)
        os.sched_setaffinity(0, original)


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    sizes = {"seq_n": 3000, "tput_n": 20_000} if quick else {}
    for label, cpus in (
        ("two CPUs", cpu_pair()),
        ("one CPU", cpu_pair(shared=True)),
        ("unpinned", None),
    ):
        figs = measure_floor(cpus=cpus, **sizes)  # type: ignore[arg-type]
        print(
            f"floor, {label:>8}: sequential p50 {figs['seq_p50_us']:.0f} us, "
            f"p99 {figs['seq_p99_us']:.0f} us; 64 in flight {figs['rps']:,.0f} req/s"
        )
