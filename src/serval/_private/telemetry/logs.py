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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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


def formatter(
    identity: Identity, encoding: str, extra_attrs: Sequence[str] = ()
) -> logging.Formatter:
    if encoding == "JSON":
        return JsonFormatter(identity, extra_attrs)
    return TextFormatter(identity, extra_attrs)
