"""The access log's recorder: one line per request answered, on logger ``serval.access``.

A request's end costs its caller one list append (and, for the first of a batch, a timer); the
lines are made off the request path, by a flush on the loop at most ``FLUSH_AFTER_S`` later
(and at ``close``). Each is a ``logging.LogRecord`` at INFO whose message is
``<METHOD> <path> <status> <latency>ms``, with ``request_id``, ``route`` and ``application``
set on it as ``extra=`` would, and its time the request's end, not the flush's. Whatever
handlers the process's logging setup gives ``serval.access`` write them (see
/work/notes/logs_contract.md for the lines); when that logger does not take INFO, no record is
made at all. The system routes (health, routes, metrics) are not logged: scrapers and load
balancers would fill the log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

ACCESS_LOGGER = "serval.access"
# Set on each line of a flush but its last: a handler may leave flushing its stream to the
# last (see log_setup).
BATCHED = "serval_batched"
SYSTEM_ROUTES = frozenset({"/-/healthz", "/-/routes", "/-/metrics"})
# How long a line may wait for its flush: soon enough for a person tailing the log, late
# enough that a busy proxy flushes hundreds of lines at once.
FLUSH_AFTER_S = 0.15

# (end time, method, path, status, latency s, request id, route, application)
Entry = tuple[float, str, str, int | str, float, str, str, str]
# Where a process's log setup writes a flush's lines itself, when it alone takes them (see
# log_setup): a line costs a few µs there, against tens through a LogRecord and handlers.
_sink: list[Callable[[list[Entry]], None] | None] = [None]


def set_sink(sink: Callable[[list[Entry]], None] | None) -> None:
    _sink[0] = sink


class AccessLog:
    """Records requests' ends on one event loop's thread and logs them in batches."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        enabled: bool | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.loop = loop
        self.logger = logger or logging.getLogger(ACCESS_LOGGER)
        # LoggingConfig.enable_access_log, as the process's log setup made the logger (None)
        self.enabled = self.logger.isEnabledFor(logging.INFO) if enabled is None else enabled
        self._pending: list[Entry] = []
        self._timer: asyncio.TimerHandle | None = None

    def record(
        self,
        method: str,
        path: str,
        status: int | str,
        latency_s: float,
        request_id: str,
        route: str,
        application: str,
        end: float | None = None,
    ) -> None:
        """A request answered: its line is logged by the next flush. ``end``: when it ended
        (``time.time()``; now when not given)."""
        if not self.enabled or path in SYSTEM_ROUTES:
            return
        if end is None:
            end = time.time()
        self._pending.append((end, method, path, status, latency_s, request_id, route, application))
        if self._timer is None:
            self._timer = self.loop.call_later(FLUSH_AFTER_S, self.flush)

    def flush(self) -> None:
        """Log the lines recorded since the last flush."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        logger = self.logger
        if not pending or not logger.isEnabledFor(logging.INFO):
            return
        sink = _sink[0]
        if sink is not None and not logger.handlers:
            sink(pending)
            return
        # One LogRecord made as logging makes it, then copies of its attributes with each
        # line's own: a LogRecord's __init__ (its pid, thread, process name...) is most of
        # the cost of a line, and those are the same for every line of a flush.
        model = logging.LogRecord(logger.name, logging.INFO, _HERE, _LINE, "", None, None, "record")
        offset = model.relativeCreated - model.created * 1000.0
        handle = logger.handle
        last = len(pending) - 1
        for i, (end, method, path, status, latency_s, request_id, route, application) in enumerate(
            pending
        ):
            record = _bare_record()
            attributes = record.__dict__
            attributes.update(model.__dict__)
            attributes["msg"] = f"{method} {path} {status} {latency_s * 1000.0:.1f}ms"
            # stamped with the request's end, as logging stamps a record it makes
            attributes["created"] = end
            attributes["msecs"] = int((end - int(end)) * 1000) + 0.0
            attributes["relativeCreated"] = end * 1000.0 + offset
            attributes["request_id"] = request_id
            attributes["route"] = route
            attributes["application"] = application
            attributes[BATCHED] = i != last
            handle(record)

    def close(self) -> None:
        """The last flush (the process stops)."""
        self.flush()


_HERE = __file__
_LINE = AccessLog.record.__code__.co_firstlineno
WHERE = f"{os.path.basename(_HERE)}:{_LINE}"  # an access line's file:line


def _bare_record() -> logging.LogRecord:
    """A LogRecord without its __init__ run (flush sets every attribute it has)."""
    return logging.LogRecord.__new__(logging.LogRecord)
