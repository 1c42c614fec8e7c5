"""Control calls from code that blocks (the façade's verbs, handle lookups): each runs on
the process's home loop and waits for its answer.

``before_call`` lets the owner of a cluster refuse a call at once instead of waiting for a
controller that cannot come back (``serval.api`` sets it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from serval._private.caller import runtime
from serval._private.wire.control import ControllerCalls
from serval.exceptions import DeploymentNotFoundError

__all__ = ["app_of_deployment", "before_call", "call"]

T = TypeVar("T")

# Called with the cluster's address before every call; raises to refuse it.
before_call: Callable[[str], None] | None = None
# Called when this process has no cluster yet: joins one that runs (without starting one) and
# returns its address, or None (``serval.api`` sets it).
connect_existing: Callable[[], str | None] | None = None


def call(fn: Callable[[ControllerCalls], Awaitable[T]], timeout: float | None = None) -> T:
    """``fn(controller)`` on the home loop, e.g. ``call(lambda c: c.status())``."""
    address = runtime.address()
    if address is None and connect_existing is not None:
        address = connect_existing()
    if address is None:
        address = runtime.require_address()  # (raises: no cluster)
    if before_call is not None:
        before_call(address)

    async def run() -> T:
        return await fn(runtime.home_client().controller)

    return runtime.run_sync(run(), timeout)


def app_of_deployment(deployment_name: str) -> str:
    """Which app a legacy ``Deployment.get_handle()`` means: the caller's own inside a replica;
    otherwise the one app that has it (``"default"`` if several do)."""
    me = runtime.replica()
    if me is not None:
        return me.app
    apps = call(lambda c: c.apps_with_deployment(deployment_name))
    if len(apps) == 1:
        return apps[0]
    if "default" in apps:
        return "default"
    if not apps:
        raise DeploymentNotFoundError(f"no running application has deployment {deployment_name!r}")
    raise DeploymentNotFoundError(
        f"deployment {deployment_name!r} is in several applications ({', '.join(apps)}); "
        "use serve.get_deployment_handle(name, app_name=...)"
    )
