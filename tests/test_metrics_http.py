"""The proxy's own HTTP metrics at /-/metrics, as Ray Serve names and tags them, after real
requests: answered (200), not routed (404), raising in the deployment (500), refused by
FastAPI's validation (422), and one held while the scrape counts it in flight."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

import serval as serve
from conftest import poll, scrape, total
from serval._private.telemetry import metrics

api = FastAPI()


@serve.deployment
@serve.ingress(api)
class Api:
    @api.get("/ok")
    def ok(self) -> str:
        return "ok"

    @api.get("/boom")
    def boom(self) -> str:
        raise RuntimeError("boom")

    @api.get("/items/{item}")
    def item(self, item: int) -> int:
        return item

    @api.get("/slow")
    async def slow(self) -> str:
        await asyncio.sleep(0.25)
        return "slept"

    @api.get("/hold")
    def hold(self, gate: str) -> str:
        deadline = time.monotonic() + 20
        while not Path(gate).exists() and time.monotonic() < deadline:  # (the test opens it)
            time.sleep(0.01)
        return "released"


def test_requests_errors_and_latency_by_route_app_and_status(http_url: str) -> None:
    serve.run(Api.bind(), name="api", route_prefix="/api")
    get = httpx.Client(base_url=http_url, timeout=10)
    assert [get.get("/api/ok").status_code for _ in range(3)] == [200, 200, 200]
    assert get.get("/api/boom").status_code == 500
    assert get.get("/api/items/abc").status_code == 422
    assert get.get("/nowhere").status_code == 404
    assert get.get("/api/slow").text == '"slept"'

    samples = scrape(http_url, timeout=10)
    app = {"route": "/api", "application": "api", "method": "GET"}
    requests = "serve_num_http_requests_total"
    assert total(samples, requests, status_code="200", **app) == 4
    assert total(samples, requests, status_code="500", **app) == 1
    assert total(samples, requests, status_code="422", **app) == 1
    assert total(samples, requests, route="", application="", status_code="404") == 1

    errors = "serve_num_http_error_requests_total"
    assert total(samples, errors, error_code="500", **app) == 1
    assert total(samples, errors, error_code="422", **app) == 1
    assert total(samples, errors, route="", application="", error_code="404") == 1
    assert total(samples, errors, error_code="200") == 0
    by_deployment = "serve_num_deployment_http_error_requests_total"
    assert total(samples, by_deployment, deployment="Api", error_code="500", **app) == 1
    assert total(samples, by_deployment, deployment="Api", error_code="422", **app) == 1
    assert total(samples, by_deployment) == 2  # the 404 reached no deployment

    latency = "serve_http_request_latency_ms"
    ok = {"status_code": "200", **app}
    buckets = {
        lbl["le"]: v
        for n, lbl, v in samples
        if n == f"{latency}_bucket" and ok.items() <= lbl.items()
    }
    edges = [*(format(b, "g") for b in metrics.SERVE_LATENCY_BOUNDARIES_MS), "+Inf"]
    assert list(buckets) == edges  # Ray Serve's buckets, in order
    counts = list(buckets.values())
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == total(samples, f"{latency}_count", **ok) == 4
    assert buckets["200"] == 3  # the slow one took 250 ms, past the 200 ms bucket
    assert 250 <= total(samples, f"{latency}_sum", **ok) < 4 * 10_000
    # every request counted has its latency recorded, and the other way round
    assert total(samples, f"{latency}_count") == total(samples, requests)


def test_requests_in_flight_are_a_gauge_at_the_scrape(http_url: str, tmp_path: Path) -> None:
    serve.run(Api.bind(), name="api", route_prefix="/api")
    gate = tmp_path / "gate"
    answers: list[Any] = []

    def held() -> None:
        answers.append(httpx.get(f"{http_url}/api/hold", params={"gate": str(gate)}, timeout=20))

    ongoing = "serve_num_ongoing_http_requests"
    assert total(scrape(http_url, timeout=10), ongoing) == 0  # the scrape itself is not counted
    thread = threading.Thread(target=held)
    thread.start()
    try:
        poll(
            lambda: total(scrape(http_url, timeout=10), ongoing) == 1,
            timeout=15.0,
            what="the held request in flight",
        )
        samples = scrape(http_url, timeout=10)
        tags = [lbl for n, lbl, _ in samples if n == ongoing]
        assert tags == [{"node_id": "", "node_ip_address": "127.0.0.1"}]
    finally:
        gate.touch()
        thread.join(timeout=20)
    assert answers[0].text == '"released"'
    assert total(scrape(http_url, timeout=10), ongoing) == 0
