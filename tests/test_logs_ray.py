"""Log files on Ray: in each node's ``<Ray session>/logs/serve/``, as Ray Serve's, with the
same names and lines as on the local backend; ``serve.start``'s ``logging_config`` reaches the
controller and proxy actors, a deployment's its replica actors."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import serval as serve
from conftest import free_port, poll
from ray_clusters import CALL_TIMEOUT_S, one_node

ray = pytest.importorskip("ray")


@serve.deployment(ray_actor_options={"num_cpus": 0}, logging_config={"encoding": "JSON"})
class Speaker:
    async def __call__(self, request: Any) -> str:
        logging.getLogger("ray.serve").info("spoken on ray")
        return "said"


@pytest.fixture(scope="module")
def on_ray() -> Iterator[str]:
    with one_node():
        port = free_port()
        serve.start(
            http_options={"port": port},
            dashboard_options={"port": 0},
            logging_config={"log_level": "DEBUG"},
        )
        yield f"http://127.0.0.1:{port}"


def _serve_logs() -> Path:
    node = ray._private.worker._global_node
    return Path(node.get_logs_dir_path()) / "serve"


def _line(path_glob: str, text: str) -> tuple[Path, str]:
    def found() -> tuple[Path, str] | None:
        for path in sorted(_serve_logs().glob(path_glob)):
            for line in path.read_text().splitlines():
                if text in line:
                    return path, line
        return None

    return poll(found, CALL_TIMEOUT_S, f"{text!r} in {path_glob}")


@pytest.mark.timeout(180)
def test_logs_on_ray_are_in_the_sessions_serve_directory(on_ray: str) -> None:
    serve.run(Speaker.bind(), name="speak", route_prefix="/speak")
    request_id = uuid.uuid4().hex
    reply = httpx.get(f"{on_ray}/speak", headers={"x-request-id": request_id}, timeout=30)
    assert reply.text == "said"
    path, line = _line("replica_speak_Speaker_*.log", "spoken on ray")
    record = json.loads(line)
    assert record["request_id"] == request_id and record["route"] == "/speak"
    assert record["deployment"] == "Speaker" and record["replica"] in path.name
    # the proxy's file is named after its node's IP address, as Ray Serve's
    path, proxy = _line("proxy_*.log", "HTTP proxy listening")
    ip = path.name.removeprefix("proxy_").removesuffix(".log")
    assert proxy.startswith("INFO ") and f" proxy {ip} " in proxy
    assert (_serve_logs() / "controller.log").is_file()
