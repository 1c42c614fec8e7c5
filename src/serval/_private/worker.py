"""Entry point of every serval process: ``python -m serval._private.worker serval::<role> <label>``.

The role and label come first on the command line so that ``ps`` tells what each process is.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys

from serval._private import lifeline, runtime, transport
from serval._private.backends.local import LocalBackend
from serval._private.client import controller_path
from serval._private.controller.controller import Controller
from serval._private.replica import Replica
from serval._private.rpc import RpcPeer
from serval.config import HTTPOptions

logger = logging.getLogger("serval")

_GC_GEN0_THRESHOLD = 20_000  # default 700


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="serval-worker")
    parser.add_argument(
        "role",
        choices=["serval::controller", "serval::replica", "serval::proxy", "serval::daemon"],
    )
    parser.add_argument("label")
    parser.add_argument("--address", required=True)
    parser.add_argument("--replica-id")
    parser.add_argument("--lifeline-fd", type=int)
    parser.add_argument("--http-options")
    parser.add_argument("--recover", action="store_true")
    return parser.parse_args(argv)


def _exit_with_owner(loop: asyncio.AbstractEventLoop, args: argparse.Namespace) -> None:
    if args.lifeline_fd is not None:
        # Leave at once: user threads may be blocked in C code, and nothing is left to serve.
        lifeline.watch(loop, args.lifeline_fd, lambda: os._exit(0))


async def _controller_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    http = HTTPOptions.from_json(args.http_options) if args.http_options else None
    controller = Controller(LocalBackend(args.address, args.lifeline_fd), http, args.address)
    peers: set[RpcPeer] = set()

    def forget(peer: RpcPeer) -> None:
        peers.discard(peer)
        controller.subscribers.discard(peer)

    def new_peer() -> transport.Connection:
        peer = RpcPeer(controller, on_close=forget)
        peers.add(peer)
        return peer.protocol_factory()

    server = await transport.listen(controller_path(args.address), new_peer)
    _exit_with_owner(loop, args)
    controller.start(recover=args.recover)
    loop.add_signal_handler(signal.SIGTERM, lambda: loop.create_task(controller.rpc_shutdown(None)))  # type: ignore[arg-type]
    await controller.stopped.wait()
    server.close()
    for peer in list(peers):
        peer.close()  # flushes the reply to the shutdown call first
    await asyncio.sleep(0)
    await controller.close()


async def _replica_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    _exit_with_owner(loop, args)
    runtime.set_address(args.address)
    replica = Replica(args.address, args.replica_id)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await replica.start()
    await stop.wait()
    await replica.drain()


async def _proxy_main(args: argparse.Namespace) -> None:
    from serval._private.proxy_server import serve_proxy

    loop = asyncio.get_running_loop()
    _exit_with_owner(loop, args)
    runtime.set_address(args.address)
    await serve_proxy(runtime.client(loop), HTTPOptions.from_json(args.http_options))


_MAINS = {
    "serval::controller": _controller_main,
    "serval::replica": _replica_main,
    "serval::proxy": _proxy_main,
}


def _tune_gc() -> None:
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
    if args.role == "serval::daemon":
        from serval._private.daemon import run_daemon

        run_daemon(args.address, HTTPOptions.from_json(args.http_options))
        return
    body = _MAINS[args.role]
    _tune_gc()
    loop = runtime.new_event_loop()
    asyncio.set_event_loop(loop)
    code = 0
    try:
        loop.run_until_complete(body(args))
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


if __name__ == "__main__":
    main()
