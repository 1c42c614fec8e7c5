"""Where a local cluster's endpoints and files live in its runtime directory.

The directory (mode 0700) is the cluster's address: ``controller.sock`` (the control plane),
``r/<replica id>.sock`` (each replica's data plane), ``controller.ckpt`` (the controller's
checkpoint, which holds the user's pickled code), ``owner`` (who owns the cluster),
``dashboard.token`` (the dashboard's token, 0600) and ``dashboard.json`` (where it listens).
"""

from __future__ import annotations

import os

__all__ = [
    "CHECKPOINT",
    "CONTROLLER_SOCKET",
    "DASHBOARD",
    "DASHBOARD_TOKEN",
    "MARKS",
    "MAX_REPLICA_SOCKET_SUFFIX",
    "OWNER",
    "REPLICAS",
    "checkpoint_path",
    "controller_path",
    "dashboard_path",
    "dashboard_token_path",
    "owner_path",
    "replica_actor_name",
    "replica_path",
    "replicas_dir",
]

CONTROLLER_SOCKET = "controller.sock"
CHECKPOINT = "controller.ckpt"
OWNER = "owner"
DASHBOARD_TOKEN = "dashboard.token"
DASHBOARD = "dashboard.json"
REPLICAS = "r"
# What a runtime directory holds (one of them at least) once its controller has started.
MARKS = (CONTROLLER_SOCKET, CHECKPOINT, REPLICAS)
# The longest part a replica's socket adds to the directory's path (ids are 12 hex digits):
# a Unix socket's whole path must fit in 107 bytes.
MAX_REPLICA_SOCKET_SUFFIX = len(f"/{REPLICAS}/0123456789ab.sock")


def controller_path(address: str) -> str:
    return os.path.join(address, CONTROLLER_SOCKET)


def replicas_dir(address: str) -> str:
    return os.path.join(address, REPLICAS)


def replica_path(address: str, replica_id: str) -> str:
    return os.path.join(address, REPLICAS, f"{replica_id}.sock")


def checkpoint_path(address: str) -> str:
    return os.path.join(address, CHECKPOINT)


def owner_path(address: str) -> str:
    return os.path.join(address, OWNER)


def dashboard_token_path(address: str) -> str:
    return os.path.join(address, DASHBOARD_TOKEN)


def dashboard_path(address: str) -> str:
    return os.path.join(address, DASHBOARD)


def replica_actor_name(replica_id: str) -> str:
    """The name of a replica's actor on the Ray backend (in the cluster's Ray namespace)."""
    return f"SERVAL_REPLICA:{replica_id}"
