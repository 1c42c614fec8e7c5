"""The proxy's request recorders, in-process: the access log's (lines on ``serval.access``,
made in batches on the loop) and the request metrics' (Ray Serve's HTTP and gRPC families,
folded from the latencies recorded)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest

from serval._private.telemetry import access_log, ingress, metrics
from serval._private.telemetry.access_log import AccessLog
from serval._private.telemetry.ingress import RequestMetrics


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Capture]:
    """What ``serval.access`` logs, at INFO (and not on to the root logger's handlers)."""
    logger = logging.getLogger(access_log.ACCESS_LOGGER)
    handler = Capture()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


async def lines_after_flush(log: AccessLog, handler: Capture, count: int) -> None:
    """Wait (at most 5 s) until the flush the recorder scheduled has logged ``count`` lines."""
    deadline = time.monotonic() + 5.0
    while len(handler.records) < count:
        assert time.monotonic() < deadline, f"{len(handler.records)} of {count} lines logged"
        await asyncio.sleep(0.01)


def test_lines_are_logged_by_a_flush_with_the_request_fields_and_end_time(
    captured: Capture,
) -> None:
    async def main() -> None:
        log = AccessLog(asyncio.get_running_loop())
        end = time.time() - 30.0  # a request that ended a while before the flush
        log.record("GET", "/api/items/7", 200, 0.01234, "rid-1", "/api", "api", end)
        log.record("POST", "/api/x%y", 500, 2.5, "rid-2", "/api", "api")
        assert captured.records == []  # nothing made on the request path
        await lines_after_flush(log, captured, 2)

    asyncio.run(main())
    first, second = captured.records
    assert [r.getMessage() for r in captured.records] == [
        "GET /api/items/7 200 12.3ms",
        "POST /api/x%y 500 2500.0ms",
    ]
    assert (first.name, first.levelno, first.levelname) == ("serval.access", logging.INFO, "INFO")
    assert (first.request_id, first.route, first.application) == ("rid-1", "/api", "api")  # type: ignore[attr-defined]
    assert second.request_id == "rid-2"  # type: ignore[attr-defined]
    # stamped with the request's end, not the flush's: asctime says so through a formatter
    assert abs(first.created - (time.time() - 30.0)) < 5.0
    assert time.time() - second.created < 5.0
    formatted = logging.Formatter("%(asctime)s %(request_id)s %(message)s").format(first)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first.created))
    assert formatted.startswith(stamp + ",")
    assert formatted.endswith("rid-1 GET /api/items/7 200 12.3ms")
    assert first.process is not None and first.threadName  # as logging's own records have


def test_system_routes_and_a_disabled_log_make_no_lines(captured: Capture) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        log = AccessLog(loop)
        for path in ("/-/healthz", "/-/routes", "/-/metrics"):
            log.record("GET", path, 200, 0.001, "rid", "", "")
        log.record("GET", "/-/other", 404, 0.001, "rid", "", "")  # not a system route
        off = AccessLog(loop, enabled=False)
        off.record("GET", "/api", 200, 0.001, "rid", "/api", "api")
        log.close()
        off.close()

    asyncio.run(main())
    assert [r.getMessage() for r in captured.records] == ["GET /-/other 404 1.0ms"]


def test_close_logs_what_waits_at_once(captured: Capture) -> None:
    async def main() -> None:
        log = AccessLog(asyncio.get_running_loop())
        log.record("GET", "/a", 200, 0.001, "rid", "/a", "a")
        log.close()
        assert [r.getMessage() for r in captured.records] == ["GET /a 200 1.0ms"]
        await asyncio.sleep(access_log.FLUSH_AFTER_S * 2)  # its timer is gone: no second line

    asyncio.run(main())
    assert len(captured.records) == 1


def test_no_record_is_made_while_the_logger_does_not_take_info(captured: Capture) -> None:
    logger = logging.getLogger(access_log.ACCESS_LOGGER)

    async def main() -> None:
        log = AccessLog(asyncio.get_running_loop())
        logger.setLevel(logging.WARNING)
        log.record("GET", "/quiet", 200, 0.001, "rid", "/quiet", "q")
        log.flush()
        logger.setLevel(logging.INFO)  # what waited was dropped, not kept for later
        log.record("GET", "/loud", 200, 0.001, "rid", "/loud", "l")
        log.flush()

    asyncio.run(main())
    assert [r.getMessage() for r in captured.records] == ["GET /loud 200 1.0ms"]


# -- the request metrics ----------------------------------------------------------------------


def series(snapshot: metrics.Snapshot, name: str) -> dict[tuple[str, ...], object]:
    return {
        tags: value for family, values in snapshot if family.name == name for tags, value in values
    }


def test_request_metrics_count_by_ray_serves_tags() -> None:
    m = RequestMetrics(metrics.HTTP_FAMILIES, ingress.http_error)
    m.record("/api", "GET", "api", "Api", 200, 0.0005)
    m.record("/api", "GET", "api", "Api", 200, 0.002)  # on the 2 ms edge: in its bucket
    m.record("/api", "GET", "api", "Api", 500, 0.004)
    m.record("/api", "POST", "api", "Api", 422, 0.001)
    m.record("", "GET", "", "", 404, 0.0001)  # no route: no deployment either
    snap = m.snapshot(("node-1", "10.0.0.1", 3))

    assert series(snap, "serve_num_http_requests") == {
        ("/api", "GET", "api", "200"): 2.0,
        ("/api", "GET", "api", "500"): 1.0,
        ("/api", "POST", "api", "422"): 1.0,
        ("", "GET", "", "404"): 1.0,
    }
    assert series(snap, "serve_num_http_error_requests") == {
        ("/api", "500", "GET", "api"): 1.0,
        ("/api", "422", "POST", "api"): 1.0,
        ("", "404", "GET", ""): 1.0,
    }
    assert series(snap, "serve_num_deployment_http_error_requests") == {
        ("Api", "500", "GET", "/api", "api"): 1.0,
        ("Api", "422", "POST", "/api", "api"): 1.0,
    }
    assert series(snap, "serve_num_ongoing_http_requests") == {("node-1", "10.0.0.1"): 3.0}
    latency = series(snap, "serve_http_request_latency_ms")
    buckets, total, count = latency[("GET", "/api", "api", "200")]  # type: ignore[misc]
    assert count == 2 and total == pytest.approx(2.5)
    assert buckets[:3] == [1, 1, 0]  # le=1, le=2, le=5
    assert sum(buckets) == 2

    text = metrics.render(snap)
    assert "# TYPE serve_http_request_latency_ms histogram\n" in text
    edges = [line for line in text.splitlines() if line.startswith("serve_http_request_latency")]
    assert any('le="600000"' in line for line in edges)  # Ray Serve's buckets, to 10 minutes
    assert 'serve_num_http_requests_total{route="/api",method="GET",application="api",' in text


def test_request_metrics_fold_in_batches_and_keep_counting() -> None:
    m = RequestMetrics(metrics.GRPC_FAMILIES, ingress.grpc_error)
    n = ingress._FOLD_AT * 2 + 5  # two folds on the way, the rest at the snapshot
    for i in range(n):
        m.record("app", "/pkg.S/M", "app", "D", "OK", (i % 1000) / 1e4)  # 0 to 99.9 ms
    m.record("app", "/pkg.S/M", "app", "D", "INTERNAL", 0.5)
    assert m.total() == n + 1
    m.record("app", "/pkg.S/M", "app", "D", "OK", 700.0)  # past the last edge: +Inf only
    snap = m.snapshot()
    assert series(snap, "serve_num_grpc_requests") == {
        ("app", "/pkg.S/M", "app", "OK"): float(n + 1),
        ("app", "/pkg.S/M", "app", "INTERNAL"): 1.0,
    }
    assert series(snap, "serve_num_grpc_error_requests") == {
        ("app", "INTERNAL", "/pkg.S/M", "app"): 1.0
    }
    assert "serve_num_ongoing_grpc_requests" not in {f.name for f, _ in snap}
    buckets, total, count = series(snap, "serve_grpc_request_latency_ms")[
        ("/pkg.S/M", "app", "app", "OK")
    ]  # type: ignore[misc]
    assert count == n + 1 == sum(buckets) and buckets[-1] == 1
    boundaries = metrics.SERVE_LATENCY_BOUNDARIES_MS
    below_100 = sum(b for edge, b in zip(boundaries, buckets, strict=False) if edge <= 100)
    assert below_100 == n  # every one of 0-99.9 ms within the 100 ms bucket
    expected = sum((i % 1000) / 10 for i in range(n)) + 700_000
    assert total == pytest.approx(expected)
    # a snapshot is a copy: the series go on counting without changing it
    m.record("app", "/pkg.S/M", "app", "D", "OK", 0.001)
    assert sum(buckets) == n + 1
    assert m.total() == n + 3
