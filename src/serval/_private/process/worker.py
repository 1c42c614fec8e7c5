"""Entry point of every serval process: ``python -P -m serval._private.process.worker serval::<role>
<label>``.

The role and label come first on the command line so that ``ps`` tells what each process is.
Every process watches the owner's lifeline from a thread; when the owner is gone, replicas and
the proxy leave at once, and the controller first kills every process it knows of and removes
the runtime directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, get_args

from serval._private.backends.base import BackendName
from serval._private.backends.base import load as load_backend
from serval._private.caller import runtime
from serval._private.controller.controller import Controller
from serval._private.process import lifeline, procs, rundir
from serval._private.process.settings import http_options_from_argv
from serval._private.replica.server import Replica
from serval._private.telemetry import log_files, log_setup
from serval._private.telemetry.logs import Identity
from serval._private.wire import transport
from serval._private.wire.layout import controller_path
from serval._private.wire.rpc import RpcPeer
from serval._private.wire.tasks import TaskOwner

logger = logging.getLogger("serval")

_GC_GEN0_THRESHOLD = 20_000  # default 700
# When the owner is gone: how long the controller waits for the processes it killed (and any
# other naming the runtime directory), and when it leaves whatever is left to do.
_REAP_TIMEOUT_S = 1.5
_OWNER_GONE_DEADLINE_S = 4.0


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serval-worker")
    parser.add_argument(
        "role",
        choices=[
            "serval::controller",
            "serval::replica",
            "serval::proxy",
            "serval::daemon",
            "serval::dashboard",
        ],
    )
    parser.add_argument("label")
    parser.add_argument("--address", required=True)
    parser.add_argument("--replica-id")
    parser.add_argument("--lifeline-fd", type=int)
    parser.add_argument("--http-options")
    parser.add_argument("--recover", action="store_true")
    parser.add_argument("--dashboard-fd", type=int)  # the dashboard's listening socket
    parser.add_argument("--dashboard-options")  # the dashboard's (JSON); the daemon's too
    # the controller's backend, by name (backends.base.load); "memory" runs in a test's
    # process only, and Ray's controller is an actor (process.ray_actors), not a process of ours
    backends = [name for name in get_args(BackendName) if name not in ("memory", "ray")]
    parser.add_argument("--backend", default="local", choices=backends)
    return parser.parse_args(argv)


def _exit_with_owner(args: argparse.Namespace) -> None:
    if args.lifeline_fd is not None:
        # Leave at once: the loop or user threads may be blocked, and nothing is left to serve.
        lifeline.watch(args.lifeline_fd, lambda: os._exit(0))


def _controller_exits_with_owner(
    loop: asyncio.AbstractEventLoop,
    args: argparse.Namespace,
    controller: Controller,
    tasks: TaskOwner,
) -> None:
    if args.lifeline_fd is None:
        return

    def on_owner_gone() -> None:  # on the lifeline thread
        try:
            loop.call_soon_threadsafe(
                lambda: tasks.spawn(_end_cluster(controller, args.address), loop)
            )
        except RuntimeError:  # the loop is closed: the controller is exiting anyway
            os._exit(0)
        time.sleep(_OWNER_GONE_DEADLINE_S)
        os._exit(0)  # the loop did not get it done in time: leave anyway

    lifeline.watch(args.lifeline_fd, on_owner_gone)


async def _end_cluster(controller: Controller, address: str) -> None:
    """The owner died without shutting the cluster down: no process of it may stay, and no
    file. The replicas and the proxy see the lifeline too, but one stuck in C code (holding the
    GIL) cannot act on it, so kill them; then remove the runtime directory, last. Logging
    waits till the end: with the owner gone, a write to its stderr may block for good."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(controller.owner_gone(), _REAP_TIMEOUT_S)
    deadline = time.monotonic() + _REAP_TIMEOUT_S
    # Replicas still starting, unknown here, leave on the lifeline; nothing tells when.
    while procs.naming(address, exclude=(os.getpid(),)) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    rundir.remove(address)
    logger.warning("the cluster's owner is gone: stopped every process of the cluster")
    os._exit(0)


class ControlPeers:
    """A controller's control connections, one ``RpcPeer`` per caller, wherever it listens
    (a Unix socket here, TCP on Ray): ``new_connection`` is the listener's factory."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.peers: set[RpcPeer] = set()

    def new_connection(self) -> transport.Connection:
        peer = RpcPeer(self.controller, on_close=self._forget)
        self.peers.add(peer)
        return peer.protocol_factory()

    def _forget(self, peer: RpcPeer) -> None:
        self.peers.discard(peer)
        self.controller.subscribers.discard(peer)

    async def close(self) -> None:
        for peer in list(self.peers):
            peer.close()  # flushes the reply to the shutdown call first
        await asyncio.sleep(0)


async def _controller_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    http = http_options_from_argv(args.http_options) if args.http_options else None
    backend = load_backend(args.backend).for_controller(args.address, args.lifeline_fd)
    controller = Controller(backend, http, args.address)
    tasks = TaskOwner("the controller process")  # what signals and the lifeline start
    peers = ControlPeers(controller)
    _controller_exits_with_owner(loop, args, controller, tasks)
    server = await transport.listen(controller_path(args.address), peers.new_connection)
    controller.start(recover=args.recover)
    loop.add_signal_handler(
        signal.SIGTERM,
        lambda: tasks.spawn(controller.rpc_shutdown(None), loop),  # type: ignore[arg-type]
    )
    await controller.stopped.wait()
    server.close()
    await peers.close()
    await controller.close()
    await tasks.close()


async def _replica_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    _exit_with_owner(args)
    runtime.set_address(args.address)
    replica = Replica(args.address, args.replica_id, logs_dir=log_files.logs_dir(args.address))
    # The controller stops a replica with a message (drain); SIGTERM does the same, for `kill`.
    loop.add_signal_handler(signal.SIGTERM, replica.begin_drain)
    await replica.start()
    await replica.stopped.wait()


async def _proxy_main(args: argparse.Namespace) -> None:
    from serval._private.proxy.server import serve_proxy

    loop = asyncio.get_running_loop()
    _exit_with_owner(args)
    runtime.set_address(args.address)
    await serve_proxy(runtime.client(loop), http_options_from_argv(args.http_options))


async def _dashboard_main(args: argparse.Namespace) -> None:
    from serval._private.backends.local import own_pythonpath, replica_env
    from serval._private.dashboard.server import DashboardConfig, serve_dashboard
    from serval._private.process.dashboard import read_token
    from serval._private.process.settings import settings

    loop = asyncio.get_running_loop()
    _exit_with_owner(args)
    runtime.set_address(args.address)
    options = json.loads(args.dashboard_options)
    # A PUT's deploy imports the user's code: with the user's code path, and serval's own.
    env = replica_env(settings().user_pythonpath, None)
    paths = [p for p in (env.get("PYTHONPATH"), own_pythonpath(os.environ.get("PYTHONPATH"))) if p]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    config = DashboardConfig(
        address=args.address,
        fd=args.dashboard_fd,
        host=options["host"],
        port=options["port"],
        token=read_token(args.address),
        cwd=options["cwd"],
        deploy_env=env,
    )
    await serve_dashboard(runtime.client(loop), config)


_MAINS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {
    "serval::controller": _controller_main,
    "serval::replica": _replica_main,
    "serval::proxy": _proxy_main,
    "serval::dashboard": _dashboard_main,
}


def _log_to_file(args: argparse.Namespace) -> None:
    """The system processes' log files (a replica's: once it knows its deployment)."""
    component = args.role.removeprefix("serval::")
    if component not in ("controller", "proxy", "dashboard"):
        return
    directory = log_files.logs_dir(args.address)
    if directory is None:
        return
    component_id = str(os.getpid())
    if component == "proxy" and args.http_options:
        component_id = http_options_from_argv(args.http_options).host
    identity = Identity(component, component_id)
    log_setup.configure(
        identity, log_files.system_logging(args.address), directory, f"{component}.log"
    )


def tune_gc() -> None:
    """Serving allocates many short-lived objects and few cycles: collect the young
    generation less often, and keep what start-up imported out of every collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_GEN0_THRESHOLD, 20, 20)


def main(argv: list[str] | None = None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s {args.role} {args.label}: %(message)s",
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the owner's to handle
    log_setup.quiet_access()
    _log_to_file(args)
    if args.role == "serval::daemon":
        from serval._private.process.daemon import run_daemon
        from serval._private.process.dashboard import DashboardOptions

        dashboard = (
            DashboardOptions.from_json(args.dashboard_options) if args.dashboard_options else None
        )
        run_daemon(args.address, http_options_from_argv(args.http_options), dashboard)
        return
    body = _MAINS[args.role]
    tune_gc()
    loop = runtime.new_event_loop()
    asyncio.set_event_loop(loop)
    code = 0
    try:
        run_to_the_end(loop, loop.create_task(body(args)))
    except SystemExit as exc:  # a reported, expected failure (e.g. the port is taken)
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logger.exception("%s %s failed", args.role, args.label)
        code = 1
    finally:
        # Exit without waiting for user threads (a sync method may still be running).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_to_the_end(loop: asyncio.AbstractEventLoop, main: asyncio.Task[None]) -> None:
    """Run ``main`` until it returns (or raises).

    ``SystemExit`` or ``KeyboardInterrupt`` raised by user code in an ``async def`` method
    leaves the loop, and the process would die with it: asyncio re-raises them from the task's
    step, after the task has taken it as its result. The replica answers the caller with it
    (the task's done callback) once the loop runs again, so run it again, as a ``def``
    method's does. Nothing of the loop is lost on the way: asyncio and uvloop both keep the
    callbacks not run yet, the timers and the I/O watchers, and a new ``run_until_complete``
    resumes them. No work per request: this costs only when such an exception is raised.
    """
    while True:
        try:
            loop.run_until_complete(main)
            return
        except (SystemExit, KeyboardInterrupt):
            if main.done():
                main.result()  # the process's own exit (e.g. the proxy's port is taken)
                return


if __name__ == "__main__":
    main()
