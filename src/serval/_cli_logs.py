"""``serval logs``: a cluster's log files, merged in time order, filtered, and followed.

The files are those of the log files' contract: one directory per cluster (named by the text
file ``logs_dir`` in its runtime directory), one file per process — ``controller.log``,
``proxy.log`` (``proxy_<ip>.log`` on Ray), ``dashboard.log``,
``replica_<app>_<deployment>_<replica id>.log`` — rotated to ``<name>.log.1``, ``.2`` ...
A record is one line (TEXT: ``<LEVEL> <asctime> <component> <id> [<request id> <route> <app>]
<file>:<line> - <message>``, its traceback on the lines that follow; JSON: one object a line).

The pure pieces (:func:`parse_file_name`, :func:`parse_records`, :class:`Selection`) are what
another reader (the dashboard) can reuse; :func:`show` is the command. It never imports Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from serval._private.telemetry import log_files
from serval.exceptions import ServalError

__all__ = [
    "COMPONENTS",
    "LogFileName",
    "Record",
    "Selection",
    "add_logs_arguments",
    "find_directory",
    "parse_file_name",
    "parse_records",
    "show",
]

COMPONENTS = ("controller", "proxy", "replica", "dashboard")
POLL_S = 0.2  # how often --follow looks at the files (polling: no inotify dependency)

_LEVELS = "DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL|NOTSET"
_ASCTIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
# A text record's first line starts with a level name and an asctime; every other line is a
# continuation (a traceback, a message's further lines).
_RECORD_START = re.compile(rf"^(?P<levelname>{_LEVELS}) (?P<asctime>{_ASCTIME}) ")
_TEXT_HEADER = re.compile(
    rf"^(?P<levelname>{_LEVELS}) (?P<asctime>{_ASCTIME}) (?P<component>\S+) "
    r"(?P<component_id>\S+) (?:(?P<request>.*?) )?(?P<filename>[^\s:]+):(?P<lineno>\d+) - "
    r"(?P<message>.*)$"
)
_ATTR = re.compile(r"^[A-Za-z_]\w*=")
_FILE_NAME = re.compile(r"^(?P<short>.+)\.log(?:\.(?P<rotation>\d+))?$")
_REPLICA = re.compile(r"^replica_(?P<middle>.+)_(?P<replica_id>[^_]+)$")
_READ_BYTES = 1 << 16
_TAIL_WINDOW = 1 << 16  # the first look at a file's end for --tail (grown x4 until enough)


# -- file names ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LogFileName:
    """What a log file's name says. ``short`` is the name without ``.log`` and a rotation's
    ``.N`` (the prefix shown before its lines); ``component`` one of :data:`COMPONENTS`, or
    ``""`` for a file of no known kind."""

    short: str
    component: str
    rotation: int = 0  # 0: the live file; N: ``<short>.log.N`` (older as N grows)
    # A replica's "<app>_<deployment>": app and deployment names may hold "_", so the split
    # is not knowable from the name; match it with :meth:`is_of`.
    app_deployment: str = ""
    replica_id: str = ""

    def is_of(self, app: str | None = None, deployment: str | None = None) -> bool:
        """Whether this is a replica file of ``app`` and/or ``deployment`` (None: any)."""
        if self.component != "replica":
            return False
        middle = self.app_deployment
        if app is not None and deployment is not None:
            return middle == f"{app}_{deployment}"
        if app is not None:
            return middle.startswith(f"{app}_")
        if deployment is not None:
            return middle.endswith(f"_{deployment}")
        return True


def parse_file_name(name: str) -> LogFileName | None:
    """The parts of a log file's name (a base name), or None if it is no log file."""
    m = _FILE_NAME.match(name)
    if m is None:
        return None
    short, rotation = m.group("short"), int(m.group("rotation") or 0)
    replica = _REPLICA.match(short)
    if replica is not None:
        return LogFileName(
            short, "replica", rotation, replica.group("middle"), replica.group("replica_id")
        )
    kind = short.split("_", 1)[0]  # proxy_<ip> on Ray, controller_<pid> in Ray Serve's own
    return LogFileName(short, kind if kind in COMPONENTS else "", rotation)


# -- records -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    """One log record: its lines as written and the fields parsed from them."""

    source: str  # the short name of its file
    lines: list[str]
    fields: dict[str, Any]  # a JSON record's object; a text record's parsed header
    is_json: bool = False

    @property
    def asctime(self) -> str:
        """The time it was logged (sorts as text); "" for lines before any record."""
        value = self.fields.get("asctime")
        return value if isinstance(value, str) else ""

    @property
    def request_id(self) -> str | None:
        value = self.fields.get("request_id")
        return value if isinstance(value, str) and value else None

    def text(self) -> list[str]:
        """The lines to show: a text record as written; a JSON one as ``asctime levelname
        component [request id] message`` and its traceback below."""
        if not self.is_json:
            return self.lines
        f = self.fields
        head = [f.get("asctime"), f.get("levelname"), f.get("component_name"), self.request_id]
        first = " ".join(str(p) for p in head if p)
        out = f"{first} {f.get('message', '')}".rstrip()
        exc = f.get("exc_text")
        extra = str(exc).splitlines() if exc else []
        return [*out.splitlines(), *extra, *self.lines[1:]]

    def json(self) -> str:
        """One JSON object: a JSON record's own line; a text record's parsed fields."""
        if self.is_json:
            return self.lines[0]
        fields = {"log_file": self.source, **self.fields}
        if len(self.lines) > 1:
            fields["message"] = "\n".join([str(fields.get("message", "")), *self.lines[1:]])
        return json.dumps(fields)


def parse_text_header(line: str) -> dict[str, Any] | None:
    """The fields of a text record's first line, or None if the line starts no record."""
    start = _RECORD_START.match(line)
    if start is None:
        return None
    m = _TEXT_HEADER.match(line)
    if m is None:  # a record of another layout: its level and time are still known
        return {"levelname": start["levelname"], "asctime": start["asctime"]}
    fields: dict[str, Any] = {
        k: m[k] for k in ("levelname", "asctime", "component", "component_id", "filename")
    }
    fields["lineno"] = int(m["lineno"])
    words = (m["request"] or "").split()
    # additional_log_standard_attrs come last, as name=value; the request's fields before them
    while words and _ATTR.match(words[-1]):
        name, _, value = words.pop().partition("=")
        fields.setdefault(name, value)
    for key, value in zip(("request_id", "route", "application"), words, strict=False):
        fields[key] = value
    fields["message"] = m["message"]
    return fields


def parse_json_line(line: str) -> dict[str, Any] | None:
    """The object of a JSON record's line, or None if the line is not one."""
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class _Grouper:
    """Lines in, records out: a record ends where the next one starts (or at :meth:`flush`)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._open: Record | None = None

    def feed(self, lines: Iterable[str]) -> Iterator[Record]:
        for line in lines:
            fields = parse_json_line(line)
            is_json = fields is not None
            if fields is None:
                fields = parse_text_header(line)
            if fields is None:  # a continuation line
                if self._open is None:  # (the file's first lines were cut off: kept alone)
                    self._open = Record(self.source, [], {})
                self._open.lines.append(line)
                continue
            if self._open is not None:
                yield self._open
            self._open = Record(self.source, [line], fields, is_json)

    def flush(self) -> Iterator[Record]:
        if self._open is not None:
            yield self._open
            self._open = None


def parse_records(lines: Iterable[str], source: str = "") -> Iterator[Record]:
    """The records of a file's lines (without their line ends), in the file's order."""
    grouper = _Grouper(source)
    yield from grouper.feed(lines)
    yield from grouper.flush()


# -- what to show --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Selection:
    """The filters of ``serval logs``: files by kind and name, records by request id."""

    component: str | None = None
    app: str | None = None
    deployment: str | None = None
    replica: str | None = None  # a replica id, or the start of one
    request_id: str | None = None

    def wants_file(self, name: LogFileName) -> bool:
        if self.component is not None and name.component != self.component:
            return False
        if self.app is None and self.deployment is None and self.replica is None:
            return True
        if not name.is_of(self.app, self.deployment):
            return False
        return self.replica is None or name.replica_id.startswith(self.replica)

    def wants_record(self, record: Record) -> bool:
        if self.request_id is None:
            return True
        if record.request_id is not None:
            return record.request_id == self.request_id
        if record.is_json or not record.lines:
            return False
        # A text record of a layout the header pattern does not know: the id as a word of it.
        head = record.lines[0].split(" - ", 1)[0]
        return "component" not in record.fields and self.request_id in head.split()


# -- the directory -------------------------------------------------------------------------------


def find_directory(
    *, logs_dir: str | None, address: str | None, ray: bool
) -> tuple[str, str | None]:
    """The log directory to read and a note for stderr about how it was found (or None).
    ``address``: a local cluster's runtime directory; ``ray``: the cluster is on Ray."""
    if logs_dir is not None:
        if not os.path.isdir(logs_dir):
            raise ServalError(f"no log directory at {logs_dir}")
        return os.path.abspath(logs_dir), None
    if ray:
        base = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
        path = os.path.join(base, "ray", "session_latest", "logs", "serve")
        if not os.path.isdir(path):
            raise ServalError(f"no Ray Serve log directory at {path} (name one with --logs-dir)")
        return path, f"reading this node's logs only ({path}); other nodes keep their own"
    assert address is not None
    named = log_files.logs_dir(address)
    if named is not None and os.path.isdir(named):
        return named, None
    latest = os.path.join(log_files.logs_root(), log_files.LATEST)
    why = "names no log directory" if os.path.isdir(address) else "is gone"
    if not os.path.isdir(latest):
        raise ServalError(f"no logs: the cluster at {address} {why}, and there is no {latest}")
    return os.path.realpath(latest), (
        f"the cluster at {address} {why}: reading the newest session's logs, "
        f"{os.path.realpath(latest)}"
    )


# -- reading -------------------------------------------------------------------------------------


def _files_of(directory: str, selection: Selection) -> dict[str, list[LogFileName]]:
    """The wanted log files of ``directory`` by short name, oldest rotation first."""
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    out: dict[str, list[LogFileName]] = {}
    for entry in names:
        name = parse_file_name(entry)
        if name is not None and selection.wants_file(name):
            out.setdefault(name.short, []).append(name)
    for chain in out.values():
        chain.sort(key=lambda n: -n.rotation)
    return out


def _path(directory: str, name: LogFileName) -> str:
    suffix = f".{name.rotation}" if name.rotation else ""
    return os.path.join(directory, f"{name.short}.log{suffix}")


def _open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


@dataclasses.dataclass
class _Span:
    """Bytes [0, end) of an open file: one piece of a file's history."""

    fd: int
    end: int


def _history(directory: str, chain: list[LogFileName]) -> tuple[list[_Span], int | None, int]:
    """A file's history as spans (rotations oldest first, then the live file), the live file's
    descriptor (None if there is none now) and where following it starts (after its last
    complete line). The live file is opened first: a rotation meanwhile shows as a rotated
    file with its inode, skipped, rather than as lines read twice."""
    live_name = next((n for n in chain if n.rotation == 0), None)
    live = _open(_path(directory, live_name)) if live_name is not None else None
    live_inode = os.fstat(live).st_ino if live is not None else None
    spans = []
    for name in chain:
        if name.rotation == 0:
            continue
        fd = _open(_path(directory, name))
        if fd is None:
            continue
        info = os.fstat(fd)
        if info.st_ino == live_inode:
            os.close(fd)
            continue
        spans.append(_Span(fd, info.st_size))
    start = 0
    if live is not None:
        start = _complete_end(live, os.fstat(live).st_size)
        spans.append(_Span(live, start))
    return spans, live, start


def _complete_end(fd: int, size: int) -> int:
    """The offset after the last newline before ``size`` (a line being written is left out)."""
    pos = size
    while pos > 0:
        begin = max(0, pos - _READ_BYTES)
        chunk = os.pread(fd, pos - begin, begin)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            return begin + cut + 1
        pos = begin
    return 0


def _span_lines(spans: list[_Span]) -> Iterator[str]:
    """The lines of the spans, in order (decoded; a bad byte shows as U+FFFD)."""
    for span in spans:
        pos, rest = 0, b""
        while pos < span.end:
            chunk = os.pread(span.fd, min(_READ_BYTES, span.end - pos), pos)
            if not chunk:
                break
            pos += len(chunk)
            *lines, rest = (rest + chunk).split(b"\n")
            yield from (_decode(line) for line in lines)
        if rest:
            yield _decode(rest)


def _decode(line: bytes) -> str:
    return line.decode("utf-8", errors="replace").rstrip("\r")


def _last_bytes(spans: list[_Span], count: int) -> tuple[bytes, bool]:
    """The last ``count`` bytes of the spans joined, and whether that is all of them."""
    pieces: list[bytes] = []
    left = count
    for span in reversed(spans):
        take = min(left, span.end)
        pieces.append(os.pread(span.fd, take, span.end - take))
        left -= take
        if left == 0:
            return b"".join(reversed(pieces)), span is spans[0] and take == span.end
    return b"".join(reversed(pieces)), True


def _tail(spans: list[_Span], source: str, selection: Selection, count: int) -> list[Record]:
    """The last ``count`` wanted records, read from the end of the file (a window grown
    until it holds enough of them or the whole history)."""
    if count <= 0:
        return []
    window = _TAIL_WINDOW
    while True:
        data, whole = _last_bytes(spans, window)
        lines = [_decode(line) for line in data.split(b"\n")]
        if lines and lines[-1] == "":
            lines.pop()
        if not whole:
            lines = lines[1:]  # (the first line may be cut)
        records = list(parse_records(lines, source))
        if not whole and records and not records[0].fields:
            records = records[1:]  # the end of a record that started before the window
        wanted = [r for r in records if selection.wants_record(r)]
        if whole or len(wanted) >= count:
            return wanted[-count:]
        window *= 4


def _all(spans: list[_Span], source: str, selection: Selection) -> Iterator[Record]:
    return (r for r in parse_records(_span_lines(spans), source) if selection.wants_record(r))


# -- following -----------------------------------------------------------------------------------


class _Follower:
    """The new records of one live file (``<short>.log``), across its rotations: once the
    path names another file, the old one (renamed, complete) is read to its end first."""

    def __init__(self, path: str, source: str, fd: int | None, offset: int) -> None:
        self.path = path
        self._fd = fd
        self._rest = b""
        self._grouper = _Grouper(source)
        if fd is not None:
            os.lseek(fd, offset, os.SEEK_SET)

    def poll(self) -> list[Record]:
        lines = self._read()
        if self._rotated():
            lines += self._read()  # what was written before the rename
            self._switch()
            lines += self._read()
        records = list(self._grouper.feed(lines))
        if not lines:  # a quiet file: its last record is whole
            records += self._grouper.flush()
        return records

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _rotated(self) -> bool:
        try:
            now = os.stat(self.path)
        except OSError:
            return False  # (between the rename and the new file: the old one still counts)
        if self._fd is None:
            return True
        mine = os.fstat(self._fd)
        if now.st_ino != mine.st_ino or now.st_dev != mine.st_dev:
            return True
        if mine.st_size < os.lseek(self._fd, 0, os.SEEK_CUR):  # truncated in place
            os.lseek(self._fd, 0, os.SEEK_SET)
            self._rest = b""
        return False

    def _switch(self) -> None:
        if self._rest:  # a last line without its newline: it is whole now
            self._rest += b"\n"
        self.close()
        self._fd = _open(self.path)

    def _read(self) -> list[str]:
        if self._fd is None:
            return []
        data = self._rest
        while chunk := os.read(self._fd, _READ_BYTES):
            data += chunk
        *lines, self._rest = data.split(b"\n")
        return [_decode(line) for line in lines]


# -- output --------------------------------------------------------------------------------------

_COLOURS = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")


class _Printer:
    """Writes records, each line after its file's short name (``docker compose logs``'
    layout; the names coloured on a terminal only)."""

    def __init__(self, out: TextIO, as_json: bool, colour: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.colour = colour
        self._width = 0
        self._colours: dict[str, str] = {}

    def know(self, sources: Iterable[str]) -> None:
        for source in sorted(sources):
            self._width = max(self._width, len(source))
            self._colours.setdefault(source, _COLOURS[len(self._colours) % len(_COLOURS)])

    def write(self, records: Iterable[Record]) -> None:
        for record in records:
            if self.as_json:
                self.out.write(record.json() + "\n")
                continue
            prefix = f"{record.source:<{self._width}} |"
            if self.colour:
                prefix = f"\x1b[{self._colours.get(record.source, '0')}m{prefix}\x1b[0m"
            for line in record.text():
                self.out.write(f"{prefix} {line}\n")
        self.out.flush()


def _colour(out: TextIO) -> bool:
    # (NO_COLOR: the convention every terminal tool honours, rich among them)
    return out.isatty() and not os.environ.get("NO_COLOR")


# -- the command ---------------------------------------------------------------------------------


def add_logs_arguments(p: argparse.ArgumentParser) -> None:
    """``serval logs``' own flags (``--address`` is the other commands')."""
    p.description = (
        "Every file's records merged in time order, each line after its file's name. "
        "--app/--deployment/--replica pick replica files; --request-id keeps one request's "
        "records from every file (the proxy's access line and the replicas' lines)."
    )
    p.add_argument("--app", help="only replica files of this application")
    p.add_argument("--deployment", help="only replica files of this deployment")
    p.add_argument("--replica", help="only this replica's file (its id, or the start of it)")
    p.add_argument("--request-id", help="only the records of this request, from every file")
    p.add_argument("--component", choices=COMPONENTS, help="only files of this kind")
    p.add_argument("-f", "--follow", action="store_true", help="then print new records too")
    p.add_argument("--tail", type=int, metavar="N", help="only the last N records of each file")
    p.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default="text",
        help="json: one object a record (a JSON record's own; a text record's fields)",
    )
    p.add_argument("--logs-dir", help="read this log directory instead of the cluster's")


def show(
    directory: str,
    selection: Selection,
    *,
    tail: int | None = None,
    follow: bool = False,
    as_json: bool = False,
    out: TextIO | None = None,
) -> int:
    """Print the records of ``directory``'s log files in time order (``tail``: the last N
    of each file); with ``follow``, then the new ones as they come, until Ctrl-C (exit 0)."""
    stream = out or sys.stdout
    printer = _Printer(stream, as_json, _colour(stream))
    followers: dict[str, _Follower] = {}
    if follow:
        _stop_on_signals()
    try:
        _show_history(directory, selection, tail, printer, followers if follow else None)
        if follow:
            _follow(directory, selection, printer, followers)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:  # (`serval logs | head`): the rest goes nowhere, as Python advises
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        return 0
    finally:
        for follower in followers.values():
            follower.close()
    return 0


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM end ``--follow`` quietly, even when the shell that started this
    command ignores SIGINT (a background job's children do, and Python keeps that)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _show_history(
    directory: str,
    selection: Selection,
    tail: int | None,
    printer: _Printer,
    followers: dict[str, _Follower] | None,
) -> None:
    files = _files_of(directory, selection)
    printer.know(files)
    streams: list[Iterable[Record]] = []
    spans_open: list[_Span] = []
    try:
        for short, chain in sorted(files.items()):
            spans, live, start = _history(directory, chain)
            spans_open += spans
            if tail is not None:
                streams.append(_tail(spans, short, selection, tail))
            else:
                streams.append(_all(spans, short, selection))
            if followers is not None:
                path = os.path.join(directory, f"{short}.log")
                fd = None if live is None else os.dup(live)  # (the span's own is closed below)
                followers[short] = _Follower(path, short, fd, start)
        printer.write(heapq.merge(*streams, key=lambda r: r.asctime))
    finally:
        for span in spans_open:
            os.close(span.fd)


def _follow(
    directory: str, selection: Selection, printer: _Printer, followers: dict[str, _Follower]
) -> None:
    while True:
        time.sleep(POLL_S)
        for short, chain in _files_of(directory, selection).items():
            if short not in followers and any(n.rotation == 0 for n in chain):
                # A file that appeared (a new replica's): from its first line.
                path = os.path.join(directory, f"{short}.log")
                followers[short] = _Follower(path, short, _open(path), 0)
                printer.know([short])
        batch = [r for f in followers.values() for r in f.poll() if selection.wants_record(r)]
        batch.sort(key=lambda r: r.asctime)  # (stable: each file's own order kept)
        printer.write(batch)
