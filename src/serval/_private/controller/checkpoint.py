"""The controller's checkpoint: desired state and the hosts it knew.

Kept by the backend (a file replaced atomically on the local backend, Ray's key-value store on
Ray) after every change, so that a controller restarted after
a crash finds the apps it was serving and adopts the replica and proxy hosts still there,
instead of starting them anew: traffic keeps flowing through the crash. Hosts are kept as
their backend's opaque ``ref``, and found again through ``Backend.adopt``.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import cloudpickle

from serval._private.backends.base import Backend, HostRef, ReplicaHost
from serval._private.controller.state import (
    AppState,
    DeploymentState,
    ReplicaRecord,
    ReplicaState,
)
from serval._private.wire.types import AppSpec, DeploymentSpec

PROXY_HOST_ID = "serval::proxy"


@dataclass
class SavedReplica:
    replica_id: str
    index: int
    version: str
    host: HostRef
    address: str
    state: str
    model_ids: frozenset[str]
    async_methods: frozenset[str] = frozenset()


@dataclass
class SavedDeployment:
    spec: DeploymentSpec
    next_index: int
    failed_message: str
    replicas: list[SavedReplica]
    autoscale_target: int = 0


@dataclass
class SavedApp:
    spec: AppSpec
    deployed_at: float
    deleting: bool
    deployments: list[SavedDeployment]


@dataclass
class Checkpoint:
    table_version: int
    proxies: dict[str, HostRef]  # place -> its proxy's host
    apps: list[SavedApp] = field(default_factory=list)


@dataclass
class Restored:
    """What a restarted controller takes over: its apps, the replicas still alive (to watch
    again), and the proxies that are (by place)."""

    table_version: int
    apps: dict[str, AppState]
    replicas: list[tuple[AppState, DeploymentState, ReplicaRecord]]
    proxies: dict[str, ReplicaHost]


def save(
    backend: Backend,
    address: str,
    table_version: int,
    proxies: dict[str, HostRef],
    apps: list[AppState],
) -> None:
    ckpt = Checkpoint(table_version, proxies, [_save_app(app) for app in apps])
    backend.save_checkpoint(address, cloudpickle.dumps(ckpt))


def _save_app(app: AppState) -> SavedApp:
    deployments = [
        SavedDeployment(
            dep.spec,
            dep.next_index,
            dep.failed_message,
            [
                SavedReplica(
                    r.replica_id,
                    r.index,
                    r.version,
                    r.host.ref,
                    r.address,
                    r.state.value,
                    r.model_ids,
                    r.async_methods,
                )
                for r in dep.replicas.values()
            ],
            dep.autoscale_target,
        )
        for dep in app.deployments.values()
    ]
    return SavedApp(app.spec, app.deployed_at, app.deleting, deployments)


def load(backend: Backend, address: str) -> Checkpoint | None:
    data = backend.load_checkpoint(address)
    if data is None:
        return None
    ckpt = pickle.loads(data)
    return ckpt if isinstance(ckpt, Checkpoint) else None


def restore(ckpt: Checkpoint, backend: Backend) -> Restored:
    """Rebuild the apps; adopt the hosts still alive; forget the dead ones."""
    apps: dict[str, AppState] = {}
    replicas: list[tuple[AppState, DeploymentState, ReplicaRecord]] = []
    for saved in ckpt.apps:
        app = AppState(saved.spec, {}, deployed_at=saved.deployed_at, deleting=saved.deleting)
        for sd in saved.deployments:
            dep = DeploymentState(
                saved.spec.name, sd.spec, next_index=sd.next_index, failed_message=sd.failed_message
            )
            dep.autoscale_target = sd.autoscale_target
            app.deployments[dep.name] = dep
            for sr in sd.replicas:
                rec = _adopt(backend, sr)
                if rec is not None:
                    replicas.append((app, dep, rec))
        apps[saved.spec.name] = app
    proxies = {}
    for node, ref in ckpt.proxies.items():
        host = backend.adopt(PROXY_HOST_ID, ref)
        if host is not None:
            proxies[node] = host
    # callers ignore versions they have seen: the new controller's count starts past them
    return Restored(ckpt.table_version + 1, apps, replicas, proxies)


def _adopt(backend: Backend, sr: SavedReplica) -> ReplicaRecord | None:
    host = backend.adopt(sr.replica_id, sr.host)
    if host is None:
        return None  # died with (or since) the old controller: reconciliation replaces it
    state = ReplicaState(sr.state)
    if state == ReplicaState.STARTING:
        host.kill()  # its constructor was reporting to a controller that is gone: start over
        return None
    rec = ReplicaRecord(sr.replica_id, sr.index, sr.version, host, sr.address, state)
    rec.model_ids = sr.model_ids
    rec.async_methods = sr.async_methods
    return rec
