"""A proxy's metrics of the requests it answers, for one protocol (Ray Serve's
``serve_num_<protocol>_requests`` family: ``metrics.IngressFamilies``).

A request's end costs the proxy's loop one append to its series' list of latencies; the lists
are folded into histograms in batches (a list at ``_FOLD_AT`` latencies, all of them at each
scrape), by sorting each list and counting the bucket edges in it, so that the per-request
work in Python stays one append and the rest is done in C. One series per (route, method,
application, deployment, status) holds everything the families show: the request count is its
histogram's count, the error counts those of error statuses. Not locked: the proxy's loop
thread alone records, folds and reads it.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable

from serval._private.telemetry.metrics import (
    Family,
    HistogramValue,
    IngressFamilies,
    Series,
    Snapshot,
    add_histograms,
)

# (route, method, application, deployment, status): a series of the latency histogram
_Key = tuple[str, str, str, str, int | str]

# Latencies a series holds before a fold at most: a bound on the memory between scrapes
# (8 bytes and a float each), large enough that a fold's setup is spread thin.
_FOLD_AT = 1024


def http_error(status: int | str) -> bool:
    """Ray Serve's rule: a 4xx or 5xx is an error."""
    return str(status)[0] in "45"


def grpc_error(status: int | str) -> bool:
    return status != "OK"


class RequestMetrics:
    """The requests one proxy answered over one protocol, and their latency."""

    def __init__(self, families: IngressFamilies, is_error: Callable[[int | str], bool]) -> None:
        self.families = families
        self._is_error = is_error
        # the bucket edges in seconds, as latencies are recorded
        self._edges_s = tuple(ms / 1000.0 for ms in families.latency.boundaries)
        self._pending: defaultdict[_Key, list[float]] = defaultdict(list)
        self._series: dict[_Key, HistogramValue] = {}
        # Requests sent to an app and not answered yet, where the proxy counts them as they
        # go (gRPC's; the HTTP proxy counts its connections' at a scrape instead)
        self.ongoing = 0

    def record(
        self,
        route: str,
        method: str,
        application: str,
        deployment: str,
        status: int | str,
        latency_s: float,
    ) -> None:
        """A request's end: ``deployment`` is the one it was sent to ("" for none)."""
        key = (route, method, application, deployment, status)
        latencies = self._pending[key]
        latencies.append(latency_s)
        if len(latencies) >= _FOLD_AT:
            self._fold(key, latencies)
            del self._pending[key]

    def fold(self) -> None:
        """Count the requests ended since the last fold into their series."""
        pending, self._pending = self._pending, defaultdict(list)
        for key, latencies in pending.items():
            self._fold(key, latencies)

    def _fold(self, key: _Key, latencies: list[float]) -> None:
        latencies.sort()
        before = self._series.get(key)
        buckets, total, count = before or ([0] * (len(self._edges_s) + 1), 0.0, 0)
        below = 0
        for i, edge in enumerate(self._edges_s):  # (a value on an edge counts in its bucket)
            upto = bisect.bisect_right(latencies, edge)
            buckets[i] += upto - below
            below = upto
        buckets[-1] += len(latencies) - below
        self._series[key] = (buckets, total + sum(latencies) * 1000.0, count + len(latencies))

    def total(self) -> int:
        """How many requests have ended."""
        self.fold()
        return sum(count for _, _, count in self._series.values())

    def snapshot(self, ongoing: tuple[str, str, int] | None = None) -> Snapshot:
        """The families' series as they are now; ``ongoing``: (node id, node IP, requests
        being answered) for the gauge, when the proxy counts them."""
        self.fold()
        requests: dict[tuple[str, ...], float] = {}
        errors: dict[tuple[str, ...], float] = {}
        deployment_errors: dict[tuple[str, ...], float] = {}
        latency: dict[tuple[str, ...], HistogramValue] = {}
        for (route, method, app, deployment, status), value in self._series.items():
            code = str(status)
            value = (list(value[0]), value[1], value[2])  # (a copy: the series go on)
            count = float(value[2])
            _add(requests, (route, method, app, code), count)
            tags = (method, route, app, code)
            before = latency.get(tags)  # (the same but for the deployment: a new ingress)
            latency[tags] = value if before is None else add_histograms(before, value)
            if self._is_error(status):
                _add(errors, (route, code, method, app), count)
                if deployment:
                    _add(deployment_errors, (deployment, code, method, route, app), count)
        families = self.families
        out: list[tuple[Family, Series]] = [
            (families.requests, list(requests.items())),
            (families.errors, list(errors.items())),
            (families.deployment_errors, list(deployment_errors.items())),
            (families.latency, list(latency.items())),
        ]
        if ongoing is not None:
            node_id, node_ip, now = ongoing
            out.append((families.ongoing, [((node_id, node_ip), float(now))]))
        return out


def _add(counts: dict[tuple[str, ...], float], key: tuple[str, ...], n: float) -> None:
    counts[key] = counts.get(key, 0.0) + n
