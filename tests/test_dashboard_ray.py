"""The dashboard of a serval cluster on Ray: a detached actor on the head node, its token in
Ray's key-value store; the REST API shows replicas on their Ray nodes, by actor name; the
token, Host, a declarative PUT and DELETE as on the local backend; it goes with
``serve.shutdown``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import serval as serve
from conftest import free_port, poll
from ray_clusters import CALL_TIMEOUT_S, one_node, serval_actors
from serval import api
from serval._private.backends import ray_store

ray = pytest.importorskip("ray")


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0})
class Echo:
    def __call__(self, request: Any) -> str:
        return "echo"


APPS = """
import serval as serve

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Put:
    def __call__(self, request) -> str:
        return "put"

app = Put.bind()
"""


@pytest.fixture(scope="module")
def on_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Ray started from a directory holding a module of apps (where its workers, the
    dashboard's PUT among them, find code, as a Ray Serve driver's do)."""
    home = tmp_path_factory.mktemp("ray_dash")
    (home / "ray_dash_apps.py").write_text(APPS)
    before = os.getcwd()
    os.chdir(home)
    try:
        with one_node():
            http, port = free_port(), free_port()
            serve.start(http_options={"port": http}, dashboard_options={"port": port})
            url = api.dashboard_url()
            assert url is not None and url.startswith(f"http://127.0.0.1:{port}/?token=")
            yield url, f"http://127.0.0.1:{http}"
    finally:
        os.chdir(before)


@pytest.mark.timeout(180)
def test_the_dashboard_on_ray(on_ray: tuple[str, str]) -> None:
    url, http = on_ray
    base, token = url.split("/?token=")
    assert token == ray_store.dashboard_token(ray_store.DEFAULT_NAMESPACE)
    assert ray_store.DASHBOARD_ACTOR in serval_actors()
    headers = {"Authorization": f"Bearer {token}"}
    apps = f"{base}/api/serve/applications/"
    assert httpx.get(apps, timeout=CALL_TIMEOUT_S).status_code == 401
    assert httpx.get(apps, headers={**headers, "Host": "evil.example"}).status_code == 403

    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    assert httpx.get(f"{http}/echo", timeout=CALL_TIMEOUT_S).text == "echo"
    body = httpx.get(apps, headers=headers, timeout=CALL_TIMEOUT_S).json()
    node = ray.get_runtime_context().get_node_id()
    assert list(body["proxies"]) == [node]
    replicas = body["applications"]["echo"]["deployments"]["Echo"]["replicas"]
    assert len(replicas) == 2
    for replica in replicas:
        assert replica["state"] == "RUNNING" and replica["node_id"] == node
        assert replica["actor_name"] == f"SERVAL_REPLICA:{replica['replica_id']}"

    # the page's live events: a sample with the app in it
    with httpx.stream(
        "GET", f"{base}/api/dashboard/events", headers=headers, timeout=CALL_TIMEOUT_S
    ) as events:
        for line in events.iter_lines():
            if line.startswith("data: ") and '"echo"' in line and '"details"' in line:
                break

    assert httpx.delete(apps, headers=headers, timeout=CALL_TIMEOUT_S).status_code == 200
    assert serve.status().applications == {}

    # PUT, declarative: the config's apps deployed; then one not in the next config deleted
    def entry(name: str) -> dict[str, str]:
        return {"name": name, "route_prefix": f"/{name}", "import_path": "ray_dash_apps:app"}

    for names in (["gone", "put"], ["put"]):
        config = {"applications": [entry(n) for n in names]}
        reply = httpx.put(apps, headers=headers, json=config, timeout=120)
        assert reply.status_code == 200, reply.text
        assert sorted(serve.status().applications) == names
    assert httpx.get(f"{http}/put", timeout=CALL_TIMEOUT_S).text == "put"
    assert httpx.get(f"{http}/gone", timeout=CALL_TIMEOUT_S).status_code == 404

    serve.shutdown()
    poll(lambda: serval_actors() == [], CALL_TIMEOUT_S, "every serval actor gone")
    assert ray_store.dashboard_url(ray_store.DEFAULT_NAMESPACE) is None
    with pytest.raises(httpx.TransportError):
        httpx.get(apps, headers=headers, timeout=5)
