"""``serval logs`` on log files written here to the log files' contract: records parsed (text
with tracebacks, JSON), files merged in time order, every filter, ``--tail`` across a rotation,
how the directory is found, and ``--follow`` (a real subprocess) across a rotation and a new
file. (With a real cluster's files: test_logs_cli_e2e.py.)"""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import poll
from serval._cli_logs import Selection, parse_file_name, parse_records, show

SERVAL = [sys.executable, "-m", "serval"]
REPLICA = "replica_my_app_My_Model_ab12cd34ef56"  # app "my_app", deployment "My_Model"
OTHER = "replica_my_app_Other_99ffee00aa11"


def text(t: str, message: str, *, comp: str = "proxy", cid: str = "127.0.0.1",
         req: str | None = None, level: str = "INFO") -> str:  # fmt: skip
    """A text record's line as the writer writes it (``t``: the seconds, as ``SS,mmm``)."""
    request = f"{req} /predict my_app " if req else ""
    return f"{level} 2026-12-02 15:40:{t} {comp} {cid} {request}x.py:7 - {message}\n"


def js(t: str, message: str, *, req: str | None = None, **extra: object) -> str:
    record: dict[str, object] = {
        "levelname": "INFO",
        "asctime": f"2026-12-02 15:40:{t}",
        "message": message,
        "component_name": "replica",
        "component_id": "ab12cd34ef56",
        "filename": "x.py",
        "lineno": 7,
        "timestamp_ns": 1,
        **extra,
    }
    if req:
        record.update(request_id=req, route="/predict", application="my_app")
    return json.dumps(record) + "\n"


TRACEBACK = 'Traceback (most recent call last):\n  File "m.py", line 3\nValueError: boom\n'


def output(directory: Path, selection: Selection | None = None, **kw: object) -> list[str]:
    out = io.StringIO()
    assert show(str(directory), selection or Selection(), out=out, **kw) == 0  # type: ignore[arg-type]
    return out.getvalue().splitlines()


def serval(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVAL, *args], capture_output=True, text=True, timeout=30, env=env or _env()
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SERVAL_ADDRESS", "RAY_ADDRESS")}
    env.pop("NO_COLOR", None)
    return {**env, **extra}


# -- names and records ---------------------------------------------------------------------------


def test_file_names_say_which_process_wrote_them() -> None:
    name = parse_file_name(f"{REPLICA}.log")
    assert name is not None
    assert (name.component, name.replica_id, name.rotation) == ("replica", "ab12cd34ef56", 0)
    assert name.short == REPLICA
    assert name.is_of("my_app", "My_Model") and name.is_of(deployment="My_Model")
    assert name.is_of(app="my_app") and name.is_of(app="my") and not name.is_of(app="my_ap")
    assert not name.is_of("my_app", "Model") and not name.is_of(deployment="Model_")
    rotated = parse_file_name("proxy_10.0.0.7.log.3")
    assert rotated is not None and (rotated.short, rotated.component) == ("proxy_10.0.0.7", "proxy")
    assert rotated.rotation == 3
    for plain in ("controller", "proxy", "dashboard"):
        assert parse_file_name(f"{plain}.log") == parse_file_name(f"{plain}.log.0")
        parsed = parse_file_name(f"{plain}.log")
        assert parsed is not None and parsed.component == plain
    assert parse_file_name("replica_a.out") is None and parse_file_name("notes.txt") is None


def test_text_records_keep_their_tracebacks_and_request_fields() -> None:
    lines = (
        "  the end of a record cut off\n"
        + text("01,000", "started")
        + text(
            "02,000",
            "__CALL__ ERROR 3.0ms",
            comp="my_app_My_Model",
            cid="ab12",
            req="r1",
            level="ERROR",
        )
        + TRACEBACK
        + text("03,000", "GET /predict 200 1.0ms", req="r2")
    ).splitlines()
    orphan, started, failed, access = parse_records(lines, "f")
    assert orphan.lines == ["  the end of a record cut off"] and orphan.asctime == ""
    assert started.fields["message"] == "started" and started.request_id is None
    assert started.fields["component"] == "proxy" and started.fields["lineno"] == 7
    assert failed.request_id == "r1" and failed.fields["route"] == "/predict"
    assert failed.fields["application"] == "my_app" and failed.fields["levelname"] == "ERROR"
    assert failed.lines[1:] == TRACEBACK.splitlines()
    assert access.asctime == "2026-12-02 15:40:03,000" and access.request_id == "r2"


def test_extra_attributes_of_a_text_record_are_fields_too() -> None:
    line = "WARNING 2026-12-02 15:40:01,000 proxy h1 r1 /a app1 pid=7 name=x y.py:2 - m - n"
    no_request = "INFO 2026-12-02 15:40:01,000 controller 42 pid=7 y.py:2 - up"
    (with_request,) = parse_records([line])
    assert with_request.fields == {
        "levelname": "WARNING",
        "asctime": "2026-12-02 15:40:01,000",
        "component": "proxy",
        "component_id": "h1",
        "request_id": "r1",
        "route": "/a",
        "application": "app1",
        "pid": "7",
        "name": "x",
        "filename": "y.py",
        "lineno": 2,
        "message": "m - n",
    }
    (plain,) = parse_records([no_request])
    assert plain.request_id is None and plain.fields["pid"] == "7"


def test_json_records_show_as_text_unless_json_is_asked_for(tmp_path: Path) -> None:
    raw = js("01,500", "failed", req="r9", exc_text=TRACEBACK.strip(), deployment="My_Model")
    (tmp_path / f"{REPLICA}.log").write_text(raw)
    assert output(tmp_path) == [
        f"{REPLICA} | 2026-12-02 15:40:01,500 INFO replica r9 failed",
        *(f"{REPLICA} | {line}" for line in TRACEBACK.splitlines()),
    ]
    (line,) = output(tmp_path, as_json=True)
    assert json.loads(line) == json.loads(raw)  # the object as written


def test_json_output_of_text_records_is_their_parsed_fields(tmp_path: Path) -> None:
    (tmp_path / "proxy.log").write_text(text("01,000", "GET / 500 2ms", req="r1") + TRACEBACK)
    (line,) = output(tmp_path, as_json=True)
    assert json.loads(line) == {
        "log_file": "proxy",
        "levelname": "INFO",
        "asctime": "2026-12-02 15:40:01,000",
        "component": "proxy",
        "component_id": "127.0.0.1",
        "request_id": "r1",
        "route": "/predict",
        "application": "my_app",
        "filename": "x.py",
        "lineno": 7,
        "message": "GET / 500 2ms\n" + TRACEBACK.rstrip("\n"),
    }


# -- merging and filters -------------------------------------------------------------------------


@pytest.fixture
def cluster_logs(tmp_path: Path) -> Path:
    """A log directory of a proxy, a controller and two replicas, one request (r1) passing
    through the proxy and a replica, another (r2) failing in a replica."""
    (tmp_path / "proxy.log").write_text(
        text("01,000", "GET /predict 200 1ms", req="r1")
        + text("04,000", "GET /x 500 1ms", req="r2")
    )
    (tmp_path / "controller.log").write_text(
        text("00,500", "controller up", comp="controller", cid="42")
    )
    (tmp_path / f"{REPLICA}.log").write_text(
        text("00,900", "__CALL__ OK 0.5ms", comp="my_app_My_Model", cid="ab12cd34ef56", req="r1")
        + text("02,000", "model loaded", comp="my_app_My_Model", cid="ab12cd34ef56")
    )
    (tmp_path / f"{OTHER}.log").write_text(
        js("03,000", "__CALL__ ERROR 1ms", req="r2", exc_text="ValueError: no")
    )
    (tmp_path / "stderr.txt").write_text("not a log file\n")
    return tmp_path


def _messages(lines: list[str]) -> list[tuple[str, str]]:
    """(file, the record's last words) of each line shown."""
    out = []
    for line in lines:
        source, _, rest = line.partition(" | ")
        out.append((source.strip(), rest.split(" - ")[-1]))
    return out


def test_every_file_merged_in_time_order_each_line_after_its_files_name(
    cluster_logs: Path,
) -> None:
    lines = output(cluster_logs)
    width = len(REPLICA)
    assert all(line[width : width + 3] == " | " for line in lines), lines
    assert _messages(lines) == [
        ("controller", "controller up"),
        (REPLICA, "__CALL__ OK 0.5ms"),
        ("proxy", "GET /predict 200 1ms"),
        (REPLICA, "model loaded"),
        (OTHER, "2026-12-02 15:40:03,000 INFO replica r2 __CALL__ ERROR 1ms"),
        (OTHER, "ValueError: no"),
        ("proxy", "GET /x 500 1ms"),
    ]


def test_files_picked_by_deployment_app_replica_and_component(cluster_logs: Path) -> None:
    def files(**kw: str) -> set[str]:
        return {source for source, _ in _messages(output(cluster_logs, Selection(**kw)))}

    assert files(deployment="My_Model") == {REPLICA}
    assert files(deployment="odel") == set()  # a whole deployment name, not a part of one
    assert files(deployment="y_Model") == set()
    assert files(app="my_app") == {REPLICA, OTHER}
    assert files(app="my_app", deployment="Other") == {OTHER}
    assert files(replica="99ff") == {OTHER}
    assert files(component="replica") == {REPLICA, OTHER}
    assert files(component="controller") == {"controller"}


def test_a_request_id_keeps_that_requests_records_from_every_file(cluster_logs: Path) -> None:
    assert _messages(output(cluster_logs, Selection(request_id="r1"))) == [
        (REPLICA, "__CALL__ OK 0.5ms"),
        ("proxy", "GET /predict 200 1ms"),
    ]
    r2 = [json.loads(x) for x in output(cluster_logs, Selection(request_id="r2"), as_json=True)]
    assert [(r["message"], r.get("log_file")) for r in r2] == [
        ("__CALL__ ERROR 1ms", None),  # (a JSON record: as written)
        ("GET /x 500 1ms", "proxy"),
    ]


def test_tail_reads_the_last_records_of_each_file_across_a_rotation(tmp_path: Path) -> None:
    # Records big enough that the last ones lie beyond the first window read from the end.
    pad = "x" * 300
    old = "".join(text(f"01,{i:03}", f"old {i} {pad}") + TRACEBACK for i in range(400))
    (tmp_path / "proxy.log.1").write_text(old)
    (tmp_path / "proxy.log").write_text(text("02,000", "new 0") + TRACEBACK)
    lines = output(tmp_path, tail=3)
    assert [line.split(" - ")[-1].split(" x")[0] for line in lines[::4]] == [
        "old 398",
        "old 399",
        "new 0",
    ]
    assert len(lines) == 12  # each with its whole traceback
    assert len(output(tmp_path, tail=500)) == 401 * 4  # more than there are: all of them
    assert output(tmp_path, tail=0) == []


def test_tail_counts_the_records_a_filter_keeps(tmp_path: Path) -> None:
    wanted = text("00,000", "GET / 200 1ms", req="needle")
    noise = "".join(text(f"01,{i % 1000:03}", f"other {i}", req=f"r{i}") for i in range(3000))
    (tmp_path / "proxy.log").write_text(wanted + noise)
    (line,) = output(tmp_path, Selection(request_id="needle"), tail=5)
    assert line.endswith("GET / 200 1ms")


# -- the command: finding the directory ----------------------------------------------------------


def test_an_address_names_its_log_directory(tmp_path: Path) -> None:
    address, logs = tmp_path / "cluster", tmp_path / "session_x"
    address.mkdir()
    logs.mkdir()
    (address / "logs_dir").write_text(str(logs))
    (logs / "controller.log").write_text(text("00,000", "up", comp="controller", cid="1"))
    done = serval("logs", "--address", str(address))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"controller | {text('00,000', 'up', comp='controller', cid='1')}".rstrip()
    ]
    assert done.stderr == ""


def test_a_cluster_gone_falls_back_to_the_newest_session_and_says_so(tmp_path: Path) -> None:
    base = tmp_path / f"serval_{os.getuid()}" / "logs"
    session = base / "session_2026-12-02_15-40-00_000000_1"
    session.mkdir(parents=True)
    (base / "session_latest").symlink_to(session)
    (session / "proxy.log").write_text(text("00,000", "left behind"))
    done = serval("logs", "--address", str(tmp_path / "gone"), env=_env(TMPDIR=str(tmp_path)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("left behind")
    assert "is gone" in done.stderr and str(session) in done.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = serval("logs", "--address", str(tmp_path / "gone"), env=_env(TMPDIR=str(empty)))
    assert nothing.returncode == 1 and "no logs" in nothing.stderr
    assert "Traceback" not in nothing.stderr


def test_a_ray_address_reads_this_nodes_serve_logs_without_importing_ray(tmp_path: Path) -> None:
    serve_logs = tmp_path / "ray" / "session_latest" / "logs" / "serve"
    serve_logs.mkdir(parents=True)
    (serve_logs / "proxy_10.0.0.7.log").write_text(text("00,000", "on ray"))
    code = (
        "import sys; from serval.cli import main; code = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules; sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "logs", "--address", "auto"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(RAY_TMPDIR=str(tmp_path)),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("proxy_10.0.0.7 | ") and "on ray" in done.stdout
    assert "this node's logs only" in done.stderr


# -- the command: output -------------------------------------------------------------------------


def test_colours_only_on_a_terminal(cluster_logs: Path) -> None:
    plain = serval("logs", "--logs-dir", str(cluster_logs))
    assert plain.returncode == 0 and "\x1b[" not in plain.stdout
    main, other = pty.openpty()
    with subprocess.Popen(
        [*SERVAL, "logs", "--logs-dir", str(cluster_logs)], stdout=other, env=_env()
    ) as proc:
        os.close(other)
        seen = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:  # (the terminal's other side closed: the command ended)
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=30) == 0
    os.close(main)
    assert b"\x1b[" in seen and b"controller up" in seen


def test_a_reader_that_stops_reading_ends_it_quietly(tmp_path: Path) -> None:
    (tmp_path / "proxy.log").write_text("".join(text("00,000", f"line {i}") for i in range(50000)))
    with subprocess.Popen(
        [*SERVAL, "logs", "--logs-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert b"line 0" in proc.stdout.readline()
        proc.stdout.close()  # (as `| head -1` does)
        assert proc.wait(timeout=30) == 0
        assert proc.stderr.read() == b""


# -- following -----------------------------------------------------------------------------------


class Follower:
    """``serval logs -f`` as a subprocess, its output collected by a thread."""

    def __init__(self, *args: str, sigint_ignored: bool = False) -> None:
        # (a background job of a non-interactive shell starts with SIGINT ignored)
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        self.proc = subprocess.Popen(
            [*SERVAL, "logs", "-f", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            preexec_fn=ignore,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, words: str, what: str) -> None:
        poll(lambda: any(words in line for line in self.lines), 20, what)

    def count(self, words: str) -> int:
        return sum(words in line for line in self.lines)

    def interrupt(self, signum: int = signal.SIGINT) -> tuple[int, str]:
        """Ctrl-C (or ``signum``): its exit code and what it wrote on stderr."""
        self.proc.send_signal(signum)
        code = self.proc.wait(timeout=20)
        self._reader.join(timeout=10)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def follow() -> Iterator[list[Follower]]:
    started: list[Follower] = []
    yield started
    for follower in started:
        follower.kill()


def _append(path: Path, data: str) -> None:
    with path.open("a") as f:
        f.write(data)


def test_follow_prints_new_records_across_a_rotation_and_a_new_file(
    tmp_path: Path, follow: list[Follower]
) -> None:
    proxy = tmp_path / "proxy.log"
    proxy.write_text(text("00,000", "first one") + text("00,100", "last of the tail"))
    f = Follower("--logs-dir", str(tmp_path), "--tail", "1")
    follow.append(f)
    f.wait_for("last of the tail", "the tail")
    _append(proxy, text("01,000", "grown") + TRACEBACK)
    f.wait_for("ValueError: boom", "a record appended, with its traceback")

    # Rotated as the writer rotates: the last lines go to the old file just before its rename.
    _append(proxy, text("02,000", "just before the rotation"))
    proxy.rename(tmp_path / "proxy.log.1")
    proxy.write_text(text("03,000", "in the new file"))
    f.wait_for("in the new file", "the record in the file after the rotation")

    new = tmp_path / f"{REPLICA}.log"  # a replica that started meanwhile
    new.write_text(text("04,000", "replica up", comp="my_app_My_Model", cid="ab12cd34ef56"))
    f.wait_for("replica up", "the new replica's first record")
    _append(proxy, text("05,000", "after all that"))
    f.wait_for("after all that", "more in the new file")

    code, err = f.interrupt()
    assert (code, err) == (0, "")
    assert f.count("first one") == 0  # (not in the tail of 1)
    for words in ("last of the tail", "grown", "just before the rotation", "in the new file"):
        assert f.count(words) == 1, (words, f.lines)
    assert _messages(f.lines)[-2:] == [
        (REPLICA, "replica up"),
        ("proxy", "after all that"),
    ]
    assert f.lines[1:5] == [
        f"proxy | {line}" for line in (text("01,000", "grown") + TRACEBACK).splitlines()
    ]


def test_filters_apply_while_following(tmp_path: Path, follow: list[Follower]) -> None:
    (tmp_path / "proxy.log").write_text("")
    f = Follower("--logs-dir", str(tmp_path), "--request-id", "wanted")
    follow.append(f)
    replica = tmp_path / f"{REPLICA}.log"
    replica.write_text(
        text("01,000", "__CALL__ OK", comp="my_app_My_Model", cid="ab12", req="unwanted")
    )
    _append(tmp_path / "proxy.log", text("01,500", "GET / 200 1ms", req="unwanted"))
    _append(
        replica, text("02,000", "__CALL__ OK", comp="my_app_My_Model", cid="ab12", req="wanted")
    )
    _append(tmp_path / "proxy.log", text("02,500", "GET / 200 2ms", req="wanted"))
    f.wait_for("GET / 200 2ms", "the wanted request's access line")
    assert f.interrupt()[0] == 0
    assert _messages(f.lines) == [(REPLICA, "__CALL__ OK"), ("proxy", "GET / 200 2ms")]


def test_tail_is_the_end_of_the_whole_history_wherever_a_window_falls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read through windows of a few bytes (so that they cut lines, records and files at every
    place), the last N records are those of reading everything, for every N."""
    import random

    import serval._cli_logs as cli_logs

    rng = random.Random(7)
    for rotation in (2, 1, 0):
        records = [
            text(f"{rotation:02},{i:03}", f"r{rotation}.{i} " + "é" * rng.randrange(4))
            + (TRACEBACK if rng.random() < 0.3 else "")
            for i in range(rng.randrange(0, 6))
        ]
        suffix = f".{rotation}" if rotation else ""
        (tmp_path / f"proxy.log{suffix}").write_text("".join(records))
    everything = output(tmp_path)
    starts = [i for i, line in enumerate(everything) if "INFO 2026" in line]
    monkeypatch.setattr(cli_logs, "_TAIL_WINDOW", 5)
    for n in range(len(starts) + 2):
        expected = everything[starts[-n] :] if 0 < n <= len(starts) else []
        if n > len(starts):
            expected = everything
        assert output(tmp_path, tail=n) == expected, n


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_follow_ends_quietly_on_ctrl_c_or_sigterm_even_started_with_sigint_ignored(
    tmp_path: Path, follow: list[Follower], signum: int
) -> None:
    (tmp_path / "proxy.log").write_text(text("00,000", "one line"))
    f = Follower("--logs-dir", str(tmp_path), sigint_ignored=True)
    follow.append(f)
    f.wait_for("one line", "the history")
    code, err = f.interrupt(signum)
    assert code == 0 and err == ""
