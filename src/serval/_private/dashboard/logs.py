"""Replicas' recent log lines, for the page: read from the files serval's processes write.

Where they are is ``telemetry.log_files``' to say; one record a line (text, or JSON objects
with ``message`` when ``LoggingConfig(encoding="JSON")``). Only the tail of each file is read,
and read again only when the file changed.
"""

from __future__ import annotations

import json
import os
from typing import Any

from serval._private.telemetry import log_files

__all__ = ["ReplicaLogs"]

_TAIL_BYTES = 16 * 1024
_LINES = 30
_MAX_LINE = 400  # characters shown of one line


class ReplicaLogs:
    def __init__(self, address: str, lines: int = _LINES) -> None:
        self.address = address
        self.lines = lines
        self._seen: dict[str, tuple[int, int, list[str]]] = {}  # path -> (size, mtime, tail)
        self._directory: str | None = None

    def directory(self) -> str | None:
        """The log directory (read until found: a cluster's does not change)."""
        if self._directory is None:
            self._directory = log_files.logs_dir(self.address)
        return self._directory

    def path(self, app: str, deployment: str, replica_id: str) -> str | None:
        """The replica's log file, if it has one."""
        directory = self.directory()
        if directory is None:
            return None
        path = os.path.join(directory, log_files.replica_file(app, deployment, replica_id))
        return path if os.path.isfile(path) else None

    def tail(self, app: str, deployment: str, replica_id: str) -> list[str]:
        path = self.path(app, deployment, replica_id)
        if path is None:
            return []
        try:
            info = os.stat(path)
        except OSError:
            return []
        seen = self._seen.get(path)
        if seen is not None and seen[:2] == (info.st_size, info.st_mtime_ns):
            return seen[2]
        lines = _read_tail(path, self.lines)
        self._seen[path] = (info.st_size, info.st_mtime_ns, lines)
        return lines

    def forget_others(self, keep: set[str]) -> None:
        for path in [p for p in self._seen if p not in keep]:
            del self._seen[path]


def _read_tail(path: str, count: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines()
    if size > _TAIL_BYTES and lines:
        lines = lines[1:]  # the first may be cut
    return [_shown(line) for line in lines[-count:] if line.strip()]


def _shown(line: str) -> str:
    if line.startswith("{"):
        try:
            record: Any = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and "message" in record:
            parts = [record.get("asctime"), record.get("levelname"), record.get("message")]
            line = " ".join(str(p) for p in parts if p)
    return line[:_MAX_LINE]
