"""The control plane's calls, typed: one stub per handler, one method per call.

A control call travels as ``messages.Call(method, kwargs)`` and runs ``rpc_<method>`` of the
peer's handler (``rpc.RpcPeer``). Callers never spell a method's name: they call these stubs,
whose signatures are the handlers' (``tests/test_control_stubs.py`` checks that each stub
method has a handler method of the same name and parameters, and the other way round):

- ``ControllerCalls``: ``controller.Controller`` — from callers, the proxy, replicas, the CLI;
- ``ReplicaCalls``: ``replica.server.Replica`` — from the controller;
- ``ProxyCalls``: ``proxy.server.ProxyControl`` — from the controller.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from serval._private.wire.types import AppSpec, ReplicaInit, Table

if TYPE_CHECKING:
    from serval._private.telemetry.metrics import Snapshot
    from serval.config import AutoscalingContext, AutoscalingPolicy, HTTPOptions
    from serval.status import ServeStatus

__all__ = ["CallFn", "ControllerCalls", "ProxyCalls", "ReplicaCalls"]

# ``RpcPeer.call`` or ``ClusterClient.call_controller``: (method, **kwargs) -> result
CallFn = Callable[..., Awaitable[Any]]


class _Stub:
    __slots__ = ("_call",)

    def __init__(self, call: CallFn) -> None:
        self._call = call


class ControllerCalls(_Stub):
    """Calls to the controller (``Controller.rpc_*``)."""

    __slots__ = ()

    # -- callers and the CLI ----------------------------------------------------------------------

    async def subscribe(self) -> Table:
        return cast("Table", await self._call("subscribe"))

    async def deploy_app(self, spec: AppSpec) -> None:
        await self._call("deploy_app", spec=spec)

    async def wait_app(self, name: str) -> tuple[str, str]:
        return cast("tuple[str, str]", await self._call("wait_app", name=name))

    async def delete_app(self, name: str) -> None:
        await self._call("delete_app", name=name)

    async def status(self) -> ServeStatus:
        return cast("ServeStatus", await self._call("status"))

    async def details(self) -> dict[str, Any]:
        """Apps, deployments, replicas and proxies in detail (JSON-able; the dashboard's)."""
        return cast("dict[str, Any]", await self._call("details"))

    async def app_configs(self) -> dict[str, dict[str, Any] | None]:
        return cast("dict[str, dict[str, Any] | None]", await self._call("app_configs"))

    async def get_app(self, name: str) -> str:
        return cast(str, await self._call("get_app", name=name))

    async def apps_with_deployment(self, deployment: str) -> list[str]:
        return cast("list[str]", await self._call("apps_with_deployment", deployment=deployment))

    async def record_queued(self, counts: dict[tuple[str, str], int]) -> None:
        await self._call("record_queued", counts=counts)

    async def wait_proxy(self) -> None:
        await self._call("wait_proxy")

    async def http_options(self) -> HTTPOptions | None:
        return cast("HTTPOptions | None", await self._call("http_options"))

    async def shutdown(self) -> None:
        await self._call("shutdown")

    # -- the proxy --------------------------------------------------------------------------------

    async def proxy_ready(self, error: str | None, node: str = "") -> None:
        await self._call("proxy_ready", error=error, node=node)

    async def proxy_ack(self, version: int, node: str = "") -> None:
        await self._call("proxy_ack", version=version, node=node)

    async def collect_metrics(self, node: str | None = None) -> Snapshot:
        """Every replica's metrics, and every proxy's but the one at ``node`` (the asker)."""
        return cast("Snapshot", await self._call("collect_metrics", node=node))

    # -- replicas ---------------------------------------------------------------------------------

    async def register(self, replica_id: str, address: str = "") -> ReplicaInit:
        reply = await self._call("register", replica_id=replica_id, address=address)
        return cast(ReplicaInit, reply)

    async def replica_ready(
        self, replica_id: str, error: str | None, async_methods: frozenset[str] = frozenset()
    ) -> None:
        await self._call(
            "replica_ready", replica_id=replica_id, error=error, async_methods=async_methods
        )

    async def reattach(self, replica_id: str) -> None:
        await self._call("reattach", replica_id=replica_id)

    async def record_models(self, replica_id: str, model_ids: list[str]) -> None:
        await self._call("record_models", replica_id=replica_id, model_ids=model_ids)


class ReplicaCalls(_Stub):
    """Calls to a replica (``Replica.rpc_*``), from the controller."""

    __slots__ = ()

    async def check_health(self) -> None:
        await self._call("check_health")

    async def reconfigure(self, user_config: Any) -> None:
        await self._call("reconfigure", user_config=user_config)

    async def metrics(self) -> int:
        return cast(int, await self._call("metrics"))

    async def export_metrics(self) -> Snapshot:
        return cast("Snapshot", await self._call("export_metrics"))

    async def routing_stats(self) -> dict[str, Any]:
        """What the user's ``record_routing_stats()`` returns ({} without one)."""
        return cast("dict[str, Any]", await self._call("routing_stats"))

    async def autoscale(
        self,
        policy: AutoscalingPolicy,
        contexts: list[AutoscalingContext],
        state: bytes,
        app_level: bool,
    ) -> tuple[list[float | None], bytes]:
        """A custom autoscaling policy's raw decision and new (pickled) state."""
        return cast(
            "tuple[list[float | None], bytes]",
            await self._call(
                "autoscale", policy=policy, contexts=contexts, state=state, app_level=app_level
            ),
        )

    async def autoscaling_stats(self) -> dict[str, float]:
        return cast("dict[str, float]", await self._call("autoscaling_stats"))

    async def drain(self) -> None:
        """Finish the requests in flight (callers stop sending), then exit."""
        await self._call("drain")


class ProxyCalls(_Stub):
    """Calls to the HTTP proxy (``ProxyControl.rpc_*``), from the controller."""

    __slots__ = ()

    async def drain(self) -> None:
        """Stop listening, finish the requests in flight, then exit."""
        await self._call("drain")

    async def http_metrics(self) -> Snapshot:
        """This proxy's own metrics (its HTTP requests), to merge with the others'."""
        return cast("Snapshot", await self._call("http_metrics"))
