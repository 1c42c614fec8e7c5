"""The dashboard over plain HTTP (httpx): the token (401), the cookie it sets, Bearer, Host and
Origin refusal (403, a foreign DELETE deletes nothing), Ray Serve's REST API (GET's shape, a
declarative PUT, a bad body, DELETE), its port (the default one busy, 0, an asked one busy), its
files, and its restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import serval as serve
from conftest import free_port, poll, replica_pids, serval_processes
from serval import api
from serval._private.caller import runtime

APPS = """
import os
import serval as serve

@serve.deployment
class Echo:
    def __init__(self, tag: str = "plain") -> None:
        self.tag = tag

    def __call__(self, request) -> str:
        return f"{self.tag}:{os.getpid()}"

echo = Echo.bind()
"""


class Dash:
    def __init__(self, port: int, token: str, http: int) -> None:
        self.port = port
        self.token = token
        self.base = f"http://127.0.0.1:{port}"
        self.http = f"http://127.0.0.1:{http}"

    def api(self, method: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        return httpx.request(
            method, f"{self.base}/api/serve/applications/", headers=headers, timeout=60, **kw
        )


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    """A cluster started from a directory holding the apps' module (a PUT's deploy finds it
    there, as ``serve.run`` from that directory would), its dashboard on a free port."""
    home = tmp_path_factory.mktemp("dash")
    (home / "dash_apps.py").write_text(APPS)
    before = os.getcwd()
    os.chdir(home)
    sys.path.insert(0, str(home))
    http, port = free_port(), free_port()
    try:
        serve.start(http_options={"port": http}, dashboard_options={"port": port})
        url = api.dashboard_url()
        assert url is not None and url.startswith(f"http://127.0.0.1:{port}/?token=")
        yield Dash(port, url.split("token=", 1)[1], http)
    finally:
        serve.shutdown()
        os.chdir(before)
        sys.path.remove(str(home))


@pytest.fixture
def clean(dash: Dash) -> Iterator[Dash]:
    yield dash
    for name in list(serve.status().applications):
        serve.delete(name)


def config(*apps: dict[str, Any]) -> dict[str, Any]:
    return {"applications": list(apps)}


def app_entry(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "route_prefix": f"/{name}", "import_path": "dash_apps:echo", **extra}


# -- the token -----------------------------------------------------------------------------------


def test_token_file_is_private_and_in_the_url(dash: Dash) -> None:
    address = runtime.address()
    assert address is not None
    path = Path(address) / "dashboard.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(address).stat().st_mode) == 0o700
    assert path.read_text().strip() == dash.token
    assert len(dash.token) >= 32


def test_without_or_with_a_wrong_token_401(dash: Dash) -> None:
    url = f"{dash.base}/api/serve/applications/"
    assert httpx.get(url).status_code == 401
    wrong = dash.token[:-1] + ("A" if dash.token[-1] != "A" else "B")
    for headers in (
        {"Authorization": f"Bearer {wrong}"},
        {"Authorization": f"Basic {dash.token}"},
        {"Cookie": f"serval_dashboard_token_{dash.port}={wrong}"},
        {"Cookie": f"serval_dashboard_token_1={dash.token}"},  # another port's cookie
    ):
        reply = httpx.get(url, headers=headers)
        assert reply.status_code == 401, headers
        assert "error" in reply.json()
    assert httpx.get(f"{url}?token={wrong}").status_code == 401
    assert httpx.delete(url).status_code == 401
    page = httpx.get(f"{dash.base}/", headers={"Accept": "text/html"})
    assert page.status_code == 401
    assert page.headers["content-type"].startswith("text/plain")
    assert "?token=" in page.text and "dashboard.token" in page.text
    assert "Traceback" not in page.text


def test_token_url_sets_a_strict_httponly_cookie_and_redirects(dash: Dash) -> None:
    with httpx.Client(base_url=dash.base) as client:
        reply = client.get(f"/?token={dash.token}")
        assert reply.status_code == 303
        assert reply.headers["location"] == "/"
        cookie = reply.headers["set-cookie"]
        assert cookie.startswith(f"serval_dashboard_token_{dash.port}={dash.token};")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        page = client.get("/")  # the cookie is all it sends now
        assert page.status_code == 200
        assert "<title>serval dashboard</title>" in page.text
        assert client.get("/static/dashboard.js").status_code == 200
        assert client.get("/api/serve/applications/").status_code == 200


def test_bearer_token(dash: Dash) -> None:
    reply = dash.api("GET")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/json"


# -- Host and Origin -----------------------------------------------------------------------------


def test_foreign_host_or_origin_is_refused(dash: Dash) -> None:
    for host in ("evil.example", f"evil.example:{dash.port}", "127.0.0.1:1", "localhost"):
        reply = dash.api("GET", headers={"Host": host})
        assert reply.status_code == 403, host
        assert "Host" in reply.json()["error"]
    for origin in ("http://evil.example", "null", f"https://127.0.0.1:{dash.port}"):
        reply = dash.api("GET", headers={"Origin": origin})
        assert reply.status_code == 403, origin
    # its own names pass
    for host in (f"127.0.0.1:{dash.port}", f"localhost:{dash.port}"):
        headers = {"Host": host, "Origin": f"http://{host}"}
        assert dash.api("GET", headers=headers).status_code == 200, host


def test_delete_from_a_foreign_origin_deletes_nothing(clean: Dash) -> None:
    import dash_apps

    serve.run(dash_apps.echo, name="kept", route_prefix="/kept")
    for headers in (
        {"Origin": "http://evil.example"},
        {"Host": "rebound.example"},  # DNS rebinding: the browser sends the page's name
    ):
        assert clean.api("DELETE", headers=headers).status_code == 403
        cookie = {"Cookie": f"serval_dashboard_token_{clean.port}={clean.token}"}
        with httpx.Client() as client:
            url = f"{clean.base}/api/serve/applications/"
            assert client.delete(url, headers={**headers, **cookie}).status_code == 403
    assert serve.status().applications["kept"].status == "RUNNING"
    assert httpx.get(f"{clean.http}/kept").status_code == 200


# -- the REST API --------------------------------------------------------------------------------


def test_get_has_ray_serve_shape(clean: Dash) -> None:
    import dash_apps

    serve.run(dash_apps.echo, name="shape", route_prefix="/shape")
    body = clean.api("GET").json()
    assert set(body) >= {
        "controller_info",
        "proxy_location",
        "http_options",
        "grpc_options",
        "proxies",
        "deploy_mode",
        "applications",
        "target_capacity",
    }
    assert body["deploy_mode"] == "MULTI_APP"
    assert body["proxy_location"] == "EveryNode"
    assert body["http_options"]["port"] == int(clean.http.rsplit(":", 1)[1])
    assert [p["status"] for p in body["proxies"].values()] == ["HEALTHY"]
    app = body["applications"]["shape"]
    assert app["status"] == "RUNNING" and app["route_prefix"] == "/shape"
    assert set(app) >= {"name", "last_deployed_time_s", "deployed_app_config", "deployments"}
    dep = app["deployments"]["Echo"]
    assert dep["status"] == "HEALTHY"
    assert dep["target_num_replicas"] == 1
    assert dep["deployment_config"]["max_ongoing_requests"] == 5
    (replica,) = dep["replicas"]
    assert set(replica) >= {
        "replica_id",
        "state",
        "pid",
        "node_id",
        "node_ip",
        "actor_name",
        "start_time_s",
    }
    assert replica["state"] == "RUNNING"
    assert {replica["replica_id"]: replica["pid"]} == replica_pids("shape", "Echo")
    served_by = httpx.get(f"{clean.http}/shape").text
    assert served_by == f"plain:{replica['pid']}"


def _pids(dash: Dash, app: str) -> set[int]:
    body = dash.api("GET").json()
    return {r["pid"] for r in body["applications"][app]["deployments"]["Echo"]["replicas"]}


@pytest.mark.timeout(120)
def test_put_is_declarative(clean: Dash) -> None:
    first = config(app_entry("one"), app_entry("two"), app_entry("three"))
    reply = clean.api("PUT", json=first)
    assert reply.status_code == 200, reply.text
    apps = clean.api("GET").json()["applications"]
    assert {n: a["status"] for n, a in apps.items()} == {
        "one": "RUNNING",
        "two": "RUNNING",
        "three": "RUNNING",
    }
    assert apps["one"]["deployed_app_config"]["import_path"] == "dash_apps:echo"
    one, two = _pids(clean, "one"), _pids(clean, "two")
    import dash_apps

    serve.run(dash_apps.echo, name="imperative", route_prefix="/imperative")  # (Ray's rule:
    # whatever deployed it, an app the config does not name is deleted)

    changed = app_entry("two", deployments=[{"name": "Echo", "max_ongoing_requests": 7}])
    reply = clean.api("PUT", json=config(app_entry("one"), changed))
    assert reply.status_code == 200, reply.text
    apps = clean.api("GET").json()["applications"]
    assert set(apps) == {"one", "two"}  # three and imperative: not in the config, deleted
    assert _pids(clean, "one") == one  # unchanged: untouched
    assert _pids(clean, "two").isdisjoint(two)  # changed: rolled
    config_two = apps["two"]["deployments"]["Echo"]["deployment_config"]
    assert config_two["max_ongoing_requests"] == 7
    assert httpx.get(f"{clean.http}/three").status_code == 404


def test_put_bad_body_400(clean: Dash) -> None:
    cases = [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps(config({"name": "x", "import_path": "dash_apps:echo", "nope": 1})), "nope"),
        (json.dumps(config({"name": "x", "route_prefix": "/x"})), "import_path"),
        (json.dumps(config(app_entry("x", import_path="no_such_module_here:app"))), "no_such"),
    ]
    for body, named in cases:
        reply = clean.api("PUT", content=body, headers={"Content-Type": "application/json"})
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert named in error, (body, error)
        assert "Traceback" not in error
    too_big = b'{"applications": [], "pad": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    assert clean.api("PUT", content=too_big).status_code == 413
    assert serve.status().applications == {}


def test_delete_deletes_every_app(clean: Dash) -> None:
    import dash_apps

    serve.run(dash_apps.echo, name="a", route_prefix="/a")
    serve.run(dash_apps.echo, name="b", route_prefix="/b")
    assert clean.api("DELETE").status_code == 200
    assert serve.status().applications == {}
    assert clean.api("GET").json()["applications"] == {}


def test_unknown_path_and_method(dash: Dash) -> None:
    headers = {"Authorization": f"Bearer {dash.token}"}
    assert httpx.get(f"{dash.base}/nope", headers=headers).status_code == 404
    reply = httpx.post(f"{dash.base}/api/serve/applications/", headers=headers)
    assert reply.status_code == 405


# -- the process ---------------------------------------------------------------------------------


def _dashboard_pids() -> list[int]:
    address = runtime.address()
    assert address is not None
    return [pid for pid, cmd in serval_processes(address) if "serval::dashboard" in cmd]


def test_a_killed_dashboard_is_restarted_on_its_port(dash: Dash) -> None:
    (pid,) = _dashboard_pids()
    os.kill(pid, signal.SIGKILL)
    poll(lambda: _dashboard_pids() and _dashboard_pids() != [pid], 15, "a new dashboard")
    reply = poll(lambda: _answers(dash), 15, "the restarted dashboard to answer")
    assert reply.status_code == 200


def _answers(dash: Dash) -> httpx.Response | None:
    try:
        return dash.api("GET")
    except httpx.TransportError:
        return None


# -- its port, in clusters of their own ----------------------------------------------------------

_START = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
import serval as serve
from serval import api
options = eval(sys.argv[1])
try:
    serve.start(http_options={"port": int(sys.argv[2])}, **options)
except Exception as exc:
    print("FAILED", type(exc).__name__, exc)
    sys.exit(3)
print("URL", api.dashboard_url())
serve.shutdown()
"""


def _start(options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_START), options, str(free_port())],
        capture_output=True,
        text=True,
        timeout=45,
    )


def test_default_port_busy_the_cluster_still_starts() -> None:
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8265))
        holder.listen()
    except OSError:  # taken already (another cluster, Ray's dashboard): busy all the same
        pass
    try:
        done = _start("{}")
    finally:
        holder.close()
    assert done.returncode == 0, done.stderr
    assert "URL None" in done.stdout
    assert "dashboard's default address 127.0.0.1:8265 is taken" in done.stderr


def test_an_asked_port_that_is_busy_fails_start() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = _start(f"{{'dashboard_options': {{'port': {port}}}}}")
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"FAILED ServalError the dashboard's address 127.0.0.1:{port} is taken" in done.stdout


def test_port_zero_no_dashboard() -> None:
    done = _start("{'dashboard_options': {'port': 0}}")
    assert done.returncode == 0, done.stderr
    assert "URL None" in done.stdout
    assert "dashboard" not in done.stderr


def test_bad_dashboard_options() -> None:
    for options, named in (
        ("{'dashboard_options': {'port': -1}}", "port"),
        ("{'dashboard_options': {'prot': 1}}", "prot"),
    ):
        done = _start(options)
        assert done.returncode == 3
        assert "ValueError" in done.stdout and named in done.stdout
