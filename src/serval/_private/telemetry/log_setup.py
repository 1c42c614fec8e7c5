"""A serval process's logging: a file of its own in the cluster's log directory, rotated, and
standard error as before.

Every record of the process goes to its file (serval's, the user's on ``"ray.serve"``,
``"serval"`` or any other logger), at ``LoggingConfig.log_level``; access lines
(``"serval.access"``) go only there. The file is private (0600), as is the directory: logs
may hold what requests carried.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serval._private.telemetry import access_log
from serval._private.telemetry.access_log import ACCESS_LOGGER, BATCHED
from serval._private.telemetry.logs import Identity, RequestFields, formatter

__all__ = ["Options", "configure", "quiet_access"]

# Ray's variables for its log files' rotation, and their defaults.
_MAX_BYTES = int(os.environ.get("RAY_ROTATION_MAX_BYTES", str(512 * 1024 * 1024)))
_BACKUPS = int(os.environ.get("RAY_ROTATION_BACKUP_COUNT", "5"))

_installed: list[logging.Handler] = []  # this process's file handler, once configured


class _PrivateRotatingFile(logging.handlers.RotatingFileHandler):
    """A rotated file whose every incarnation is created 0600. Cheaper per line than its
    base: the size is counted as lines are written (the base formats each record twice and
    asks the file where it is), and a batch of access lines (``BATCHED``: all but its last
    line) is flushed once, at its end."""

    def _open(self) -> io.TextIOWrapper:
        stream = open(
            self.baseFilename,
            "a",
            encoding=self.encoding or "utf-8",
            errors=self.errors,
            opener=_private,
        )
        self._size = os.fstat(stream.fileno()).st_size
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write(self.format(record) + self.terminator, not getattr(record, BATCHED, False))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_lines(self, text: str) -> None:
        """Lines made elsewhere (a flush of access lines), in one write."""
        with self.lock:  # type: ignore[union-attr]
            try:
                self._write(text, True)
            except Exception:
                logging.getLogger("serval").exception("cannot write access lines")

    def _write(self, text: str, flush: bool) -> None:
        if self.stream is None:
            self.stream = self._open()
        if self.maxBytes > 0 and self._size + len(text) > self.maxBytes and self._size:
            self.doRollover()  # (it opens the next file: _size starts over)
        self.stream.write(text)
        self._size += len(text)
        if flush:
            self.stream.flush()


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


class _NotAccess(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != ACCESS_LOGGER


@dataclass(frozen=True)
class Options:
    """``LoggingConfig``'s fields as a process reads them: checked where they were given
    (``logging_config_dict``), so read here without pydantic, which every process would
    otherwise import at start (0.4 s of each one's start on this machine). Its defaults are
    LoggingConfig's (tests/test_logs.py holds them to it)."""

    encoding: str
    log_level: str = "INFO"
    logs_dir: str | None = None
    enable_access_log: bool = True
    additional_log_standard_attrs: tuple[str, ...] = ()

    @classmethod
    def of(cls, config: dict[str, Any]) -> Options:
        encoding = config.get("encoding") or os.environ.get("RAY_SERVE_LOG_ENCODING", "TEXT")
        return cls(
            encoding=str(encoding).upper(),
            log_level=str(config.get("log_level") or "INFO").upper(),
            logs_dir=config.get("logs_dir"),
            enable_access_log=bool(config.get("enable_access_log", True)),
            additional_log_standard_attrs=tuple(config.get("additional_log_standard_attrs") or ()),
        )


def quiet_access() -> None:
    """No access lines until a log file takes them (``configure``), and never on standard
    error: at a line a request, they would cost the proxy more than the request."""
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.CRITICAL + 1)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NotAccess) for f in handler.filters):
            handler.addFilter(_NotAccess())


def configure(
    identity: Identity,
    config: dict[str, Any] | None,
    directory: str,
    file_name: str,
    current_request: Callable[[], dict[str, Any] | None] | None = None,
) -> str | None:
    """Log this process to ``directory/file_name`` as ``config`` (LoggingConfig's fields)
    says, instead of any file configured before; the file's path (None: it cannot be
    written, said as a warning: standard error still has the log). ``current_request``:
    where a record finds the request it was logged in (see ``logs.RequestFields``)."""
    options = Options.of(config or {})
    directory = options.logs_dir or directory
    path = os.path.join(directory, file_name)
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        handler = _PrivateRotatingFile(path, maxBytes=_MAX_BYTES, backupCount=_BACKUPS)
    except OSError as exc:  # (a full disk, say): standard error still has the log
        logging.getLogger("serval").warning("cannot write the log file %s: %s", path, exc)
        return None
    form = formatter(identity, str(options.encoding), options.additional_log_standard_attrs)
    handler.setFormatter(form)
    handler.addFilter(RequestFields(identity, current_request))
    root = logging.getLogger()
    serve_logger = logging.getLogger("ray.serve")
    for old in _installed:
        root.removeHandler(old)
        serve_logger.removeHandler(old)
        old.close()
    _installed[:] = [handler]
    quiet_access()  # (standard error: as before, without the access lines)
    if not logging.getLogger("ray").propagate:
        # In a Ray worker, Ray's "ray" logger keeps its records from the root's handlers:
        # the user's lines on "ray.serve" (Ray Serve's documented logger) come here directly.
        serve_logger.addHandler(handler)
    root.addHandler(handler)
    # The access lines' own way to the file, when only the file takes them (the other
    # handlers refuse them) and no extra attributes need a LogRecord.
    if not options.additional_log_standard_attrs:
        access_log.set_sink(lambda entries: handler.write_lines(form.format_access(entries)))
    else:
        access_log.set_sink(None)
    level = logging.getLevelNamesMapping()[options.log_level]
    for name in ("", "serval", "ray.serve"):
        logging.getLogger(name).setLevel(level)
    access = logging.getLogger(ACCESS_LOGGER)
    # (INFO lines: none either when the level is above INFO)
    access.setLevel(max(level, logging.INFO) if options.enable_access_log else logging.CRITICAL + 1)
    access.propagate = True
    return path
