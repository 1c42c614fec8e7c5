"""A process's metrics: the values its counters, gauges and histograms hold, and their
Prometheus text form.

Each serval process has one registry. A replica's registry holds the user's metrics
(``serval.metrics``) and the replica's own (requests, errors, requests running); the controller
gathers the replicas' snapshots when the proxy's ``/-/metrics`` is read, and the proxy renders
them. Snapshots are plain tuples, so they pickle without the registry's lock.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_TAG = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

# (bucket counts, one per boundary and one for +Inf; sum; count)
HistogramValue = tuple[list[int], float, int]


@dataclass(frozen=True)
class Family:
    """What a metric is: its name, kind, help text, tag keys and (histograms) boundaries."""

    name: str
    kind: str
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


# A family's series: (tag values in tag_keys order, value) each.
Series = list[tuple[tuple[str, ...], float | HistogramValue]]
# Families and their series.
Snapshot = list[tuple[Family, Series]]

# The buckets of serval's own latency histograms, in milliseconds.
_LATENCY_MS = "0.1 0.25 0.5 1 2.5 5 10 25 50 100 250 500 1000 2500 5000 10000 60000"
LATENCY_BOUNDARIES_MS: tuple[float, ...] = tuple(float(ms) for ms in _LATENCY_MS.split())
# Ray Serve's buckets (its DEFAULT_LATENCY_BUCKET_MS, in milliseconds, 1 ms to 10 min), for
# the metrics a Ray Serve dashboard reads with its own bucket edges: the proxies' request
# latency and the multiplexed models' load and unload times.
_SERVE_MS = "1 2 5 10 20 50 100 200 300 400 500 1000 2000 5000 10000 60000 120000 300000 600000"
SERVE_LATENCY_BOUNDARIES_MS: tuple[float, ...] = tuple(float(ms) for ms in _SERVE_MS.split())

# serval's own metrics, reported by each replica (Ray Serve's names without its "ray_"
# prefix), in the order Replica.rpc_export_metrics gives their values. No user metric may
# take one of their names.
# The tags every series recorded in a replica carries, in this order (its values come first).
SERVE_TAGS = ("deployment", "replica", "application")
OWN_FAMILIES = (
    Family(
        "serve_deployment_request_counter",
        COUNTER,
        "Requests this replica has answered.",
        SERVE_TAGS,
    ),
    Family(
        "serve_deployment_error_counter",
        COUNTER,
        "Answered requests whose call raised.",
        SERVE_TAGS,
    ),
    Family("serve_replica_processing_queries", GAUGE, "Requests running here.", SERVE_TAGS),
    Family("serve_replica_pending_queries", GAUGE, "Requests waiting here for a slot.", SERVE_TAGS),
    Family(
        "serve_deployment_processing_latency_ms",
        HISTOGRAM,
        "Time from a request's start in this replica to its answer, in milliseconds.",
        SERVE_TAGS,
        LATENCY_BOUNDARIES_MS,
    ),
)


@dataclass(frozen=True)
class IngressFamilies:
    """A proxy's metrics of one protocol's requests (Ray Serve's names and tags): "route" is
    the route prefix matched (gRPC: the application), "" for none and for the system routes;
    "method" the HTTP method (gRPC: the service method's path); "status_code" the HTTP status
    (gRPC: the code's name); "error_code" the same, for the 4xx/5xx (gRPC: not OK) only."""

    requests: Family
    errors: Family
    deployment_errors: Family
    latency: Family
    ongoing: Family

    def all(self) -> tuple[Family, ...]:
        return (self.requests, self.errors, self.deployment_errors, self.latency, self.ongoing)


def _ingress_families(protocol: str, label: str) -> IngressFamilies:
    return IngressFamilies(
        Family(
            f"serve_num_{protocol}_requests",
            COUNTER,
            f"The number of {label} requests processed.",
            ("route", "method", "application", "status_code"),
        ),
        Family(
            f"serve_num_{protocol}_error_requests",
            COUNTER,
            f"The number of errored {label} responses.",
            ("route", "error_code", "method", "application"),
        ),
        Family(
            f"serve_num_deployment_{protocol}_error_requests",
            COUNTER,
            f"The number of errored {label} responses returned by each deployment.",
            ("deployment", "error_code", "method", "route", "application"),
        ),
        Family(
            f"serve_{protocol}_request_latency_ms",
            HISTOGRAM,
            f"The end-to-end latency of {label} requests (measured from the proxy).",
            ("method", "route", "application", "status_code"),
            SERVE_LATENCY_BOUNDARIES_MS,
        ),
        Family(
            f"serve_num_ongoing_{protocol}_requests",
            GAUGE,
            f"The number of ongoing requests in this {label} proxy.",
            ("node_id", "node_ip_address"),
        ),
    )


HTTP_FAMILIES = _ingress_families("http", "HTTP")
GRPC_FAMILIES = _ingress_families("grpc", "gRPC")
# The controller's, from its replica table at each scrape (no work per request): each
# replica's health (1 running and passing its health checks, 0 starting or stopping), and how
# many replicas each deployment has started (restarts after failures included).
REPLICA_HEALTHY = Family(
    "serve_deployment_replica_healthy",
    GAUGE,
    "1 for a replica running and healthy, 0 for one starting or stopping.",
    SERVE_TAGS,
)
REPLICA_STARTS = Family(
    "serve_deployment_replica_starts",
    COUNTER,
    "Replicas of the deployment started, restarts after a failure included.",
    ("deployment", "application"),
)
QUEUED_AT_CALLERS = Family(
    "serve_deployment_queued_queries",
    GAUGE,
    "Requests waiting at callers (handles, proxies) for a replica of the deployment.",
    ("deployment", "application"),
)
# A replica's @serve.multiplexed model cache (Ray Serve's names and buckets), recorded when
# a model is asked for, loaded or unloaded.
MULTIPLEX_FAMILIES = (
    Family(
        "serve_multiplexed_model_load_latency_ms",
        HISTOGRAM,
        "The time it takes to load a model.",
        SERVE_TAGS,
        SERVE_LATENCY_BOUNDARIES_MS,
    ),
    Family(
        "serve_multiplexed_model_unload_latency_ms",
        HISTOGRAM,
        "The time it takes to unload a model.",
        SERVE_TAGS,
        SERVE_LATENCY_BOUNDARIES_MS,
    ),
    Family("serve_num_multiplexed_models", GAUGE, "Models loaded in this replica.", SERVE_TAGS),
    Family(
        "serve_registered_multiplexed_model_id",
        GAUGE,
        "1 for each model id loaded in this replica.",
        (*SERVE_TAGS, "model_id"),
    ),
    Family(
        "serve_multiplexed_get_model_requests_counter",
        COUNTER,
        "Calls of this replica's multiplexed model getter.",
        SERVE_TAGS,
    ),
    Family("serve_multiplexed_models_unload_counter", COUNTER, "Models unloaded here.", SERVE_TAGS),
    Family("serve_multiplexed_models_load_counter", COUNTER, "Models loaded here.", SERVE_TAGS),
)
OWN_NAMES = frozenset(
    f.name
    for f in (
        *OWN_FAMILIES,
        *HTTP_FAMILIES.all(),
        *GRPC_FAMILIES.all(),
        REPLICA_HEALTHY,
        REPLICA_STARTS,
        QUEUED_AT_CALLERS,
        *MULTIPLEX_FAMILIES,
    )
)


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"metric name {name!r} is not valid: use letters, digits, '_' and ':', and do not "
            "start with a digit"
        )
    if name in OWN_NAMES:
        raise ValueError(f"metric name {name!r} is taken by one of serval's own metrics")
    return name


def check_tag_keys(tag_keys: object) -> tuple[str, ...]:
    if tag_keys is None:
        return ()
    if isinstance(tag_keys, str) or not isinstance(tag_keys, Iterable):
        raise TypeError(f"tag_keys must be a tuple of strings, got {tag_keys!r}")
    keys = tuple(tag_keys)
    for key in keys:
        if not isinstance(key, str) or not _TAG.match(key):
            raise ValueError(f"tag key {key!r} is not valid: use letters, digits and '_'")
    if len(set(keys)) != len(keys):
        raise ValueError(f"tag_keys has a key twice: {keys}")
    return keys


def check_boundaries(boundaries: object) -> tuple[float, ...]:
    if isinstance(boundaries, str) or not isinstance(boundaries, Sequence) or not boundaries:
        raise ValueError(f"boundaries must be a non-empty list of numbers, got {boundaries!r}")
    out = tuple(float(b) for b in boundaries)
    if any(math.isnan(b) or math.isinf(b) for b in out):
        raise ValueError(f"boundaries must be finite numbers, got {boundaries!r}")
    if any(a >= b for a, b in itertools.pairwise(out)):
        raise ValueError(f"boundaries must be strictly increasing, got {boundaries!r}")
    return out


class HistogramSeries:
    """One histogram series' counts. Not locked: one thread records it (a replica's loop), or
    the registry's lock guards it."""

    __slots__ = ("_boundaries", "_buckets", "_count", "_sum")

    def __init__(self, boundaries: tuple[float, ...]) -> None:
        self._boundaries = boundaries
        self._buckets = [0] * (len(boundaries) + 1)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value on a boundary counts in that boundary's bucket (le, "<=")
        self._buckets[bisect.bisect_left(self._boundaries, value)] += 1
        self._sum += value
        self._count += 1

    def value(self) -> HistogramValue:
        return (list(self._buckets), self._sum, self._count)


class Registry:
    """The metric families of this process and their values; any thread may record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, Family] = {}
        self._values: dict[str, dict[tuple[str, ...], float | HistogramSeries]] = {}

    def register(self, family: Family) -> None:
        """Declare a family; declaring the same one again is fine (a second replica object,
        a reconfigure), declaring a different one under its name is an error."""
        with self._lock:
            known = self._families.get(family.name)
            if known is None:
                self._families[family.name] = family
                self._values[family.name] = {}
            elif known != family:
                raise ValueError(
                    f"metric {family.name!r} is already declared in this process as a "
                    f"{known.kind} with tag keys {known.tag_keys}"
                    + (f" and boundaries {known.boundaries}" if known.boundaries else "")
                )

    def add(self, name: str, key: tuple[str, ...], amount: float) -> None:
        with self._lock:
            series = self._values[name]
            series[key] = series.get(key, 0.0) + amount  # type: ignore[operator]

    def set(self, name: str, key: tuple[str, ...], value: float) -> None:
        with self._lock:
            self._values[name][key] = value

    def observe(self, name: str, key: tuple[str, ...], value: float) -> None:
        with self._lock:
            series = self._values[name]
            histogram = series.get(key)
            if not isinstance(histogram, HistogramSeries):
                histogram = series[key] = HistogramSeries(self._families[name].boundaries)
            histogram.observe(value)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return [
                (family, [(k, _value(v)) for k, v in self._values[name].items()])
                for name, family in self._families.items()
            ]


def _value(value: float | HistogramSeries) -> float | HistogramValue:
    return value.value() if isinstance(value, HistogramSeries) else value


REGISTRY = Registry()


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """One snapshot from several processes'. Series are told apart by their tags (a replica's
    carry its id); a series with the same tags in several (the HTTP proxies of several nodes
    count the same routes) is summed. A family declared differently by two processes keeps
    the first shape."""
    families: dict[str, Family] = {}
    series: dict[str, dict[tuple[str, ...], float | HistogramValue]] = {}
    for snapshot in snapshots:
        for family, values in snapshot:
            known = families.setdefault(family.name, family)
            if known != family:
                continue
            merged = series.setdefault(family.name, {})
            for tags, value in values:
                before = merged.get(tags)
                if before is None:
                    merged[tags] = value
                elif isinstance(before, float) and isinstance(value, float):
                    merged[tags] = before + value  # the same series in two proxies: summed
                elif isinstance(before, tuple) and isinstance(value, tuple):
                    merged[tags] = add_histograms(before, value)
    return [(families[name], list(series[name].items())) for name in families]


def add_histograms(a: HistogramValue, b: HistogramValue) -> HistogramValue:
    """Two counts of one histogram (the same boundaries) as one."""
    buckets = [x + y for x, y in zip(a[0], b[0], strict=True)]
    return (buckets, a[1] + b[1], a[2] + b[2])


def render(snapshot: Snapshot) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for family, values in sorted(snapshot, key=lambda fv: fv[0].name):
        if not values:
            continue  # declared, never recorded: nothing to say yet
        name = family.name + ("_total" if family.kind == COUNTER else "")
        lines.append(f"# HELP {name} {_escape_help(family.description or family.name)}")
        lines.append(f"# TYPE {name} {family.kind}")
        for key, value in sorted(values, key=lambda kv: kv[0]):
            labels = list(zip(family.tag_keys, key, strict=True))
            if isinstance(value, tuple):
                buckets, total, count = value
                running = 0
                edges = [*(_number(b) for b in family.boundaries), "+Inf"]
                for edge, n in zip(edges, buckets, strict=True):
                    running += n
                    lines.append(f"{name}_bucket{_labels([*labels, ('le', edge)])} {running}")
                lines.append(f"{name}_sum{_labels(labels)} {_number(total)}")
                lines.append(f"{name}_count{_labels(labels)} {count}")
            else:
                lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return "\n".join(lines) + "\n" if lines else ""


def _labels(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in pairs) + "}"


def _escape_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value)) if value != int(value) else str(int(value))
