"""``backpressure_config=BackpressureConfig(status_code=..., retry_after_s=...)``: the HTTP answer
to a request shed because its deployment's ``max_queued_requests`` is reached (Ray Serve's
deployment option, ``ray.serve.config.BackpressureConfig``), over real HTTP on a real cluster.

Each test holds the deployment's one replica slot with a request that waits for a file, then
sends more requests at once: as the proxy is the one caller, exactly ``max_queued_requests`` of
them wait in its queue and the rest are shed at once, whatever order they arrive in.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

import serval as serve
from conftest import poll, replica_pids
from serval.config import BackpressureConfig, DeploymentConfig
from serval.exceptions import BackPressureError
from serval.schema import parse_config

TIMEOUT_S = 30.0


def wait_for_gate(gate: Path, answer: str) -> str:
    Path(f"{gate}.started").touch()
    while not gate.exists():
        time.sleep(0.01)
    return answer


class Held:
    """Answers an HTTP request once the file its query names exists (a gate the test opens),
    having first created ``<file>.started``."""

    def __call__(self, request: Request) -> str:
        return wait_for_gate(Path(request.query_params["gate"]), "served")


# The docstring's example (Ray's): 429 and Retry-After: 5 once the queue is full.
Limited = serve.deployment(
    max_ongoing_requests=1,
    max_queued_requests=2,
    backpressure_config=BackpressureConfig(status_code=429, retry_after_s=5),
)(Held)


def overload(
    url: str, gate: Path, extra: int, shed: int
) -> tuple[list[httpx.Response], list[httpx.Response]]:
    """One request takes the replica's slot, then ``extra`` more go at once, of which ``shed``
    must be answered while the others wait. Returns (the shed answers, the others' answers
    once the gate opens)."""
    first_gate = gate.with_name(gate.name + "-first")

    def get(at: Path) -> httpx.Response:
        return httpx.get(url, params={"gate": str(at)}, timeout=TIMEOUT_S)

    with ThreadPoolExecutor(extra + 1) as pool:
        busy = pool.submit(get, first_gate)
        poll(lambda: Path(f"{first_gate}.started").exists(), TIMEOUT_S, "the first request runs")
        later = [pool.submit(get, gate) for _ in range(extra)]
        poll(lambda: sum(f.done() for f in later) >= shed, TIMEOUT_S, "the shed answers")
        answered = [f for f in later if f.done()]  # (the others wait for the gate)
        first_gate.touch()
        gate.touch()
        rest = [busy.result()] + [f.result() for f in later if f not in answered]
    return [f.result() for f in answered], rest


def test_shed_requests_get_the_configured_status_and_retry_after(
    serve_instance: Any, http_url: str, tmp_path: Path
) -> None:
    serve.run(Limited.bind(), name="limited", route_prefix="/limited")
    shed, rest = overload(f"{http_url}/limited", tmp_path / "gate", extra=5, shed=3)
    assert len(shed) == 3  # 5 - max_queued_requests
    for reply in shed:
        assert reply.status_code == 429
        assert reply.headers["retry-after"] == "5"
        assert "max_queued_requests" in reply.text and "Traceback" not in reply.text
    assert [r.status_code for r in rest] == [200, 200, 200]
    assert all(r.text == "served" and "retry-after" not in r.headers for r in rest)


def test_by_default_a_shed_request_is_a_503_without_retry_after(
    serve_instance: Any, http_url: str, tmp_path: Path
) -> None:
    plain = serve.deployment(max_ongoing_requests=1, max_queued_requests=1)(Held)
    serve.run(plain.bind(), name="plain", route_prefix="/plain")
    shed, rest = overload(f"{http_url}/plain", tmp_path / "gate", extra=3, shed=2)
    assert [r.status_code for r in shed] == [503, 503]
    assert all("retry-after" not in r.headers for r in shed)
    assert [r.status_code for r in rest] == [200, 200]


def test_retry_after_is_rounded_up_to_whole_seconds_and_options_take_a_dict(
    serve_instance: Any, http_url: str, tmp_path: Path
) -> None:
    app = Limited.options(backpressure_config={"retry_after_s": 2.1}, max_queued_requests=0)
    serve.run(app.bind(), name="rounded", route_prefix="/rounded")
    shed, _ = overload(f"{http_url}/rounded", tmp_path / "gate", extra=2, shed=2)
    assert [(r.status_code, r.headers["retry-after"]) for r in shed] == [(503, "3")] * 2


def test_a_new_backpressure_config_applies_in_place(
    serve_instance: Any, http_url: str, tmp_path: Path
) -> None:
    """Like max_queued_requests, it changes no replica: the same one serves after."""
    serve.run(Limited.bind(), name="inplace", route_prefix="/inplace")
    pids = replica_pids("inplace", "Held")
    changed = Limited.options(
        max_queued_requests=0, backpressure_config=BackpressureConfig(retry_after_s=0)
    )
    serve.run(changed.bind(), name="inplace", route_prefix="/inplace")
    shed, _ = overload(f"{http_url}/inplace", tmp_path / "gate", extra=1, shed=1)
    assert [(r.status_code, r.headers["retry-after"]) for r in shed] == [(503, "0")]
    assert replica_pids("inplace", "Held") == pids


def test_handle_callers_still_get_a_back_pressure_error(
    serve_instance: Any, tmp_path: Path
) -> None:
    @serve.deployment(
        max_ongoing_requests=1,
        max_queued_requests=0,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
    )
    class Busy:
        def hold(self, gate: str) -> str:
            return wait_for_gate(Path(gate), "done")

    handle = serve.run(Busy.bind(), name="busy", route_prefix=None)
    gate = tmp_path / "gate"
    busy = handle.hold.remote(str(gate))
    poll(lambda: Path(f"{gate}.started").exists(), TIMEOUT_S, "the call runs")
    with pytest.raises(BackPressureError):
        handle.hold.remote(str(gate)).result(timeout_s=TIMEOUT_S)
    gate.touch()
    assert busy.result(timeout_s=TIMEOUT_S) == "done"


def test_config_files_take_backpressure_config(
    serve_instance: Any, http_url: str, tmp_path: Path
) -> None:
    from serval.schema import build_application

    config = parse_config(
        {
            "applications": [
                {
                    "name": "from_file",
                    "route_prefix": "/from_file",
                    "import_path": "test_backpressure_config:plain_app",
                    "deployments": [
                        {
                            "name": "Held",
                            "max_ongoing_requests": 1,
                            "max_queued_requests": 0,
                            "backpressure_config": {"status_code": 429, "retry_after_s": 0.5},
                        }
                    ],
                }
            ]
        }
    )
    entry = config.applications[0]
    serve.run(build_application(entry, 0, "<test>"), name=entry.name, route_prefix="/from_file")
    shed, _ = overload(f"{http_url}/from_file", tmp_path / "gate", extra=1, shed=1)
    assert [(r.status_code, r.headers["retry-after"]) for r in shed] == [(429, "1")]


plain_app = serve.deployment(Held).bind()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"status_code": 500}, ValueError),
        ({"status_code": "429"}, ValueError),
        ({"retry_after_s": -1}, ValueError),
        ({"retry_after_s": float("inf")}, ValueError),
        ({"retry_after": 5}, TypeError),  # a misspelt field is refused, as Ray's model does
    ],
)
def test_bad_backpressure_configs_are_refused(options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        BackpressureConfig(**options)
    with pytest.raises(error):
        DeploymentConfig(backpressure_config=options)


def test_bad_backpressure_configs_in_a_file_name_the_field() -> None:
    entry = {"name": "Held", "backpressure_config": {"status_code": 500}}
    with pytest.raises(Exception, match=r"deployments\[0\]\.backpressure_config\.status_code"):
        parse_config({"applications": [{"import_path": "x:y", "deployments": [entry]}]})
