"""The backend interface: where replicas (and the HTTP proxy) run, where callers reach them,
and how their end is learned. The controller's logic knows nothing else of them.

A host is opaque to the controller: it persists a host's ``ref`` (plain JSON-able values) in
its checkpoint, and a restarted controller gets the host back from ``Backend.adopt``. A host is
stopped at once with ``kill``; a graceful stop is a message to the replica (``drain``, see
``wire.control``), never a signal, so that it works wherever the replica runs. Callers reach a
replica at ``replica_address`` (a Unix socket path on the local backend; other transports
later).

A backend is chosen by name (``BackendName``), mapped to the import path of its class, and
imported only when chosen: ``load("local")``.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal, get_args

from serval._private.wire import layout
from serval.config import DeploymentConfig

__all__ = ["Backend", "BackendName", "Exit", "HostRef", "ReplicaHost", "load"]

# (memory: hosts in the test's own process, for tests of the controller; see its module)
BackendName = Literal["local", "ray", "memory"]
_IMPLEMENTATIONS: dict[BackendName, str] = {
    "local": "serval._private.backends.local:LocalBackend",
    "ray": "serval._private.backends.ray_backend:RayBackend",
    "memory": "serval._private.backends.memory:MemoryBackend",
}
# What a backend needs to find a host again: plain JSON-able values, kept in the checkpoint.
HostRef = dict[str, Any]


@dataclass(frozen=True)
class Exit:
    """How a host ended: its exit code where there is one, and the reason in words.
    ``place_gone``: it could not run where it was meant to (its node is gone), so starting it
    there again is pointless."""

    code: int | None
    reason: str
    place_gone: bool = False


class ReplicaHost(ABC):
    """A running replica (or proxy), as its backend sees it."""

    host_id: str

    @property
    @abstractmethod
    def ref(self) -> HostRef:
        """What ``Backend.adopt`` needs to find this host again."""

    @abstractmethod
    def kill(self) -> None:
        """Stop it at once (its in-flight requests fail)."""

    @abstractmethod
    async def wait(self) -> Exit:
        """Return once it has ended."""


class Backend(ABC):
    name: BackendName

    @abstractmethod
    def replica_address(self, replica_id: str) -> str:
        """Where callers reach this replica's data channel."""

    @abstractmethod
    def start_replica(
        self,
        replica_id: str,
        label: str,
        env: dict[str, str] | None = None,
        config: DeploymentConfig | None = None,
    ) -> ReplicaHost:
        """Start a replica host (with extra environment variables, placed as its deployment's
        ``config`` asks); it will register itself with the controller."""

    # Whether the places of proxies change while the cluster runs (nodes come and go).
    proxy_nodes_change = False

    def proxy_nodes(self, location: str) -> list[str]:
        """Where HTTP proxies run for ``location`` (``HTTPOptions.location``): the name of
        each place (a node); one place, ``""``, unless the backend has several."""
        return [""]

    async def current_proxy_nodes(self, location: str) -> list[str]:
        """``proxy_nodes`` now (asked again and again where ``proxy_nodes_change``)."""
        return self.proxy_nodes(location)

    @abstractmethod
    def start_proxy(self, http_options_json: str, node: str = "") -> ReplicaHost:
        """Start an HTTP proxy at place ``node``; it will report to the controller when it
        listens."""

    @abstractmethod
    def adopt(self, host_id: str, ref: HostRef) -> ReplicaHost | None:
        """A host started by an earlier controller, if it is still there."""

    def save_checkpoint(self, address: str, data: bytes) -> None:
        """Keep the controller's checkpoint of the cluster at ``address`` (by default a file
        in its runtime directory, replaced atomically)."""
        target = layout.checkpoint_path(address)
        tmp = f"{target}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)

    def load_checkpoint(self, address: str) -> bytes | None:
        """The checkpoint ``save_checkpoint`` kept, if any."""
        try:
            with open(layout.checkpoint_path(address), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def unsupported(self, config: DeploymentConfig) -> str | None:
        """Why this backend cannot run replicas with ``config`` (its ``ray_actor_options`` and
        placement fields), or None."""
        return None

    def log_location(self) -> str:
        """Where the replicas' and the proxy's output goes, for error messages."""
        return "the backend's logs"

    @classmethod
    def for_controller(cls, address: str, lifeline_fd: int | None) -> Backend:
        """The backend of a controller process serving the cluster at ``address`` (whose
        processes end when ``lifeline_fd`` closes)."""
        raise TypeError(f"the {cls.name} backend does not run in a controller process")


def load(name: BackendName) -> type[Backend]:
    """The backend class of that name, imported now."""
    if name not in _IMPLEMENTATIONS:
        known = ", ".join(get_args(BackendName))
        raise ValueError(f"unknown backend {name!r}; the backends are {known}")
    module, _, attr = _IMPLEMENTATIONS[name].partition(":")
    cls: type[Backend] = getattr(importlib.import_module(module), attr)
    return cls
