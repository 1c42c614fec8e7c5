"""Calls by reference (the Ray backend only): a call is a Ray actor call to a replica's actor,
and its result a real ``ray.ObjectRef`` that ``ray.get``, ``ray.wait`` and Ray tasks take.

This is what ``handle.options(_by_reference=True)`` asks for, and what the ServeHandle guide's
handles (``Deployment.get_handle()``) give on Ray. The caller chooses the replica (power of two
choices by the by-reference calls it has in flight to each, among the running replicas of the
table it already has); the replica's actor then serves the call through the replica's own
request path, so its ``max_ongoing_requests``, queue, drain and errors apply as to any call.

Ray is imported only here, and this module only when such a call is made.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import threading
from functools import partial
from typing import Any

import ray

from serval._private.caller import runtime
from serval._private.caller.calls import Call
from serval._private.caller.client import ClusterClient
from serval._private.wire.layout import replica_actor_name
from serval._private.wire.types import ReplicaInfo
from serval.exceptions import (
    DeploymentNotFoundError,
    DeploymentUnavailableError,
    RequestCancelledError,
    ServalError,
)

__all__ = ["submit"]

_TABLE_TIMEOUT_S = 30.0

_lock = threading.Lock()
_in_flight: dict[str, int] = {}  # replica id -> by-reference calls of this process not done
_actors: dict[str, Any] = {}  # replica id -> its actor handle
_entries: dict[tuple[str, str], Any] = {}  # (replica id, method) -> the actor method to call


def _namespace() -> str:
    address = runtime.require_address()
    if not address.startswith("ray:"):
        raise ServalError(
            "calls by reference (_by_reference=True) need the Ray backend: this cluster is local"
        )
    return address.partition(":")[2]


def submit(call: Call, owner: asyncio.AbstractEventLoop) -> concurrent.futures.Future[Any]:
    """Send ``call`` by reference (at once when this process has the replica table, else as
    soon as it has); the future of its ``ray.ObjectRef``. ``call`` ends (on ``owner``, its
    loop) with the ref's value or error."""
    refs: concurrent.futures.Future[Any] = concurrent.futures.Future()
    namespace = _namespace()
    client = _client_with_table()
    if client is not None:
        _send(client, call, owner, namespace, refs)
        return refs
    loop = runtime.running_loop()
    if loop is not None:  # on an event loop whose client has no table yet: wait there
        waiting = runtime.client(loop)

        async def when_ready() -> None:
            await waiting.wait_ready()
            _send(waiting, call, owner, namespace, refs)

        waiting.tasks.spawn(when_ready(), loop)
        return refs
    home = runtime.home_client()
    runtime.run_sync(home.wait_ready(), _TABLE_TIMEOUT_S)
    _send(home, call, owner, namespace, refs)
    return refs


def _send(
    client: ClusterClient,
    call: Call,
    owner: asyncio.AbstractEventLoop,
    namespace: str,
    refs: concurrent.futures.Future[Any],
) -> None:
    try:
        info = _choose(client, call.app, call.deployment)
        replica_id = info.replica_id
        entry = _entry(info, call, namespace)
        # The arguments at the top level of Ray's call: Ray resolves the refs among them. The
        # method's name alone when the call has no metadata (each argument costs Ray time).
        what = call.method if call.meta is None else (call.method, call.meta)
        ref = entry.remote(what, *call.args, **call.kwargs)
    except BaseException as exc:
        refs.set_exception(exc)
        owner.call_soon_threadsafe(call.set_exception, exc)
        return
    with _lock:
        _in_flight[replica_id] = _in_flight.get(replica_id, 0) + 1
    call.replica = replica_id
    call.mark_assigned()
    refs.set_result(ref)
    ref.future().add_done_callback(partial(_finished, call, owner, replica_id))


def _finished(
    call: Call,
    owner: asyncio.AbstractEventLoop,
    replica_id: str,
    done: concurrent.futures.Future[Any],
) -> None:
    """On a thread of Ray's: the ref is ready; end ``call`` with it, on its loop."""
    _done(replica_id)
    try:
        value = done.result()
    except BaseException as exc:
        if isinstance(exc, ray.exceptions.TaskCancelledError):  # as on any backend
            exc = RequestCancelledError(f"{call.deployment}.{call.method} was cancelled")
        with contextlib.suppress(RuntimeError):  # the owner loop is gone: nobody waits
            owner.call_soon_threadsafe(call.set_exception, exc)
        return
    with contextlib.suppress(RuntimeError):
        owner.call_soon_threadsafe(call.set_result, value)


def _done(replica_id: str) -> None:
    with _lock:
        left = _in_flight.get(replica_id, 1) - 1
        if left > 0:
            _in_flight[replica_id] = left
        else:
            _in_flight.pop(replica_id, None)


def _client_with_table() -> ClusterClient | None:
    """A client of this process that has the replica table now: the running loop's, else
    the home loop's (its routers may be read from any thread, under their lock)."""
    loop = runtime.running_loop()
    if loop is not None:
        client = runtime.client(loop)
        if client.has_table:
            return client
    home = runtime.home_client()
    return home if home.has_table else None


def _choose(client: ClusterClient, app: str, deployment: str) -> ReplicaInfo:
    router = client.routers.get((app, deployment))
    if router is None:
        raise DeploymentNotFoundError(f"no deployment {deployment!r} in application {app!r}")
    with router.lock:
        live = [s.info for s in router.slots.values() if not s.dead and not s.draining]
    if not live:
        raise DeploymentUnavailableError(f"deployment {app}.{deployment} has no running replica")
    if len(live) == 1:
        return live[0]
    a, b = random.sample(live, 2)
    with _lock:
        return a if _in_flight.get(a.replica_id, 0) <= _in_flight.get(b.replica_id, 0) else b


def _entry(info: ReplicaInfo, call: Call, namespace: str) -> Any:
    """The actor method that serves ``call`` on replica ``info``. An async method waits on
    the replica's loop: on a thread of the actor's group for such calls, as many as the replica
    may run, not of the few that run sync ones. Named for the call's method, as Ray shows it
    (its dashboard, and the errors raised by the call, such as a result that cannot be
    serialized)."""
    key = (info.replica_id, call.method)
    entry = _entries.get(key)
    if entry is None:
        actor = _actor(info.replica_id, namespace)
        method = (
            actor.handle_async_request
            if call.method in info.async_methods
            else actor.handle_request
        )
        entry = method.options(name=f"serval:{call.app}.{call.deployment}.{call.method}")
        if len(_entries) > 4096:  # replicas come and go: forget the old ones
            _entries.clear()
        _entries[key] = entry
    return entry


def _actor(replica_id: str, namespace: str) -> Any:
    actor = _actors.get(replica_id)
    if actor is None:
        try:
            actor = ray.get_actor(replica_actor_name(replica_id), namespace=namespace)
        except ValueError:
            raise DeploymentUnavailableError(
                f"replica {replica_id} is gone (it was replaced); call again"
            ) from None
        if len(_actors) > 4096:  # replicas come and go: forget the old ones
            _actors.clear()
        _actors[replica_id] = actor
    return actor
