"""``serval logs`` on a real cluster's files: one request's whole story by its id (the proxy's
access line and the replica's lines), a JSON-encoded deployment picked by name, ``--follow``
while requests come, and the files of a cluster that is gone. (Needs serval's log writer:
the files of the log files' contract; on files written by hand: test_logs_cli.py.)"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import httpx

import serval as serve
from conftest import poll
from serval._private.caller import runtime

SERVAL = [sys.executable, "-m", "serval"]


@serve.deployment
class Model:
    def __call__(self, request: object) -> str:
        logging.getLogger("ray.serve").info("handled by the model")
        return "ok"


def _env() -> dict[str, str]:
    drop = ("SERVAL_ADDRESS", "RAY_ADDRESS", "NO_COLOR")
    return {k: v for k, v in os.environ.items() if k not in drop}


def logs(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*SERVAL, "logs", *args], capture_output=True, text=True, timeout=30, env=_env()
    )
    assert done.returncode == 0, done.stderr
    return done


def _address() -> str:
    address = runtime.address()
    assert address is not None
    return address


def _get(url: str, request_id: str) -> None:
    reply = httpx.get(url, headers={"x-request-id": request_id}, timeout=10)
    assert reply.status_code == 200 and reply.headers["x-request-id"] == request_id


_ACCESS = re.compile(r" - GET /story 200 \d+(\.\d+)?ms$")


def test_a_request_id_shows_that_requests_proxy_and_replica_lines(
    serve_instance: object, http_url: str
) -> None:
    serve.run(Model.bind(), name="story", route_prefix="/story")
    wanted, other = uuid.uuid4().hex, uuid.uuid4().hex
    _get(f"{http_url}/story", other)
    _get(f"{http_url}/story", wanted)

    def story() -> list[str] | None:
        lines = logs("--address", _address(), "--request-id", wanted).stdout.splitlines()
        proxy = [x for x in lines if x.startswith("proxy ") and _ACCESS.search(x)]
        replica = [x for x in lines if x.startswith("replica_story_Model_")]
        handled = [x for x in replica if x.endswith(" - handled by the model")]
        return lines if proxy and handled else None

    lines = poll(story, 20, "the request's access line and its replica's line")
    assert all(wanted in line for line in lines), lines  # its records only, from every file
    assert not any(other in line for line in lines)


def test_a_json_deployment_picked_by_name_shows_as_text(
    serve_instance: object, http_url: str
) -> None:
    plain = Model.options(name="Plain")
    js = Model.options(name="Js_Model", logging_config={"encoding": "JSON"})
    serve.run(plain.bind(), name="a", route_prefix="/a")
    serve.run(js.bind(), name="b", route_prefix="/b")
    request_id = uuid.uuid4().hex
    _get(f"{http_url}/a", uuid.uuid4().hex)
    _get(f"{http_url}/b", request_id)

    def shown() -> list[str] | None:
        lines = logs("--address", _address(), "--deployment", "Js_Model").stdout.splitlines()
        return lines if any("handled by the model" in x for x in lines) else None

    lines = poll(shown, 20, "the JSON deployment's line")
    assert all(line.startswith("replica_b_Js_Model_") for line in lines), lines
    (line,) = [x for x in lines if "handled by the model" in x]
    # asctime levelname component request id message
    assert re.search(rf"\| \S+ \S+ INFO replica {request_id} handled by the model$", line), line
    as_json = logs("--address", _address(), "--deployment", "Js_Model", "-o", "json")
    records = [json.loads(x) for x in as_json.stdout.splitlines()]
    (handled,) = [r for r in records if r["message"] == "handled by the model"]
    assert handled["deployment"] == "Js_Model" and handled["application"] == "b"
    assert handled["request_id"] == request_id


def poll_quietly(predicate: Callable[[], bool], timeout: float) -> bool:
    """Whether ``predicate`` turns true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_follow_prints_requests_as_they_come(serve_instance: object, http_url: str) -> None:
    serve.run(Model.bind(), name="story", route_prefix="/story")
    args = ["logs", "-f", "--tail", "0", "--address", _address(), "--component", "proxy"]
    lines: list[str] = []
    with subprocess.Popen(
        [*SERVAL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
        reader.start()
        try:
            # until it follows (it starts with --tail 0: what came before is not shown)
            def seen(rid: str) -> bool:
                return any(rid in x and "GET /story 200" in x for x in lines)

            def a_request_seen() -> bool:
                request_id = uuid.uuid4().hex
                _get(f"{http_url}/story", request_id)
                return poll_quietly(lambda: seen(request_id), 1.0)

            poll(a_request_seen, 30, "serval logs -f following the proxy's file")
            for _ in range(2):  # then each one seen, while it runs
                request_id = uuid.uuid4().hex
                _get(f"{http_url}/story", request_id)
                poll(
                    lambda rid=request_id: seen(rid),
                    20,
                    "the access line of a request made while following",
                )
            assert all(x.startswith("proxy | ") for x in lines), lines
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()  # (then the assertion below fails: it should have ended)
                code = proc.wait(timeout=20)
            reader.join(timeout=10)
        assert code == 0 and proc.stderr.read() == ""


def test_the_files_of_a_cluster_gone_are_still_read(serve_instance: object, http_url: str) -> None:
    serve.run(Model.bind(), name="story", route_prefix="/story")
    _get(f"{http_url}/story", uuid.uuid4().hex)
    address = _address()
    poll(
        lambda: "handled by the model" in logs("--address", address).stdout,
        20,
        "the replica's line",
    )
    serve.shutdown()
    done = logs("--address", address, "--app", "story")
    assert "is gone" in done.stderr and "session" in done.stderr
    assert "handled by the model" in done.stdout
