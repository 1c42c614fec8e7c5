"""The backend interface: start a replica host, reach it, stop it, learn of its death.

The controller logic and the replica runtime know nothing else about where replicas run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class ReplicaHost(ABC):
    """A running replica, as its backend sees it."""

    replica_id: str

    @property
    @abstractmethod
    def pid(self) -> int | None:
        """The OS process id, where there is one."""

    @abstractmethod
    def terminate(self) -> None:
        """Ask the replica to drain and exit."""

    @abstractmethod
    def kill(self) -> None:
        """Stop the replica at once."""

    @abstractmethod
    async def wait(self) -> int | None:
        """Return when the replica has exited (its exit code, where known)."""


class Backend(ABC):
    @abstractmethod
    def replica_address(self, replica_id: str) -> str:
        """Where callers reach this replica's data channel."""

    @abstractmethod
    def start_replica(
        self, replica_id: str, label: str, env: dict[str, str] | None = None
    ) -> ReplicaHost:
        """Start a replica host (with extra environment variables); it will register itself
        with the controller."""

    @abstractmethod
    def adopt(self, host_id: str, pid: int) -> ReplicaHost | None:
        """A host started by an earlier controller, if it is still alive."""

    def log_location(self) -> str:
        """Where the replicas' and the proxy's output goes, for error messages."""
        return "the backend's logs"

    @abstractmethod
    def start_proxy(self, http_options_json: str) -> ReplicaHost:
        """Start the HTTP proxy; it will report to the controller when it listens."""
