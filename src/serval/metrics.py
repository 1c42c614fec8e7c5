"""Custom metrics, as ``ray.serve.metrics``: ``Counter``, ``Gauge`` and ``Histogram``.

Create them in a deployment (usually in its constructor) and record from any method, sync or
async. Inside a replica every series also carries the tags ``deployment``, ``replica`` and
``application``, which are therefore reserved. The proxy serves every replica's metrics, and
serval's own, in the Prometheus text format at ``/-/metrics``. Unlike Ray, serval prefixes
nothing: a counter named ``my_counter`` is exported as ``my_counter_total``.

Metrics recorded outside replicas (in a driver script) stay in that process: nothing collects
them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from serval._private.caller import runtime
from serval._private.telemetry.metrics import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    REGISTRY,
    SERVE_TAGS,
    Family,
    check_boundaries,
    check_name,
    check_tag_keys,
)

__all__ = ["Counter", "Gauge", "Histogram"]


class _Metric:
    _kind = ""

    def __init__(
        self,
        name: str,
        description: str = "",
        tag_keys: tuple[str, ...] | None = None,
        *,
        _boundaries: Sequence[float] = (),
    ) -> None:
        check_name(name)
        keys = check_tag_keys(tag_keys)
        for reserved in SERVE_TAGS:
            if reserved in keys:
                raise ValueError(f"tag key {reserved!r} is reserved: serval sets it in replicas")
        self._name = name
        self._description = description
        self._user_keys = keys
        self._boundaries = tuple(_boundaries)
        self._default_tags: dict[str, str] = {}
        me = runtime.replica()
        self._serve_tags: tuple[str, ...] = (
            () if me is None else (me.deployment, me.replica_id, me.app)
        )
        all_keys = (SERVE_TAGS if me is not None else ()) + keys
        self._family = Family(name, self._kind, description, all_keys, self._boundaries)
        REGISTRY.register(self._family)

    def set_default_tags(self, default_tags: Mapping[str, str]) -> Any:
        """Tag values used when a record names none; returns the metric itself."""
        self._default_tags = dict(self._check_tags(default_tags))
        return self

    @property
    def info(self) -> dict[str, Any]:
        return {
            "name": self._name,
            "description": self._description,
            "tag_keys": self._user_keys,
            "default_tags": dict(self._default_tags),
        }

    def _key(self, tags: Mapping[str, str] | None) -> tuple[str, ...]:
        values = self._default_tags
        if tags:
            values = {**values, **self._check_tags(tags)}
        missing = [k for k in self._user_keys if k not in values]
        if missing:
            raise ValueError(
                f"metric {self._name!r} needs a value for tag key(s) {missing}: pass tags=... "
                "or call set_default_tags()"
            )
        return self._serve_tags + tuple(values[k] for k in self._user_keys)

    def _check_tags(self, tags: Mapping[str, str]) -> Mapping[str, str]:
        for key, value in tags.items():
            if key not in self._user_keys:
                raise ValueError(
                    f"metric {self._name!r} has no tag key {key!r} (its tag keys: "
                    f"{self._user_keys})"
                )
            if not isinstance(value, str):
                raise TypeError(f"tag {key!r} of metric {self._name!r} must be a str: {value!r}")
        return tags

    def __reduce__(self) -> tuple[Any, ...]:
        # Recreated where it lands (a class shipped by value may hold one): the registry and
        # the replica's tags belong to the process that records.
        return (
            _rebuild,
            (
                type(self),
                self._name,
                self._description,
                self._user_keys,
                self._boundaries,
                self._default_tags,
            ),
        )


def _rebuild(
    cls: type[_Metric],
    name: str,
    description: str,
    tag_keys: tuple[str, ...],
    boundaries: tuple[float, ...],
    default_tags: dict[str, str],
) -> _Metric:
    metric = cls.__new__(cls)
    _Metric.__init__(metric, name, description, tag_keys, _boundaries=boundaries)
    metric._default_tags = default_tags
    return metric


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number, got {value!r}")
    return float(value)


class Counter(_Metric):
    """A count that only goes up (Prometheus counter, exported as ``<name>_total``)."""

    _kind = COUNTER

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        amount = _number(value, "a counter's increment")
        if not amount > 0:
            raise ValueError(f"a counter's increment must be > 0, got {value!r}")
        REGISTRY.add(self._name, self._key(tags), amount)


class Gauge(_Metric):
    """A value that goes up and down; the last one set is exported."""

    _kind = GAUGE

    def set(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        REGISTRY.set(self._name, self._key(tags), _number(value, "a gauge's value"))


class Histogram(_Metric):
    """Observed values counted into buckets with these upper ``boundaries`` (plus +Inf)."""

    _kind = HISTOGRAM

    def __init__(
        self,
        name: str,
        description: str = "",
        boundaries: Sequence[float] | None = None,
        tag_keys: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(name, description, tag_keys, _boundaries=check_boundaries(boundaries))

    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        REGISTRY.observe(self._name, self._key(tags), _number(value, "an observed value"))
