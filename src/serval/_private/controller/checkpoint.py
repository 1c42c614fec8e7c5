"""The controller's checkpoint: desired state and the replicas it knew, on disk.

Written atomically (temp file + rename) after every change, so that a controller restarted after
a crash finds the apps it was serving and adopts the replica and proxy processes still alive,
instead of starting them anew: traffic keeps flowing through the crash.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cloudpickle

from serval._private.controller.state import (
    AppState,
    DeploymentState,
    ReplicaRecord,
    ReplicaState,
)
from serval.deployment import AppSpec, DeploymentSpec

if TYPE_CHECKING:
    from serval._private.controller.controller import Controller

FILENAME = "controller.ckpt"


@dataclass
class SavedReplica:
    replica_id: str
    index: int
    version: str
    pid: int | None
    path: str
    state: str
    model_ids: frozenset[str]


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
    proxy_pid: int | None
    apps: list[SavedApp] = field(default_factory=list)


def path_in(address: str) -> str:
    return os.path.join(address, FILENAME)


def save(controller: Controller, address: str) -> None:
    ckpt = Checkpoint(
        controller.table_version,
        controller.proxy.pid if controller.proxy is not None else None,
        [_save_app(app) for app in controller.apps.values()],
    )
    target = path_in(address)
    tmp = f"{target}.tmp"
    with open(tmp, "wb") as f:
        f.write(cloudpickle.dumps(ckpt))
    os.replace(tmp, target)


def _save_app(app: AppState) -> SavedApp:
    deployments = [
        SavedDeployment(
            dep.spec,
            dep.next_index,
            dep.failed_message,
            [
                SavedReplica(
                    r.replica_id, r.index, r.version, r.host.pid, r.path, r.state.value, r.model_ids
                )
                for r in dep.replicas.values()
            ],
            dep.autoscale_target,
        )
        for dep in app.deployments.values()
    ]
    return SavedApp(app.spec, app.deployed_at, app.deleting, deployments)


def load(address: str) -> Checkpoint | None:
    with contextlib.suppress(FileNotFoundError):
        with open(path_in(address), "rb") as f:
            ckpt = pickle.load(f)
        if isinstance(ckpt, Checkpoint):
            return ckpt
    return None


def restore(controller: Controller, ckpt: Checkpoint) -> None:
    """Rebuild the controller's state; adopt live replicas; forget the dead ones."""
    controller.table_version = ckpt.table_version + 1  # callers ignore versions they have seen
    for saved in ckpt.apps:
        app = AppState(saved.spec, {}, deployed_at=saved.deployed_at, deleting=saved.deleting)
        for sd in saved.deployments:
            dep = DeploymentState(
                saved.spec.name, sd.spec, next_index=sd.next_index, failed_message=sd.failed_message
            )
            dep.autoscale_target = sd.autoscale_target
            app.deployments[dep.name] = dep
            for sr in sd.replicas:
                _adopt(controller, app, dep, sr)
            controller.setup_autoscaling(app, dep)
        controller.apps[saved.spec.name] = app


def _adopt(controller: Controller, app: AppState, dep: DeploymentState, sr: SavedReplica) -> None:
    host = controller.backend.adopt(sr.replica_id, sr.pid) if sr.pid is not None else None
    if host is None:
        return  # died with (or since) the old controller: reconciliation replaces it
    state = ReplicaState(sr.state)
    if state == ReplicaState.STARTING:
        host.kill()  # its constructor was reporting to a controller that is gone: start over
        return
    rec = ReplicaRecord(sr.replica_id, sr.index, sr.version, host, sr.path, state)
    rec.model_ids = sr.model_ids
    controller.adopt_replica(app, dep, rec)
