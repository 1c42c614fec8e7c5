"""Real Ray for the Ray backend's tests: a one-node Ray instance, or a ``ray.cluster_utils.Cluster``
of several nodes on this machine, kept on loopback, with health checks tuned so that a node that
is killed is noticed in about two seconds (Ray's default is about fifteen).

Each one is started by a module's fixture and shut down after the module, with every serval
actor in it (``serve.shutdown``; then Ray itself), so that no process outlives the module."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import ray
from ray.cluster_utils import Cluster

import serval as serve
from serval._private.backends import ray_store
from serval._private.caller import runtime

# Every call a test makes to Ray or through serval is bounded (a hang fails, never stalls).
CALL_TIMEOUT_S = 60.0
SYSTEM_CONFIG: dict[str, Any] = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}
# Logical CPUs: each replica reserves one, as in Ray Serve; the machine has two.
NODE_CPUS = 6


def ray_tmpdir() -> str:
    # Ray's sockets live under its temp dir: keep the path short (Unix socket paths <= 107).
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "ray")
    os.makedirs(path, exist_ok=True)
    return path


@contextlib.contextmanager
def one_node() -> Iterator[None]:
    """``ray.init`` of a fresh one-node instance in this process, as a Ray Serve script does."""
    ray.init(
        num_cpus=NODE_CPUS,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _temp_dir=ray_tmpdir(),
        _system_config=SYSTEM_CONFIG,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        _shut_down_serval()
        ray.shutdown()


@contextlib.contextmanager
def three_nodes() -> Iterator[Cluster]:
    """A head and two workers. Each node has a custom resource named after it (``head``,
    ``w1``, ``w2``: 100 of it) so that a test places replicas on the node it chooses."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": NODE_CPUS,
            "node_ip_address": "127.0.0.1",
            "resources": {"head": 100},
            "include_dashboard": False,
            "_system_config": SYSTEM_CONFIG,
            "temp_dir": ray_tmpdir(),
        },
    )
    try:
        for name in ("w1", "w2"):
            cluster.add_node(num_cpus=NODE_CPUS, node_ip_address="127.0.0.1", resources={name: 100})
        cluster.wait_for_nodes()
        ray.init(
            address=loopback(cluster.address), _node_ip_address="127.0.0.1", log_to_driver=False
        )
        yield cluster
    finally:
        _shut_down_serval()
        ray.shutdown()
        cluster.shutdown()


def loopback(address: str) -> str:
    """``address`` (host:port) on 127.0.0.1: Ray reports the machine's own IP, where nothing of
    a loopback cluster listens (and connecting there retries for ever)."""
    return f"127.0.0.1:{address.rpartition(':')[2]}"


def _shut_down_serval() -> None:
    with contextlib.suppress(Exception):
        serve.shutdown()
    runtime.set_address(None)


def node_of(resource: str) -> str:
    """The id of the node that has custom resource ``resource``."""
    for node in ray.nodes():
        if node["Alive"] and resource in node["Resources"]:
            return str(node["NodeID"])
    raise LookupError(resource)


def serval_actors() -> list[str]:
    """The names of the live serval actors (controller, replicas, proxies) in the cluster."""
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == ray_store.DEFAULT_NAMESPACE
    )


def run_driver(code: str, timeout: float = CALL_TIMEOUT_S) -> str:
    """Run ``code`` in a driver process of its own, connected to this Ray cluster; its output."""
    address = loopback(ray.get_runtime_context().gcs_address)
    prelude = (
        "import ray\n"
        f"ray.init(address={address!r}, _node_ip_address='127.0.0.1', log_to_driver=False)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
