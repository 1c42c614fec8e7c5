"""The dashboard's history: rates from counter deltas (a replica that appears counts from
zero, one that goes away is not a negative rate), percentiles from histogram bucket deltas,
in-flight counts, the ring buffer's bound; the replicas' log tails it reads from the log
files' contract (``logs_dir`` in the runtime directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serval._private.dashboard.history import History, percentile
from serval._private.dashboard.logs import ReplicaLogs
from serval._private.telemetry import metrics

FAMILIES = {f.name: f for f in metrics.OWN_FAMILIES}
BOUNDS = metrics.LATENCY_BOUNDARIES_MS


def snapshot(
    replicas: dict[str, tuple[float, float, list[int], float, float]],
) -> metrics.Snapshot:
    """replica -> (requests, errors, latency buckets, running, waiting) of app 'a', dep 'D'."""
    names = [
        "serve_deployment_request_counter",
        "serve_deployment_error_counter",
        "serve_deployment_processing_latency_ms",
        "serve_replica_processing_queries",
        "serve_replica_pending_queries",
    ]
    out: metrics.Snapshot = []
    for i, name in enumerate(names):
        series: list[tuple[tuple[str, ...], float | metrics.HistogramValue]] = []
        for rid, values in replicas.items():
            value = values[i]
            if isinstance(value, list):
                buckets = value + [0] * (len(BOUNDS) + 1 - len(value))
                series.append((("D", rid, "a"), (buckets, 0.0, sum(buckets))))
            else:
                series.append((("D", rid, "a"), float(value)))
        out.append((FAMILIES[name], series))
    return out


def test_rates_and_percentiles_from_deltas() -> None:
    history = History()
    assert history.add(100.0, snapshot({"r1": (10, 1, [5], 0, 0)})) == {}  # nothing before
    # r1 answers 20 more (2 errors) in 2 s, all of them in the 1-2.5 ms bucket (index 4)
    step = snapshot({"r1": (30, 3, [5, 0, 0, 0, 20], 3, 1), "r2": (4, 0, [0, 0, 0, 0, 4], 1, 0)})
    (point,) = history.add(102.0, step).values()
    assert point.rps == pytest.approx((20 + 4) / 2)  # r2 is new: all of its 4 count
    assert point.errors_per_s == pytest.approx(1.0)
    assert 1.0 < point.p50_ms <= 2.5 and point.p99_ms <= 2.5
    assert (point.in_flight, point.waiting) == (4, 1)
    assert history.in_flight()[("a", "D", "r1")] == (3, 1)
    # r1 is gone: no negative rate; nothing answered, no percentile
    (point,) = history.add(103.0, snapshot({"r2": (4, 0, [0, 0, 0, 0, 4], 0, 0)})).values()
    assert point.rps == 0 and point.p50_ms is None


def test_the_ring_buffer_is_bounded_and_forgets_deleted_deployments() -> None:
    history = History(points=5)
    for t in range(10):
        history.add(float(t), snapshot({"r": (t * 3, 0, [t], 0, 0)}))
    (series,) = history.series.values()
    assert len(series) == 5 and series[-1].rps == pytest.approx(3.0)
    history.forget(set())
    assert history.series == {}


def test_percentile_interpolates_within_its_bucket() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert percentile([0, 0, 0, 0], bounds, 0.5) is None
    assert percentile([0, 10, 0, 0], bounds, 0.5) == pytest.approx(1.5)
    assert percentile([10, 0, 0, 0], bounds, 0.9) == pytest.approx(0.9)
    assert percentile([0, 0, 0, 5], bounds, 0.99) == 4.0  # +Inf: the last bound is all we know
    assert percentile([50, 0, 50, 0], bounds, 0.99) == pytest.approx(2.0 + 2.0 * 0.98)


def test_log_tails_from_the_files_contract(tmp_path: Path) -> None:
    rundir, logs = tmp_path / "run", tmp_path / "logs"
    rundir.mkdir()
    logs.mkdir()
    reader = ReplicaLogs(str(rundir), lines=3)
    assert reader.tail("a", "D", "r1") == []  # no logs_dir yet
    (rundir / "logs_dir").write_text(f"{logs}\n")
    path = logs / "replica_a_D_r1.log"
    path.write_text("".join(f"line {i}\n" for i in range(10)))
    assert reader.path("a", "D", "r1") == str(path)
    assert reader.tail("a", "D", "r1") == ["line 7", "line 8", "line 9"]
    with path.open("a") as f:
        f.write('{"asctime": "12:00", "levelname": "INFO", "message": "as JSON"}\n')
    assert reader.tail("a", "D", "r1")[-1] == "12:00 INFO as JSON"
    assert reader.tail("a", "D", "other") == []
