"""A Ray client driver (``ray.init("ray://head:10001")``, Ray's way to drive a remote cluster from
a laptop): serval deploys through it, and its handles, calls by reference, HTTP and status work.
The driver is on no node of the cluster, so its calls reach replicas over authenticated TCP."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from ray.cluster_utils import Cluster

from chaos.harness import free_port
from ray_clusters import CALL_TIMEOUT_S, NODE_CPUS, SYSTEM_CONFIG, ray_tmpdir

pytestmark = pytest.mark.timeout(240)

DRIVER = """
import os
import sys

import httpx
import ray

import serval as serve

# Ray's proxier forks each client's server from a multi-threaded gRPC process, and a few per
# cent of those children die in fork (ray-project/ray#63202, open in Ray 2.60): the connect
# fails with "Starting Ray client server failed". Only that error is tried again, a new server
# each time; anything else fails the test.
for attempt in range(3):
    try:
        ray.init("ray://127.0.0.1:{client_port}")
        break
    except ConnectionAbortedError as exc:
        if "Starting Ray client server failed" not in str(exc) or attempt == 2:
            raise
        print("connect failed in Ray's client server; again", file=sys.stderr)
assert ray.util.client.ray.is_connected()  # a client of the cluster, not one of its nodes


@serve.deployment(ray_actor_options={{"num_cpus": 0}})
class Echo:
    def __call__(self, request=None) -> str:
        return "hello over HTTP"

    def echo(self, x):
        return x

    async def pid(self) -> int:
        return os.getpid()


serve.start(http_options={{"port": {http_port}}})
handle = serve.run(Echo.bind(), name="echo", route_prefix="/echo")
print("handle", handle.echo.remote({{"a": 1}}).result(timeout_s=30))
by_ref = handle.options(_by_reference=True)
print("by reference", ray.get(by_ref.echo.remote(7)._to_object_ref_sync(), timeout=30))
print("replica elsewhere", by_ref.pid.remote().result(timeout_s=30) != os.getpid())
print("http", httpx.get("http://127.0.0.1:{http_port}/echo", timeout=30).text)
print("status", serve.status().applications["echo"].status)
serve.shutdown()
print("shut down")
"""


@contextlib.contextmanager
def head_with_client_server(client_port: int) -> Iterator[Cluster]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": NODE_CPUS,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "_system_config": SYSTEM_CONFIG,
            "temp_dir": ray_tmpdir(),
            "ray_client_server_port": client_port,
            # Else the client server is told the runtime-env agent is on port 0, and fails to
            # start the server of each client (Ray 2.60, as `ray start` does here too).
            "runtime_env_agent_port": free_port(),
        },
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_a_ray_client_driver_deploys_calls_and_shuts_down() -> None:
    client_port, http_port = free_port(), free_port()
    with head_with_client_server(client_port):
        code = DRIVER.format(client_port=client_port, http_port=http_port)
        # Ray's client sends the cluster's token only when told that token auth is on.
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT_S * 2,
            env=env,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.splitlines() == [
            "handle {'a': 1}",
            "by reference 7",
            "replica elsewhere True",
            "http hello over HTTP",
            "status RUNNING",
            "shut down",
        ], proc.stderr
