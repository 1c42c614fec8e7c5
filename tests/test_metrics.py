"""serve.metrics (Counter, Gauge, Histogram) and the proxy's /-/metrics: the exposition format
and the checks in-process, then a cluster whose replicas' metrics are scraped over HTTP."""

from __future__ import annotations

import asyncio
import pickle
import re
import time
from typing import Any

import cloudpickle
import httpx
import pytest

import serval as serve
from conftest import poll
from serval._private.telemetry import metrics as registry

# --- in-process: what is recorded and how it reads --------------------------------------------


def scrape_local() -> str:
    return registry.render(registry.REGISTRY.snapshot())


def test_counter_gauge_and_histogram_in_prometheus_text() -> None:
    hits = serve.metrics.Counter("t_hits", "Hits.", tag_keys=("model",))
    hits.set_default_tags({"model": "a"})
    hits.inc()
    hits.inc(2.5, tags={"model": 'b"q'})
    serve.metrics.Gauge("t_temp", "Temperature\nnow.").set(-3)
    lat = serve.metrics.Histogram("t_lat_ms", "Latency.", boundaries=[1, 10])
    for value in (0.5, 1, 5, 50):
        lat.observe(value)

    text = scrape_local()
    assert "# TYPE t_hits_total counter\n" in text
    assert 't_hits_total{model="a"} 1\n' in text
    assert 't_hits_total{model="b\\"q"} 2.5\n' in text  # label values escaped
    assert "# HELP t_temp Temperature\\nnow.\n# TYPE t_temp gauge\nt_temp -3\n" in text
    assert (
        't_lat_ms_bucket{le="1"} 2\nt_lat_ms_bucket{le="10"} 3\nt_lat_ms_bucket{le="+Inf"} 4\n'
        "t_lat_ms_sum 56.5\nt_lat_ms_count 4\n"
    ) in text


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: serve.metrics.Counter("9lives"), ValueError),
        (lambda: serve.metrics.Counter("serve_deployment_request_counter"), ValueError),
        (lambda: serve.metrics.Counter("t_c1", tag_keys="model"), TypeError),
        (lambda: serve.metrics.Counter("t_c2", tag_keys=("replica",)), ValueError),
        (lambda: serve.metrics.Histogram("t_h1", boundaries=[]), ValueError),
        (lambda: serve.metrics.Histogram("t_h2", boundaries=[5, 1]), ValueError),
        (lambda: serve.metrics.Counter("t_c3").inc(0), ValueError),
        (lambda: serve.metrics.Counter("t_c4").inc("1"), TypeError),  # type: ignore[arg-type]
        (lambda: serve.metrics.Counter("t_c5", tag_keys=("k",)).inc(), ValueError),
        (lambda: serve.metrics.Counter("t_c6").inc(tags={"k": "v"}), ValueError),
        (lambda: serve.metrics.Gauge("t_g1", tag_keys=("k",)).set(1, tags={"k": 1}), TypeError),  # type: ignore[dict-item]
    ],
)
def test_bad_metrics_and_records_are_clear_errors(make: Any, error: type) -> None:
    with pytest.raises(error):
        make()


def test_one_name_one_shape() -> None:
    serve.metrics.Counter("t_shape", tag_keys=("a",))
    serve.metrics.Counter("t_shape", tag_keys=("a",))  # the same again is fine
    with pytest.raises(ValueError, match="already declared"):
        serve.metrics.Gauge("t_shape", tag_keys=("a",))


def test_a_metric_pickles_and_keeps_recording() -> None:
    counter = serve.metrics.Counter("t_pickled", tag_keys=("k",)).set_default_tags({"k": "v"})
    counter.inc()
    for dumps in (pickle.dumps, cloudpickle.dumps):
        pickle.loads(dumps(counter)).inc()
    assert 't_pickled_total{k="v"} 3\n' in scrape_local()
    assert counter.info == {
        "name": "t_pickled",
        "description": "",
        "tag_keys": ("k",),
        "default_tags": {"k": "v"},
    }


# --- a cluster: replicas' metrics at the proxy's /-/metrics -----------------------------------


@serve.deployment(num_replicas=2)
class Scored:
    def __init__(self) -> None:
        self.calls = serve.metrics.Counter("app_calls", "Calls.", tag_keys=("kind",))
        self.last = serve.metrics.Gauge("app_last", "Last value.")
        self.sizes = serve.metrics.Histogram("app_size", "Sizes.", boundaries=[10, 100])

    def record(self, n: int) -> int:  # a sync method: recorded from a worker thread
        self.calls.inc(tags={"kind": "sync"})
        self.last.set(n)
        self.sizes.observe(n)
        return n

    async def arecord(self, n: int) -> int:
        self.calls.inc(tags={"kind": "async"})
        return n

    def fail(self) -> None:
        raise RuntimeError("no")

    async def __call__(self, request: Any) -> str:
        return "ok"


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus text page: (name, labels) -> value."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m is not None, f"not a sample line: {line!r}"
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def test_replica_metrics_are_served_at_the_proxy(http_url: str) -> None:
    handle = serve.run(Scored.bind(), name="scored", route_prefix="/scored")
    assert [handle.record.remote(n).result(timeout_s=10) for n in (5, 50, 500)] == [5, 50, 500]

    async def some_async() -> None:
        await asyncio.gather(*(handle.arecord.remote(i) for i in range(4)))

    asyncio.run(some_async())
    with pytest.raises(RuntimeError):
        handle.fail.remote().result(timeout_s=10)
    assert httpx.get(f"{http_url}/scored", timeout=10).text == "ok"

    where = {"deployment": "Scored", "application": "scored"}

    def settled() -> dict[Any, float] | None:
        # A lone sync call's reply leaves from its worker thread before the replica's loop
        # counts the call finished: the counts catch up a moment after the last answer.
        response = httpx.get(f"{http_url}/-/metrics", timeout=10)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        samples = parse(response.text)
        done = total(samples, "serve_deployment_request_counter_total", **where)
        return samples if done == 9 else None

    samples = poll(settled, timeout=10.0, what="the nine answered requests in the scrape")

    assert total(samples, "app_calls_total", kind="sync", **where) == 3
    assert total(samples, "app_calls_total", kind="async", **where) == 4
    assert total(samples, "app_size_count", **where) == 3
    assert total(samples, "app_size_bucket", le="100", **where) == 2
    assert total(samples, "app_size_sum", **where) == 555
    # every replica reports (serval's own series), and each series names its replica
    replicas = {dict(lbl)["replica"] for (n, lbl) in samples if n.startswith("serve_replica_")}
    assert len(replicas) == 2
    assert {dict(lbl)["replica"] for (n, lbl) in samples if n == "app_calls_total"} <= replicas
    # serval's own: 3 + 4 + 1 handle calls and 1 HTTP request answered, 1 of them raised
    assert total(samples, "serve_deployment_request_counter_total", **where) == 9
    assert total(samples, "serve_deployment_error_counter_total", **where) == 1
    assert total(samples, "serve_replica_processing_queries", **where) == 0
    assert total(samples, "serve_deployment_processing_latency_ms_count", **where) == 9
    # the proxy's own: the one request to /scored (and the scrapes, on no route)
    http = {"route": "/scored", "method": "GET", "status_code": "200"}
    assert total(samples, "serve_num_http_requests_total", **http) == 1


@serve.deployment
class Busy:
    async def hold(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def test_requests_running_now_are_counted(http_url: str) -> None:
    handle = serve.run(Busy.bind(), name="busy", route_prefix=None)
    held = [handle.hold.remote(2.0) for _ in range(3)]

    def running() -> float:
        samples = parse(httpx.get(f"{http_url}/-/metrics", timeout=10).text)
        return total(samples, "serve_replica_processing_queries", deployment="Busy")

    poll(lambda: running() == 3, timeout=10.0, what="three running requests in the scrape")
    for response in held:
        response.result(timeout_s=10)
    assert running() == 0
    # each took two seconds: past the 1 s bucket, within the 2.5 s one
    samples = parse(httpx.get(f"{http_url}/-/metrics", timeout=10).text)
    latency = "serve_deployment_processing_latency_ms"
    assert total(samples, f"{latency}_count", deployment="Busy") == 3
    assert total(samples, f"{latency}_bucket", deployment="Busy", le="1000") == 0
    assert total(samples, f"{latency}_bucket", deployment="Busy", le="2500") == 3
    assert 6000 <= total(samples, f"{latency}_sum", deployment="Busy") < 7500


def test_a_scrape_with_no_metrics_and_the_proxy_still_serves(http_url: str) -> None:
    start = time.monotonic()
    response = httpx.get(f"{http_url}/-/metrics", timeout=10)
    assert response.status_code == 200
    # nothing answered yet: the proxy's gauge of requests in flight alone, at 0
    assert parse(response.text) == {
        (
            "serve_num_ongoing_http_requests",
            frozenset({("node_id", ""), ("node_ip_address", "127.0.0.1")}),
        ): 0
    }
    assert time.monotonic() - start < 5
    assert httpx.get(f"{http_url}/-/healthz", timeout=10).text == "success"
    assert httpx.get(f"{http_url}/nowhere", timeout=10).status_code == 404
    samples = parse(httpx.get(f"{http_url}/-/metrics", timeout=10).text)
    requests = "serve_num_http_requests_total"
    assert total(samples, requests, route="", method="GET", status_code="200") == 2
    assert total(samples, requests, route="", method="GET", status_code="404") == 1


@serve.deployment(num_replicas=1)
class Models:
    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        await asyncio.sleep(0.03)  # a load that takes a while: past the 20 ms bucket
        return f"model {model_id}"

    async def __call__(self, request: Any) -> str:
        return await self.get_model(serve.get_multiplexed_model_id())


def test_multiplexing_and_replica_health_are_in_the_scrape(http_url: str) -> None:
    """Ray Serve's multiplexing metrics (serve_multiplexed_*) from the replica, and what the
    controller knows of the replicas (serve_deployment_replica_healthy/_starts)."""
    serve.run(Models.bind(), name="models", route_prefix="/models")
    for model_id in ("a", "b", "a", "c"):  # c evicts b, the least recently used
        r = httpx.get(
            f"{http_url}/models", headers={"serve_multiplexed_model_id": model_id}, timeout=10
        )
        assert r.text == f"model {model_id}"
    samples = parse(httpx.get(f"{http_url}/-/metrics", timeout=10).text)
    where = {"deployment": "Models", "application": "models"}
    assert total(samples, "serve_multiplexed_get_model_requests_counter_total", **where) == 4
    assert total(samples, "serve_multiplexed_models_load_counter_total", **where) == 3
    assert total(samples, "serve_multiplexed_models_unload_counter_total", **where) == 1
    assert total(samples, "serve_num_multiplexed_models", **where) == 2
    held = "serve_registered_multiplexed_model_id"
    assert [total(samples, held, model_id=m, **where) for m in "abc"] == [1, 0, 1]
    loads = "serve_multiplexed_model_load_latency_ms"
    assert total(samples, f"{loads}_count", **where) == 3
    assert total(samples, f"{loads}_bucket", le="20", **where) == 0
    # Three 30 ms loads, summed in milliseconds. uvloop's timers start from the loop's cached
    # clock, so a 30 ms sleep can measure short by as long as the loop ran before it (29.3 ms
    # seen): not "at least 90".
    assert total(samples, f"{loads}_sum", **where) >= 75
    assert total(samples, "serve_multiplexed_model_unload_latency_ms_count", **where) == 1

    healthy = {
        dict(lbl)["replica"]: v
        for (n, lbl), v in samples.items()
        if n == "serve_deployment_replica_healthy" and dict(lbl)["deployment"] == "Models"
    }
    assert list(healthy.values()) == [1.0]
    assert total(samples, "serve_deployment_replica_starts_total", **where) == 1

    # Scaled to two: the new replica is counted as started, and healthy once it runs (the
    # proxy gathers the replicas' metrics at most once a second: a scrape may be that old).
    serve.run(Models.options(num_replicas=2).bind(), name="models", route_prefix="/models")

    def scaled() -> bool:
        samples = parse(httpx.get(f"{http_url}/-/metrics", timeout=10).text)
        starts = total(samples, "serve_deployment_replica_starts_total", **where)
        return starts == 2 and total(samples, "serve_deployment_replica_healthy", **where) == 2

    poll(scaled, timeout=10.0, what="two replicas started and healthy in the scrape")


def test_requests_waiting_at_callers_are_counted(http_url: str) -> None:
    """serve_deployment_queued_queries: calls a caller holds because every replica is full."""
    handle = serve.run(
        Busy.options(name="OneAtATime", max_ongoing_requests=1).bind(),
        name="queued",
        route_prefix=None,
    )
    held = [handle.hold.remote(1.5) for _ in range(4)]  # one runs, three wait here

    def waiting() -> float:
        samples = parse(httpx.get(f"{http_url}/-/metrics", timeout=10).text)
        return total(
            samples,
            "serve_deployment_queued_queries",
            deployment="OneAtATime",
            application="queued",
        )

    poll(lambda: waiting() == 3, timeout=10.0, what="three waiting calls in the scrape")
    for response in held:
        response.result(timeout_s=20)
    poll(lambda: waiting() == 0, timeout=10.0, what="no waiting call in the scrape")
