"""Addresses: where a replica or a controller can be reached, and which way this process takes.

An address is one endpoint, or several separated by ``|`` in the order of preference:

- ``/abs/path``: a Unix socket (the local backend: every process is on this machine);
- ``unix@<node>:/abs/path``: a Unix socket, for processes on node ``<node>`` only;
- ``tcp:<host>:<port>``: TCP, authenticated with the cluster's secret (``auth``).

A Ray replica listens on both a node-local Unix socket and TCP, so a caller on its node takes
the socket and the others TCP. What this process is (its node, the cluster's secret) is set
once by the backend that connected it: ``set_local_node``, ``set_secret``.

A *cluster* address is a runtime directory's path (the local backend: its controller listens
at ``controller.sock`` there), or ``<scheme>:<name>`` for a cluster whose controller may move
(``ray:<namespace>``): the backend of that scheme registers how to find the controller now
(``register_resolver``), and ``controller`` asks it again on every reconnect.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from serval._private.wire.layout import controller_path

__all__ = [
    "Endpoint",
    "choose",
    "controller",
    "register_resolver",
    "secret",
    "set_local_node",
    "set_secret",
    "tcp",
    "unix_on_node",
    "url_base",
]


class Endpoint(NamedTuple):
    kind: str  # "unix" | "tcp"
    path: str = ""  # unix
    host: str = ""  # tcp
    port: int = 0  # tcp


_local_node: str | None = None
_secret: bytes | None = None
# scheme -> where that cluster's controller listens now (see the module's docstring)
_resolvers: dict[str, Callable[[str], Awaitable[str]]] = {}


def register_resolver(scheme: str, resolve: Callable[[str], Awaitable[str]]) -> None:
    _resolvers[scheme] = resolve


async def controller(cluster: str) -> str:
    """Where the controller of ``cluster`` (a cluster address) listens now."""
    if cluster.startswith(os.sep):
        return controller_path(cluster)
    scheme, _, _ = cluster.partition(":")
    resolve = _resolvers.get(scheme)
    if resolve is None:
        raise ConnectionRefusedError(f"no backend in this process knows clusters like {cluster!r}")
    return await resolve(cluster)


def set_local_node(node: str | None) -> None:
    global _local_node
    _local_node = node


def set_secret(value: bytes | None) -> None:
    global _secret
    _secret = value


def secret() -> bytes:
    if _secret is None:
        raise ConnectionRefusedError(
            "this process has no cluster secret: it cannot dial a TCP endpoint"
        )
    return _secret


def tcp(host: str, port: int) -> str:
    return f"tcp:{host}:{port}"


def url_base(scheme: str, host: str, port: int) -> str:
    """``scheme://host:port`` as a client on this machine reaches a listener bound to
    ``host``: a wildcard (``0.0.0.0``, ``::``, empty) as 127.0.0.1, an IPv6 host bracketed."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def unix_on_node(node: str, path: str) -> str:
    return f"unix@{node}:{path}"


def node_of(address: str) -> str:
    """The node of the endpoint at ``address`` ("" for one on this machine's local cluster)."""
    for part in address.split("|"):
        if part.startswith("unix@"):
            return part[len("unix@") :].partition(":")[0]
    return ""


def local_node() -> str:
    """The node this process runs on ("" on a local cluster, or a Ray client)."""
    return _local_node or ""


def choose(address: str) -> Endpoint:
    """The first endpoint of ``address`` this process can use."""
    for part in address.split("|"):
        if part.startswith("/"):
            return Endpoint("unix", path=part)
        if part.startswith("unix@"):
            node, _, path = part[len("unix@") :].partition(":")
            if node == _local_node:
                return Endpoint("unix", path=path)
        elif part.startswith("tcp:"):
            host, _, port = part[len("tcp:") :].rpartition(":")
            return Endpoint("tcp", host=host.strip("[]"), port=int(port))
        else:
            raise ValueError(f"not an address serval knows: {part!r}")
    raise ConnectionRefusedError(f"no endpoint of {address!r} is reachable from this node")
