"""A serval cluster on Ray: its names, and what it keeps in Ray's key-value store (the GCS).

A cluster is named by its Ray namespace (``serval`` unless told otherwise); its address is
``ray:<namespace>``. The store holds, per cluster: the secret that TCP endpoints authenticate
with (made by whoever needs it first; never on a command line, never in an environment), the
controller's current TCP endpoint (rewritten by each controller that starts) and the
controller's checkpoint, the dashboard's token and where the dashboard listens. Only
processes connected to the Ray cluster can read it.

Importing this module registers the ``ray:`` scheme with ``wire.endpoints``, so that every
client in this process finds the controller wherever it runs now. Ray must be initialised in
this process before any of these are called (``ray.init`` in a driver; a Ray worker is).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
from typing import Any

from ray.experimental import internal_kv

from serval._private.wire import auth, endpoints
from serval._private.wire.layout import replica_actor_name

__all__ = [
    "CONTROLLER_ACTOR",
    "DASHBOARD_ACTOR",
    "DEFAULT_NAMESPACE",
    "address_of",
    "checkpoint",
    "controller_endpoint",
    "dashboard_token",
    "dashboard_url",
    "forget_cluster",
    "namespace_of",
    "node_socket_dir",
    "proxy_actor_name",
    "replica_actor_name",
    "save_checkpoint",
    "secret",
    "set_controller_endpoint",
    "set_dashboard_url",
    "set_system_logging",
    "system_logging",
]

DEFAULT_NAMESPACE = "serval"
CONTROLLER_ACTOR = "SERVAL_CONTROLLER"
DASHBOARD_ACTOR = "SERVAL_DASHBOARD"
SCHEME = "ray"

_SECRET = b"secret"
_CONTROLLER = b"controller"
_CHECKPOINT = b"checkpoint"
_DASHBOARD_TOKEN = b"dashboard_token"
_DASHBOARD_URL = b"dashboard_url"
_LOGGING = b"logging_config"


def address_of(namespace: str) -> str:
    return f"{SCHEME}:{namespace}"


def namespace_of(address: str) -> str:
    scheme, _, namespace = address.partition(":")
    if scheme != SCHEME or not namespace:
        raise ValueError(f"not the address of a serval cluster on Ray: {address!r}")
    return namespace


def proxy_actor_name(node_id: str) -> str:
    return f"SERVAL_PROXY:{node_id}"


def _kv_namespace(namespace: str) -> str:
    return f"serval:{namespace}"


def _get(namespace: str, key: bytes) -> bytes | None:
    value = internal_kv._internal_kv_get(key, namespace=_kv_namespace(namespace))
    return value if isinstance(value, bytes) else None


def _put(namespace: str, key: bytes, value: bytes, overwrite: bool = True) -> None:
    internal_kv._internal_kv_put(
        key, value, overwrite=overwrite, namespace=_kv_namespace(namespace)
    )


def secret(namespace: str) -> bytes:
    """The cluster's secret (made now if it has none; two makers agree on the first)."""
    found = _get(namespace, _SECRET)
    if found is None:
        _put(namespace, _SECRET, auth.new_secret(), overwrite=False)
        found = _get(namespace, _SECRET)
    assert found is not None
    return found


def controller_endpoint(namespace: str) -> str | None:
    found = _get(namespace, _CONTROLLER)
    return found.decode() if found is not None else None


def set_controller_endpoint(namespace: str, address: str) -> None:
    _put(namespace, _CONTROLLER, address.encode())


def checkpoint(namespace: str) -> bytes | None:
    return _get(namespace, _CHECKPOINT)


def save_checkpoint(namespace: str, data: bytes) -> None:
    _put(namespace, _CHECKPOINT, data)


def dashboard_token(namespace: str) -> str:
    """The dashboard's token (made now if there is none; two makers agree on the first)."""
    found = _get(namespace, _DASHBOARD_TOKEN)
    if found is None:
        _put(namespace, _DASHBOARD_TOKEN, secrets.token_urlsafe(32).encode(), overwrite=False)
        found = _get(namespace, _DASHBOARD_TOKEN)
    assert found is not None
    return found.decode()


def dashboard_url(namespace: str) -> str | None:
    """Where the cluster's dashboard listens (without its token), if it has one."""
    found = _get(namespace, _DASHBOARD_URL)
    return found.decode() if found else None


def set_dashboard_url(namespace: str, url: str | None) -> None:
    _put(namespace, _DASHBOARD_URL, (url or "").encode())


def system_logging(namespace: str) -> dict[str, Any]:
    """The ``LoggingConfig`` fields of the cluster's controller, proxies and dashboard."""
    found = _get(namespace, _LOGGING)
    value = json.loads(found) if found else {}
    return value if isinstance(value, dict) else {}


def set_system_logging(namespace: str, config: dict[str, Any] | None) -> None:
    _put(namespace, _LOGGING, json.dumps(config or {}).encode())


def forget_cluster(namespace: str) -> None:
    """The cluster was shut down: its next start begins afresh (a new secret too)."""
    keys = (_CONTROLLER, _CHECKPOINT, _SECRET, _DASHBOARD_TOKEN, _DASHBOARD_URL, _LOGGING)
    for key in keys:
        internal_kv._internal_kv_del(key, namespace=_kv_namespace(namespace))


def node_socket_dir(node_id: str) -> str:
    """The private (0700) directory of this node's replica sockets, made if need be."""
    base = os.path.join(tempfile.gettempdir(), f"serval-ray-{os.getuid()}")
    path = os.path.join(base, node_id[:16])
    for d in (base, path):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        st = os.lstat(d)
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(f"{d} is not a private directory of this user's")
    return path


async def _resolve(address: str) -> str:
    found = await asyncio.to_thread(controller_endpoint, namespace_of(address))
    if found is None:
        raise ConnectionRefusedError(f"no serval controller is running in Ray ({address})")
    return found


endpoints.register_resolver(SCHEME, _resolve)
