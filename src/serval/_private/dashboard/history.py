"""What the dashboard keeps of the last minutes: one point per deployment per sample.

Each sample is the merged metrics snapshot every replica reported (the controller's
``collect_metrics``, as ``/-/metrics`` gathers it). A point holds the request rate and error
rate (the growth of each replica's counters since the previous sample, over the time between
them: a replica that appeared counts from zero, one that is gone no longer counts), the latency
percentiles of the requests answered in between (from the growth of the histogram's buckets,
interpolated within a bucket) and the requests in flight and waiting at that moment.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from serval._private.telemetry import metrics

__all__ = ["History", "Point", "percentile"]

_REQUESTS = "serve_deployment_request_counter"
_ERRORS = "serve_deployment_error_counter"
_RUNNING = "serve_replica_processing_queries"
_WAITING = "serve_replica_pending_queries"
_LATENCY = "serve_deployment_processing_latency_ms"
_DEFAULT_POINTS = 600  # ten minutes at one sample a second

DeploymentKey = tuple[str, str]  # (application, deployment)
ReplicaKey = tuple[str, str, str]  # (application, deployment, replica)


@dataclass
class Point:
    t: float  # time.time() of the sample
    rps: float
    errors_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    in_flight: int
    waiting: int

    def as_json(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 3),
            "rps": round(self.rps, 3),
            "errors_per_s": round(self.errors_per_s, 3),
            "p50_ms": _ms(self.p50_ms),
            "p90_ms": _ms(self.p90_ms),
            "p99_ms": _ms(self.p99_ms),
            "in_flight": self.in_flight,
            "waiting": self.waiting,
        }


@dataclass
class _Reading:
    """One sample's values by replica."""

    t: float
    requests: dict[ReplicaKey, float] = field(default_factory=dict)
    errors: dict[ReplicaKey, float] = field(default_factory=dict)
    latency: dict[ReplicaKey, list[int]] = field(default_factory=dict)
    running: dict[ReplicaKey, float] = field(default_factory=dict)
    waiting: dict[ReplicaKey, float] = field(default_factory=dict)


class History:
    def __init__(self, points: int = _DEFAULT_POINTS) -> None:
        self._points = points
        self.series: dict[DeploymentKey, deque[Point]] = {}
        self._last: _Reading | None = None
        self.boundaries: tuple[float, ...] = metrics.LATENCY_BOUNDARIES_MS

    def add(self, t: float, snapshot: metrics.Snapshot) -> dict[DeploymentKey, Point]:
        """Take one sample; the new point of each deployment seen in it or the one before."""
        now = self._read(t, snapshot)
        last, self._last = self._last, now
        if last is None or now.t <= last.t:
            return {}
        span = now.t - last.t
        keys = {k[:2] for k in (*now.requests, *now.running, *last.requests)}
        added = {}
        for key in sorted(keys):
            point = self._point(key, now, last, span)
            self.series.setdefault(key, deque(maxlen=self._points)).append(point)
            added[key] = point
        return added

    def in_flight(self) -> dict[ReplicaKey, tuple[int, int]]:
        """Each replica's (running, waiting) requests at the last sample."""
        last = self._last
        if last is None:
            return {}
        keys = set(last.running) | set(last.waiting)
        return {k: (int(last.running.get(k, 0)), int(last.waiting.get(k, 0))) for k in keys}

    def forget(self, keep: set[DeploymentKey]) -> None:
        """Drop the series of deployments that no longer exist."""
        for key in [k for k in self.series if k not in keep]:
            del self.series[key]

    def _read(self, t: float, snapshot: metrics.Snapshot) -> _Reading:
        reading = _Reading(t)
        targets = {
            _REQUESTS: reading.requests,
            _ERRORS: reading.errors,
            _RUNNING: reading.running,
            _WAITING: reading.waiting,
        }
        for family, series in snapshot:
            if family.tag_keys[: len(metrics.SERVE_TAGS)] != metrics.SERVE_TAGS:
                continue
            for values, value in series:
                deployment, replica, app = values[:3]
                key = (app, deployment, replica)
                if family.name == _LATENCY and isinstance(value, tuple):
                    self.boundaries = family.boundaries
                    reading.latency[key] = list(value[0])
                elif family.name in targets and isinstance(value, (int, float)):
                    target = targets[family.name]
                    target[key] = target.get(key, 0.0) + float(value)
        return reading

    def _point(self, key: DeploymentKey, now: _Reading, last: _Reading, span: float) -> Point:
        def grown(new: dict[ReplicaKey, float], old: dict[ReplicaKey, float]) -> float:
            return sum(max(0.0, v - old.get(k, 0.0)) for k, v in new.items() if k[:2] == key)

        buckets = [0] * (len(self.boundaries) + 1)
        for k, counts in now.latency.items():
            if k[:2] != key:
                continue
            before = last.latency.get(k, [])
            for i, n in enumerate(counts[: len(buckets)]):
                buckets[i] += max(0, n - (before[i] if i < len(before) else 0))
        running = sum(v for k, v in now.running.items() if k[:2] == key)
        waiting = sum(v for k, v in now.waiting.items() if k[:2] == key)
        return Point(
            t=now.t,
            rps=grown(now.requests, last.requests) / span,
            errors_per_s=grown(now.errors, last.errors) / span,
            p50_ms=percentile(buckets, self.boundaries, 0.50),
            p90_ms=percentile(buckets, self.boundaries, 0.90),
            p99_ms=percentile(buckets, self.boundaries, 0.99),
            in_flight=int(running),
            waiting=int(waiting),
        )


def percentile(buckets: list[int], boundaries: tuple[float, ...], q: float) -> float | None:
    """The ``q`` quantile of the values counted in ``buckets`` (one per boundary, the last
    for +Inf; not cumulative), interpolated linearly within its bucket; None if empty. A
    quantile in the +Inf bucket is reported as the last boundary (all that is known)."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i >= len(boundaries):
                return boundaries[-1] if boundaries else None
            low = boundaries[i - 1] if i > 0 else 0.0
            return low + (boundaries[i] - low) * (rank - seen) / n
        seen += n
    return boundaries[-1] if boundaries else None


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
