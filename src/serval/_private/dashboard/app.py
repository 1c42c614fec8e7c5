"""The dashboard's routes: the page, its live events, and Ray Serve's REST API.

- ``GET /``: the page (``static/``, shipped in the package; nothing is fetched from elsewhere).
- ``GET /api/dashboard/events``: server-sent events — ``history`` once (every deployment's
  points of the last minutes), then an ``update`` per sample (``Live.update``).
- ``GET /api/serve/applications/``: ``ServeInstanceDetails`` (``shapes``), asked of the
  controller now.
- ``PUT /api/serve/applications/``: a ``ServeDeploySchema`` config, deployed declaratively
  (``deploy``); 400 with the reason when it does not validate or its code does not import.
- ``DELETE /api/serve/applications/``: every application deleted.

Every answer is JSON or a short text; no traceback reaches a client (an unexpected error is
logged here and answered as ``{"error": "internal error"}``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from serval._private.caller.client import ClusterClient
from serval._private.dashboard.deploy import DeployRunner
from serval._private.dashboard.history import History
from serval._private.dashboard.logs import ReplicaLogs
from serval._private.dashboard.shapes import instance_details

__all__ = ["Live", "make_app"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
_CONTROLLER_TIMEOUT_S = 10.0
_KEEPALIVE_S = 15.0
_QUEUE_UPDATES = 30  # a subscriber this far behind misses updates (the next one is whole)
_MAX_CONFIG_BYTES = 8 * 1024 * 1024  # a PUT's config (a config file is a few KiB)


class Live:
    """The sampled state: the history, the last update, and the pages subscribed to it."""

    def __init__(self, client: ClusterClient, logs: ReplicaLogs) -> None:
        self.client = client
        self.logs = logs
        self.history = History()
        self.last_update: dict[str, Any] | None = None
        self._subscribers: set[asyncio.Queue[str]] = set()

    async def details(self) -> dict[str, Any]:
        return instance_details(await self._raw_details(), self._log_path)

    async def _raw_details(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.client.controller.details(), _CONTROLLER_TIMEOUT_S)

    def _log_path(self, app: str, deployment: str, replica_id: str) -> str | None:
        return self.logs.path(app, deployment, replica_id)

    async def sample(self) -> None:
        """One sample: the controller's details and every replica's metrics."""
        try:
            raw = await self._raw_details()
            details = instance_details(raw, self._log_path)
            snapshot = await asyncio.wait_for(
                self.client.controller.collect_metrics(), _CONTROLLER_TIMEOUT_S
            )
        except Exception as exc:  # (restarting, say): the page says so and keeps its history
            logger.debug("the dashboard's sample failed", exc_info=True)
            self._publish("update", {"t": time.time(), "error": _unreachable(exc)})
            return
        points = self.history.add(time.time(), snapshot)
        self.history.forget(_deployment_keys(details))
        update = {
            "t": time.time(),
            "error": None,
            "details": details,
            "points": [
                {"app": k[0], "deployment": k[1], "point": p.as_json()} for k, p in points.items()
            ],
            "replicas": {
                k[2]: {"running": running, "waiting": waiting}
                for k, (running, waiting) in self.history.in_flight().items()
            },
            "logs": self._logs(details) if self._subscribers else {},  # (files: for a reader)
            "queued_at_callers": [
                {"app": a, "deployment": d, "queued": dep.get("queued", 0)}
                for a, app in raw.get("applications", {}).items()
                for d, dep in app["deployments"].items()
            ],
        }
        self.last_update = update
        self._publish("update", update)

    def _logs(self, details: dict[str, Any]) -> dict[str, list[str]]:
        out = {}
        for app, dep, rep in _replicas(details):
            lines = self.logs.tail(app, dep, rep["replica_id"])
            if lines:
                out[rep["replica_id"]] = lines
        self.logs.forget_others({rep["log_file_path"] for _, _, rep in _replicas(details)})
        return out

    def history_event(self) -> dict[str, Any]:
        return {
            "series": [
                {"app": k[0], "deployment": k[1], "points": [p.as_json() for p in points]}
                for k, points in self.history.series.items()
            ]
        }

    def _publish(self, event: str, data: dict[str, Any]) -> None:
        frame = _sse(event, data)
        for queue in self._subscribers:
            if queue.full():
                continue
            queue.put_nowait(frame)

    async def events(self) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(_QUEUE_UPDATES)
        self._subscribers.add(queue)
        try:
            yield _sse("history", self.history_event())
            if self.last_update is not None:
                yield _sse("update", self.last_update)
            while True:
                try:
                    yield await asyncio.wait_for(queue.get(), _KEEPALIVE_S)
                except TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            self._subscribers.discard(queue)


def make_app(live: Live, deployer: DeployRunner) -> Starlette:
    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    async def events(request: Request) -> Response:
        return StreamingResponse(
            live.events(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def get_applications(request: Request) -> Response:
        try:
            return JSONResponse(await live.details())
        except Exception as exc:
            return _error(503, _unreachable(exc))

    async def put_applications(request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_CONFIG_BYTES:
                return _error(413, f"a config is at most {_MAX_CONFIG_BYTES} bytes")
        try:
            config = json.loads(body)
        except ValueError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        if not isinstance(config, dict):
            return _error(400, "the body must be a JSON object with 'applications'")
        outcome = await deployer.deploy(config)
        if not outcome.ok:
            return _error(400, outcome.message)
        return JSONResponse({})

    async def delete_applications(request: Request) -> Response:
        try:
            names = list((await live.details())["applications"])
            await asyncio.gather(*(live.client.controller.delete_app(n) for n in names))
        except Exception as exc:
            return _error(503, _unreachable(exc))
        return JSONResponse({})

    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.error("the dashboard failed to answer %s %s", request.method, request.url.path)
        logger.debug("why", exc_info=exc)
        return _error(500, "internal error")

    routes = [
        Route("/", page),
        Route("/api/dashboard/events", events),
        Route("/api/serve/applications/", get_applications, methods=["GET"]),
        Route("/api/serve/applications/", put_applications, methods=["PUT"]),
        Route("/api/serve/applications/", delete_applications, methods=["DELETE"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={Exception: internal_error})


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _unreachable(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "the serval controller did not answer in time"
    return f"the serval controller cannot be reached ({type(exc).__name__}: {exc})"


def _replicas(details: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (app_name, dep_name, rep)
        for app_name, app in details["applications"].items()
        for dep_name, dep in app["deployments"].items()
        for rep in dep["replicas"]
    ]


def _deployment_keys(details: dict[str, Any]) -> set[tuple[str, str]]:
    return {(a, d) for a, app in details["applications"].items() for d in app["deployments"]}
