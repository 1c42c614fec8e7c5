"""What a line of a serval log file holds: who wrote it, in which request, and how it is
written (``LoggingConfig.encoding``: TEXT or JSON).

TEXT: ``LEVEL asctime component component_id [request_id route application] file:line -
message``; a replica's component is ``<app>_<deployment>`` and its id the replica id, the
proxy's ``proxy`` and its host, the controller's ``controller`` and its pid. The request's
fields are there only for a line logged while serving one (the replica's request context), or
given to the record itself (the access lines, written after the request). JSON: one object a
line with the same fields by name (see ``JsonFormatter``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from serval._private.telemetry.access_log import WHERE, Entry

__all__ = ["Identity", "JsonFormatter", "RequestFields", "TextFormatter", "formatter"]

_REQUEST_FIELDS = ("request_id", "route", "application")


@dataclass(frozen=True)
class Identity:
    """The process writing the log: ``component_name`` (replica, proxy, controller,
    dashboard) and its id; a replica's app and deployment."""

    component_name: str
    component_id: str
    application: str = ""
    deployment: str = ""

    @property
    def component(self) -> str:
        if self.component_name == "replica":
            return f"{self.application}_{self.deployment}"
        return self.component_name


class RequestFields(logging.Filter):
    """Give each record the fields of the request being served where it was logged (unless it
    has them already: an access line names its request itself). ``current_request``: the
    request's metadata where the record is made (a replica's request context), or None."""

    def __init__(
        self,
        identity: Identity,
        current_request: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        super().__init__()
        self.identity = identity
        self.current_request = current_request

    def filter(self, record: logging.LogRecord) -> bool:
        if self.current_request is not None and getattr(record, "request_id", None) is None:
            meta = self.current_request()
            if meta:
                record.request_id = meta.get("request_id") or ""
                record.route = meta.get("route") or ""
                record.application = self.identity.application
        return True


def _request_of(record: logging.LogRecord) -> tuple[str, str, str] | None:
    request_id = getattr(record, "request_id", None)
    if request_id is None:
        return None
    route = getattr(record, "route", "") or ""
    app = getattr(record, "application", "") or ""
    return str(request_id), str(route), str(app)


class TextFormatter(logging.Formatter):
    def __init__(self, identity: Identity, extra_attrs: Sequence[str] = ()) -> None:
        super().__init__()
        self.identity = identity
        self.extra_attrs = tuple(extra_attrs)
        self._who = f"{identity.component} {identity.component_id}"

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        parts = [record.levelname, self.formatTime(record), self._who]
        request = _request_of(record)
        if request is not None:
            parts.extend(p or "-" for p in request)
        parts.extend(f"{a}={getattr(record, a, '')}" for a in self.extra_attrs)
        parts.append(f"{record.filename}:{record.lineno} - {record.message}")
        text = " ".join(parts)
        tail = self._tail(record)
        return f"{text}\n{tail}" if tail else text

    def format_access(self, entries: list[Entry]) -> str:
        """Access lines (``access_log.Entry``), as ``format`` writes their records."""
        lines = []
        stamps = _Stamps()
        who = self._who
        for end, method, path, status, latency_s, request_id, route, app in entries:
            lines.append(
                f"INFO {stamps.at(end)} {who} {request_id or '-'} {route or '-'} {app or '-'} "
                f"{WHERE} - {method} {path} {status} {latency_s * 1000.0:.1f}ms\n"
            )
        return "".join(lines)

    def _tail(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        pieces = [record.exc_text or ""]
        if record.stack_info:
            pieces.append(self.formatStack(record.stack_info))
        return "\n".join(p for p in pieces if p)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``levelname``, ``asctime``, ``message``, ``component_name``,
    ``component_id``, ``filename``, ``lineno``, ``timestamp_ns``; a replica's ``deployment``,
    ``replica`` and ``application``; in a request ``request_id`` and ``route``; a traceback in
    ``exc_text``; and the ``additional_log_standard_attrs``."""

    def __init__(self, identity: Identity, extra_attrs: Sequence[str] = ()) -> None:
        super().__init__()
        self.identity = identity
        self.extra_attrs = tuple(extra_attrs)
        self._fixed: dict[str, str] = {
            "component_name": identity.component_name,
            "component_id": identity.component_id,
        }
        if identity.component_name == "replica":
            self._fixed.update(
                deployment=identity.deployment,
                replica=identity.component_id,
                application=identity.application,
            )

    def format_access(self, entries: list[Entry]) -> str:
        """Access lines (``access_log.Entry``), as ``format`` writes their records."""
        lines = []
        stamps = _Stamps()
        for end, method, path, status, latency_s, request_id, route, app in entries:
            out: dict[str, Any] = {
                "levelname": "INFO",
                "asctime": stamps.at(end),
                "message": f"{method} {path} {status} {latency_s * 1000.0:.1f}ms",
                **self._fixed,
                "filename": WHERE.split(":")[0],
                "lineno": int(WHERE.split(":")[1]),
                "timestamp_ns": int(end * 1e9),
                "request_id": request_id,
                "route": route,
                "application": app,
            }
            lines.append(json.dumps(out) + "\n")
        return "".join(lines)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "levelname": record.levelname,
            "asctime": self.formatTime(record),
            "message": record.getMessage(),
            **self._fixed,
            "filename": record.filename,
            "lineno": record.lineno,
            "timestamp_ns": int(record.created * 1e9),
        }
        request = _request_of(record)
        if request is not None:
            out.update(zip(_REQUEST_FIELDS, request, strict=True))
        for attr in self.extra_attrs:
            out[attr] = getattr(record, attr, None)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc_text"] = record.exc_text
        return json.dumps(out, default=str)


class _Stamps:
    """``asctime`` as logging writes it (local time, milliseconds), its seconds formatted once
    a second rather than once a line."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def at(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._text},{int((when - second) * 1000):03d}"


def formatter(
    identity: Identity, encoding: str, extra_attrs: Sequence[str] = ()
) -> TextFormatter | JsonFormatter:
    if encoding == "JSON":
        return JsonFormatter(identity, extra_attrs)
    return TextFormatter(identity, extra_attrs)
