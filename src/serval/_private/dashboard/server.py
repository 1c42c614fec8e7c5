"""The dashboard process's body: uvicorn on the listening socket the owner bound and passed
down (so that a restarted dashboard serves on the same port, and a port that is taken is
known to the owner at once), and the sampler, once a second, on the same loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

import uvicorn

from serval._private.caller.client import ClusterClient
from serval._private.dashboard.app import Live, make_app
from serval._private.dashboard.deploy import DeployRunner
from serval._private.dashboard.guard import Guard, allowed_hosts
from serval._private.dashboard.logs import ReplicaLogs
from serval._private.wire.tasks import TaskOwner

__all__ = ["DashboardConfig", "serve_dashboard"]

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class DashboardConfig:
    address: str  # the cluster's runtime directory
    fd: int  # the listening socket, bound by the owner
    host: str
    port: int
    token: str
    cwd: str  # where the cluster was started (a PUT's deploy runs there)
    deploy_env: dict[str, str]  # a PUT's deploy's environment (the user's code path)
    # the cluster as ``serval deploy --address`` names it (default: ``address``)
    deploy_address: str = ""


async def serve_dashboard(client: ClusterClient, config: DashboardConfig) -> None:
    sock = socket.socket(fileno=config.fd)
    sock.setblocking(False)
    live = Live(client, ReplicaLogs(config.address))
    deployer = DeployRunner(config.deploy_address or config.address, config.cwd, config.deploy_env)
    app = Guard(
        make_app(live, deployer), config.token, allowed_hosts(config.host, config.port), config.port
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=1,
        )
    )
    tasks = TaskOwner("the dashboard")
    tasks.spawn(_sample_forever(live), asyncio.get_running_loop())
    try:
        await server.serve(sockets=[sock])
    finally:
        await tasks.close()


async def _sample_forever(live: Live) -> None:
    next_at = time.monotonic()
    while True:
        await live.sample()
        next_at += SAMPLE_INTERVAL_S
        now = time.monotonic()
        if next_at < now:  # a slow sample: start again from now, no burst to catch up
            next_at = now
        await asyncio.sleep(next_at - now)
