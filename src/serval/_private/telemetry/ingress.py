"""A proxy's metrics of the requests it answers, for one protocol (Ray Serve's
``serve_num_<protocol>_requests`` family: ``metrics.IngressFamilies``).

A request's end costs the proxy's loop one list append; the requests ended are folded into
their series in batches (when ``_FOLD_AT`` are waiting, and at each scrape). One histogram
series per (route, method, application, deployment, status) holds everything the families
show: the request count is its count, the error counts are those of error statuses. Not
locked: the proxy's loop thread alone records, folds and reads it.
"""

from __future__ import annotations

from collections.abc import Callable

from serval._private.telemetry.metrics import (
    Family,
    HistogramSeries,
    HistogramValue,
    IngressFamilies,
    Snapshot,
    add_histograms,
)

# (route, method, application, deployment, status): a series of the latency histogram
_Key = tuple[str, str, str, str, int | str]
_Series = list[tuple[tuple[str, ...], float | HistogramValue]]

# Requests ended that wait for a fold at most: a bound on the memory they hold between scrapes
# (a few tens of bytes each), large enough that a fold's setup is spread thin.
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
        self._ended: list[tuple[_Key, float]] = []
        self._series: dict[_Key, HistogramSeries] = {}

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
        ended = self._ended
        ended.append(((route, method, application, deployment, status), latency_s))
        if len(ended) >= _FOLD_AT:
            self.fold()

    def fold(self) -> None:
        """Count the requests ended since the last fold into their series."""
        ended, self._ended = self._ended, []
        series = self._series
        boundaries = self.families.latency.boundaries
        for key, latency_s in ended:
            histogram = series.get(key)
            if histogram is None:
                histogram = series[key] = HistogramSeries(boundaries)
            histogram.observe(latency_s * 1000.0)

    def total(self) -> int:
        """How many requests have ended."""
        self.fold()
        return sum(histogram.value()[2] for histogram in self._series.values())

    def snapshot(self, ongoing: tuple[str, str, int] | None = None) -> Snapshot:
        """The families' series as they are now; ``ongoing``: (node id, node IP, requests
        being answered) for the gauge, when the proxy counts them."""
        self.fold()
        requests: dict[tuple[str, ...], float] = {}
        errors: dict[tuple[str, ...], float] = {}
        deployment_errors: dict[tuple[str, ...], float] = {}
        latency: dict[tuple[str, ...], HistogramValue] = {}
        for (route, method, app, deployment, status), histogram in self._series.items():
            code = str(status)
            value = histogram.value()
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
        out: list[tuple[Family, _Series]] = [
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
