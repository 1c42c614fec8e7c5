"""Log files: every process of a cluster writes its own, in the cluster's private log
directory; a request's lines carry its id, route and application; ``LoggingConfig`` (Ray
Serve's) sets the encoding, level, directory and extra attributes, per deployment, per
application, for the system processes, and in config files."""

from __future__ import annotations

import json
import logging
import os
import stat
import uuid
from pathlib import Path

import httpx
import pytest

import serval as serve
from conftest import free_port, poll
from serval._private.caller import runtime
from serval._private.telemetry import log_files
from serval.deployment import build
from serval.schema import LoggingConfig, build_application, parse_config


def _logs_dir() -> Path:
    address = runtime.address()
    assert address is not None
    directory = log_files.logs_dir(address)
    assert directory is not None, "the runtime directory names no log directory"
    return Path(directory)


def _replica_file(app: str, deployment: str, directory: Path | None = None) -> Path:
    directory = directory or _logs_dir()

    def found() -> Path | None:
        files = sorted(directory.glob(f"replica_{app}_{deployment}_*.log"))
        return files[0] if files else None

    return poll(found, 10, f"the log file of a replica of {app}.{deployment}")


def _wait_for_line(path: Path, text: str) -> str:
    def line() -> str | None:
        for record in path.read_text().splitlines():
            if text in record:
                return record
        return None

    return poll(line, 10, f"a line with {text!r} in {path.name}")


def _get(url: str, request_id: str | None = None) -> httpx.Response:
    headers = {"x-request-id": request_id} if request_id else {}
    return httpx.get(url, headers=headers, timeout=10)


# -- LoggingConfig ----------------------------------------------------------------------------


def test_logging_config_checks_its_fields_as_ray_serve_does() -> None:
    assert LoggingConfig().model_dump() == {
        "encoding": "TEXT",
        "log_level": "INFO",
        "logs_dir": None,
        "enable_access_log": True,
        "additional_log_standard_attrs": [],
    }
    assert LoggingConfig(log_level=logging.DEBUG).log_level == "DEBUG"
    assert LoggingConfig(log_level="warning").log_level == "WARNING"
    with pytest.raises(ValueError, match="encoding must be 'TEXT' or 'JSON'"):
        LoggingConfig(encoding="XML")
    with pytest.raises(ValueError, match="log_level"):
        LoggingConfig(log_level="LOUD")
    with pytest.raises(ValueError, match="unknown LogRecord attribute"):
        LoggingConfig(additional_log_standard_attrs=["no_such_attr"])
    with pytest.raises(ValueError, match="extra"):
        LoggingConfig(colour=True)  # type: ignore[call-arg]


def test_a_bad_logging_config_fails_the_decorator_with_the_field() -> None:
    with pytest.raises(ValueError, match=r"invalid logging_config: encoding: "):

        @serve.deployment(logging_config={"encoding": "XML"})
        def f() -> None: ...

    with pytest.raises(TypeError, match="LoggingConfig or a dict"):
        serve.deployment(logging_config="JSON")(lambda: None)


def test_config_files_take_logging_config_at_every_level() -> None:
    config = parse_config(
        {
            "logging_config": {"encoding": "JSON"},
            "applications": [
                {
                    "name": "a",
                    "import_path": "logs_apps:app",
                    "logging_config": {"log_level": "DEBUG"},
                    "deployments": [
                        {"name": "Child", "logging_config": {"enable_access_log": False}}
                    ],
                }
            ],
        }
    )
    assert config.logging_config is not None and config.logging_config.encoding == "JSON"
    assert config.applications[0].deployments[0].overrides() == {
        "logging_config": {"enable_access_log": False}
    }
    with pytest.raises(serve.schema.ConfigError, match=r"applications\[0\]\.logging_config"):
        parse_config(
            {"applications": [{"import_path": "x:y", "logging_config": {"encoding": "XML"}}]}
        )


def test_a_config_files_logging_configs_reach_the_deployments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "logs_apps.py").write_text(APPS)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = parse_config(
        {
            "applications": [
                {
                    "import_path": "logs_apps:app",
                    "logging_config": {"log_level": "DEBUG"},
                    "deployments": [{"name": "Child", "logging_config": {"encoding": "JSON"}}],
                }
            ]
        }
    )
    app = build_application(config.applications[0], 0, "<test>")
    source = serve.schema.source_config(config.applications[0])
    spec = build(app, "default", "/", source)
    by_name = {d.name: d.config.logging_config for d in spec.deployments}
    assert by_name["Parent"] is not None and by_name["Parent"]["log_level"] == "DEBUG"
    assert by_name["Child"] is not None and by_name["Child"]["encoding"] == "JSON"
    assert by_name["Child"]["log_level"] == "INFO"  # its own config, not merged with the app's


APPS = """
import logging
import serval as serve

@serve.deployment
class Child:
    def __call__(self, x):
        return x

@serve.deployment
class Parent:
    def __init__(self, child):
        self.child = child
    async def __call__(self, request):
        return await self.child.remote(1)

app = Parent.bind(Child.bind())
"""


# -- the files ------------------------------------------------------------------------------


@serve.deployment
class Talker:
    def __init__(self) -> None:
        logging.getLogger("ray.serve").info("constructed")

    async def __call__(self, request: object) -> str:
        logging.getLogger("ray.serve").info("via ray.serve")
        logging.getLogger("serval").warning("via serval")
        logging.getLogger("ray.serve").debug("a debug line")
        return "ok"


@serve.deployment
class Failing:
    def __call__(self, request: object) -> str:
        raise KeyError("no such thing")


def test_each_process_writes_a_private_file_of_its_own(serve_instance: object) -> None:
    serve.run(Talker.bind(), name="talk", route_prefix="/talk")
    directory = _logs_dir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(directory.parent.parent.stat().st_mode) == 0o700
    latest = directory.parent / "session_latest"
    assert latest.resolve() == directory.resolve()
    replica = _replica_file("talk", "Talker")
    names = {p.name for p in directory.iterdir()}
    assert {"controller.log", "proxy.log", replica.name} <= names
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    # the replica's file has its own start-up lines, and only its own process's
    _wait_for_line(replica, "constructed")
    proxy = _wait_for_line(directory / "proxy.log", "HTTP proxy listening")
    assert proxy.startswith("INFO ") and " proxy 127.0.0.1 " in proxy
    assert "constructed" not in (directory / "proxy.log").read_text()


def test_a_requests_lines_carry_its_id_route_and_application(
    serve_instance: object, http_url: str
) -> None:
    serve.run(Talker.bind(), name="talk", route_prefix="/talk")
    request_id = uuid.uuid4().hex
    assert _get(f"{http_url}/talk", request_id).text == "ok"
    replica = _replica_file("talk", "Talker")
    replica_id = replica.name.removesuffix(".log").rsplit("_", 1)[1]
    line = _wait_for_line(replica, "via ray.serve")
    assert line.startswith("INFO ")
    assert f" talk_Talker {replica_id} {request_id} /talk talk " in line
    warning = _wait_for_line(replica, "via serval")
    assert warning.startswith("WARNING ") and request_id in warning
    # a line logged outside any request has no request fields
    constructed = _wait_for_line(replica, "constructed")
    assert request_id not in constructed and " - constructed" in constructed
    assert "a debug line" not in replica.read_text()  # INFO by default


def test_a_user_exception_is_logged_with_its_traceback_and_request(
    serve_instance: object, http_url: str
) -> None:
    serve.run(Failing.bind(), name="fail", route_prefix="/fail")
    request_id = uuid.uuid4().hex
    response = _get(f"{http_url}/fail", request_id)
    assert response.status_code == 500 and "Traceback" not in response.text
    # the proxy logs it, the replica's traceback included, with the request's id
    proxy = _logs_dir() / "proxy.log"
    line = _wait_for_line(proxy, f"request {request_id} to fail failed")
    assert line.startswith("ERROR ")
    text = proxy.read_text()
    assert "Remote traceback (most recent call last, in the replica)" in text
    assert 'raise KeyError("no such thing")' in text or "KeyError: 'no such thing'" in text


def test_calls_made_while_serving_a_request_carry_its_id(
    serve_instance: object, http_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @serve.deployment
    class Inner:
        def __call__(self, x: int) -> int:
            logging.getLogger("ray.serve").info("inner got %s", x)
            return x

    @serve.deployment
    class Outer:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        async def __call__(self, request: object) -> int:
            return await self.inner.remote(7)  # type: ignore[attr-defined, no-any-return]

    serve.run(Outer.bind(Inner.bind()), name="nest", route_prefix="/nest")
    request_id = uuid.uuid4().hex
    assert _get(f"{http_url}/nest", request_id).text == "7"
    line = _wait_for_line(_replica_file("nest", "Inner"), "inner got 7")
    assert f"{request_id} /nest nest" in line


def test_json_encoding_level_and_extra_attributes_per_deployment(
    serve_instance: object, http_url: str
) -> None:
    config = LoggingConfig(
        encoding="JSON", log_level="DEBUG", additional_log_standard_attrs=["name", "funcName"]
    )
    serve.run(Talker.options(logging_config=config).bind(), name="js", route_prefix="/js")
    request_id = uuid.uuid4().hex
    _get(f"{http_url}/js", request_id)
    replica = _replica_file("js", "Talker")
    line = _wait_for_line(replica, "a debug line")
    record = json.loads(line)
    assert record["levelname"] == "DEBUG" and record["message"] == "a debug line"
    assert record["request_id"] == request_id and record["route"] == "/js"
    assert record["application"] == "js" and record["deployment"] == "Talker"
    assert record["component_name"] == "replica" and record["replica"] in replica.name
    assert record["name"] == "ray.serve" and record["funcName"] == "__call__"
    assert isinstance(record["timestamp_ns"], int)


def test_an_apps_logging_config_is_its_deployments_unless_they_set_one(
    serve_instance: object, http_url: str
) -> None:
    own = Talker.options(name="Own", logging_config={"encoding": "TEXT"})

    @serve.deployment
    class Front:
        def __init__(self, own: object) -> None:
            self.own = own

        async def __call__(self, request: object) -> str:
            logging.getLogger("ray.serve").info("front line")
            return await self.own.remote(None)  # type: ignore[attr-defined, no-any-return]

    serve.run(
        Front.bind(own.bind()),
        name="mixed",
        route_prefix="/mixed",
        logging_config={"encoding": "JSON"},
    )
    _get(f"{http_url}/mixed")
    front = _wait_for_line(_replica_file("mixed", "Front"), "front line")
    assert json.loads(front)["message"] == "front line"
    mine = _wait_for_line(_replica_file("mixed", "Own"), "via ray.serve")
    assert mine.startswith("INFO ")


def test_a_deployments_logs_dir(serve_instance: object, http_url: str, tmp_path: Path) -> None:
    target = tmp_path / "mine"
    serve.run(
        Talker.options(logging_config={"logs_dir": str(target)}).bind(),
        name="dir",
        route_prefix="/dir",
    )
    _get(f"{http_url}/dir")
    _wait_for_line(_replica_file("dir", "Talker", target), "via ray.serve")
    assert not list(_logs_dir().glob("replica_dir_*"))


def test_the_system_processes_log_as_serve_start_says() -> None:
    port = free_port()
    serve.start(http_options={"port": port}, logging_config={"encoding": "JSON"})
    try:
        line = _wait_for_line(_logs_dir() / "proxy.log", "HTTP proxy listening")
        record = json.loads(line)
        assert record["component_name"] == "proxy" and record["component_id"] == "127.0.0.1"
        serve.run(Talker.bind(), name="talk", route_prefix="/talk")
        # the deployments keep their own (the default): TEXT
        assert _wait_for_line(_replica_file("talk", "Talker"), "constructed").startswith("INFO ")
    finally:
        serve.shutdown()


def test_files_rotate_and_stay_private(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ROTATION_MAX_BYTES", "2000")
    monkeypatch.setenv("RAY_ROTATION_BACKUP_COUNT", "2")

    @serve.deployment
    class Chatty:
        def __call__(self, n: int) -> int:
            for i in range(n):
                logging.getLogger("ray.serve").info("line %d %s", i, "x" * 80)
            return n

    serve.start(http_options={"port": free_port()})
    try:
        handle = serve.run(Chatty.bind(), name="chat", route_prefix=None)
        assert handle.remote(200).result(timeout_s=30) == 200
        replica = _replica_file("chat", "Chatty")
        rotated = [replica.with_name(f"{replica.name}.{i}") for i in (1, 2)]
        poll(lambda: all(p.exists() for p in rotated), 10, "two rotated files")
        assert not replica.with_name(f"{replica.name}.3").exists()  # backup count kept
        for path in (replica, *rotated):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert path.stat().st_size <= 2000 + 300
        assert "line 199 " in replica.read_text()
    finally:
        serve.shutdown()


def test_the_log_directory_is_named_in_the_runtime_directory(serve_instance: object) -> None:
    address = runtime.address()
    assert address is not None
    named = Path(address, log_files.LOGS_DIR_FILE)
    assert stat.S_IMODE(named.stat().st_mode) == 0o600
    assert Path(named.read_text()).is_dir()
    assert os.path.commonpath([named.read_text(), log_files.logs_root()]) == log_files.logs_root()


# -- access lines ---------------------------------------------------------------------------


def test_the_proxy_and_the_replica_write_an_access_line_per_request(
    serve_instance: object, http_url: str
) -> None:
    serve.run(Talker.bind(), name="acc", route_prefix="/acc")
    request_id = uuid.uuid4().hex
    _get(f"{http_url}/acc/x", request_id)
    proxy = _wait_for_line(_logs_dir() / "proxy.log", request_id)
    assert proxy.startswith("INFO ") and f"{request_id} /acc acc " in proxy
    assert proxy.split(" - ", 1)[1].startswith("GET /acc/x 200 ") and proxy.endswith("ms")
    replica = _wait_for_line(_replica_file("acc", "Talker"), "HTTP __call__ OK")
    assert f" {request_id} /acc acc " in replica
    handle = serve.get_app_handle("acc")
    assert handle.remote(None).result(timeout_s=10) == "ok"
    _wait_for_line(_replica_file("acc", "Talker"), "CALL __call__ OK")
    # the system routes are not logged (scrapers would fill the log)
    _get(f"{http_url}/-/healthz")
    _get(f"{http_url}/acc/y")
    _wait_for_line(_logs_dir() / "proxy.log", "GET /acc/y 200")
    assert "/-/healthz" not in (_logs_dir() / "proxy.log").read_text()


def test_a_failed_call_is_an_error_in_the_replicas_access_line(
    serve_instance: object, http_url: str
) -> None:
    serve.run(Failing.bind(), name="fail", route_prefix="/fail")
    request_id = uuid.uuid4().hex
    assert _get(f"{http_url}/fail", request_id).status_code == 500
    line = _wait_for_line(_replica_file("fail", "Failing"), "HTTP __call__ ERROR")
    assert request_id in line
    _wait_for_line(_logs_dir() / "proxy.log", "GET /fail 500")


def test_enable_access_log_false_keeps_the_other_lines(
    serve_instance: object, http_url: str
) -> None:
    quiet = Talker.options(logging_config={"enable_access_log": False})
    serve.run(quiet.bind(), name="quiet", route_prefix="/quiet")
    serve.run(Talker.bind(), name="loud", route_prefix="/loud")
    _get(f"{http_url}/quiet")
    _get(f"{http_url}/loud")
    loud = _replica_file("loud", "Talker")
    _wait_for_line(loud, "HTTP __call__ OK")
    quiet_file = _replica_file("quiet", "Talker")
    _wait_for_line(quiet_file, "via ray.serve")  # its own lines are there
    assert "__call__ OK" not in quiet_file.read_text()


def test_no_access_lines_at_the_proxy_when_serve_start_says_so() -> None:
    port = free_port()
    serve.start(
        http_options={"port": port},
        dashboard_options={"port": 0},
        logging_config={"enable_access_log": False},
    )
    try:
        serve.run(Talker.bind(), name="talk", route_prefix="/talk")
        request_id = uuid.uuid4().hex
        _get(f"http://127.0.0.1:{port}/talk", request_id)
        _wait_for_line(_replica_file("talk", "Talker"), "HTTP __call__ OK")  # the replica's own
        assert request_id not in (_logs_dir() / "proxy.log").read_text()
    finally:
        serve.shutdown()


SCRIPT = """
import sys, httpx
import serval as serve

@serve.deployment
def hello(request):
    return "hi"

serve.start(http_options={"port": int(sys.argv[1])}, dashboard_options={"port": 0})
serve.run(hello.bind())
for i in range(20):
    assert httpx.get(f"http://127.0.0.1:{sys.argv[1]}/").text == "hi"
from serval._private.caller import runtime
from serval._private.telemetry import log_files
print(log_files.logs_dir(runtime.address()))
serve.shutdown()
"""


def test_access_lines_stay_off_the_drivers_terminal(tmp_path: Path) -> None:
    """At a line a request they would flood it (and cost the proxy more than the request):
    they are in the files only."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "GET / 200" not in done.stderr and "__call__ OK" not in done.stderr
    directory = Path(done.stdout.strip())
    assert (directory / "proxy.log").read_text().count("GET / 200") == 20


def test_access_lines_written_directly_read_as_their_log_records_would() -> None:
    """A flush's lines go to the file without LogRecords when only the file takes them: the
    same text (and JSON) as the records the recorder would otherwise make."""
    from serval._private.telemetry.access_log import WHERE
    from serval._private.telemetry.logs import Identity, formatter

    end = 1_796_226_234.339_5
    entry = (end, "GET", "/x", 200, 0.00123, "rid1", "/x", "app")
    identity = Identity("proxy", "127.0.0.1")
    filename, lineno = WHERE.split(":")
    record = logging.LogRecord("serval.access", logging.INFO, filename, int(lineno), "", (), None)
    record.msg, record.created = "GET /x 200 1.2ms", end
    record.msecs = int((end - int(end)) * 1000) + 0.0
    record.request_id, record.route, record.application = "rid1", "/x", "app"
    record.filename = filename
    text = formatter(identity, "TEXT")
    assert text.format_access([entry]) == text.format(record) + "\n"
    as_json = formatter(identity, "JSON")
    direct = json.loads(as_json.format_access([entry]))
    assert direct == json.loads(as_json.format(record))


def test_processes_read_a_logging_config_with_its_defaults_and_without_pydantic() -> None:
    """A process reads the fields (checked where they were given) with LoggingConfig's own
    defaults; importing pydantic would cost each process's start 0.4 s here."""
    import subprocess
    import sys

    from serval._private.telemetry.log_setup import Options

    defaults = LoggingConfig()
    read = Options.of({})
    assert (read.encoding, read.log_level, read.logs_dir, read.enable_access_log) == (
        defaults.encoding,
        defaults.log_level,
        defaults.logs_dir,
        defaults.enable_access_log,
    )
    assert list(read.additional_log_standard_attrs) == defaults.additional_log_standard_attrs
    assert Options.of(LoggingConfig(log_level="DEBUG").model_dump()).log_level == "DEBUG"
    check = "import sys, serval._private.process.worker; print('pydantic' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr
