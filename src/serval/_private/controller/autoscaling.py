"""The autoscaling decision: a pure function of load samples and time.

No clock, no I/O, no asyncio: every call is given ``now``, so the policy is unit-tested with a
fake clock (plain floats). The controller feeds it samples with :meth:`AutoscalingPolicy.record`
and asks :meth:`AutoscalingPolicy.decide` for the number of replicas it should target.

The semantics follow Ray Serve's default policy:

* load = mean of the samples taken within the last ``look_back_period_s`` (0 with no sample);
* raw desired = ``ceil(load / target_ongoing_requests)``;
* ``upscaling_factor`` / ``downscaling_factor`` scale the change from the current count, which
  still moves by at least one replica when the raw decision differs;
* the result is clamped to ``[min_replicas, max_replicas]``;
* a change is applied only once the same direction has been wanted on every decision for
  ``upscale_delay_s`` (up) or ``downscale_delay_s`` (down); a reversal or a "no change" resets it;
* at zero replicas, any load scales up at once (a waiting request must not wait for a delay);
* down to zero only when ``min_replicas == 0`` and the load has been 0 for ``downscale_delay_s``
  (``downscale_to_zero_delay_s`` when set).

A custom policy (``AutoscalingConfig.policy``) gives the raw number instead
(:meth:`AutoscalingPolicy.decide_custom`, its answer for this tick): the factors, the bounds
and the delays apply to it as above; 1 -> 0 waits ``downscale_to_zero_delay_s`` (else
``downscale_delay_s``) and a larger count goes down to one first. At zero replicas there is
no replica to run it: waiting requests bring up ``ceil(upscaling_factor)`` (at least one)
at once (:meth:`AutoscalingPolicy.cold_start`).
"""

from __future__ import annotations

import math
from collections import deque

from serval.config import AutoscalingConfig

__all__ = ["AutoscalingPolicy"]

_UP = 1
_STAY = 0
_DOWN = -1


class AutoscalingPolicy:
    """Decides a deployment's replica count from its load history. Deterministic."""

    def __init__(self, config: AutoscalingConfig, now: float) -> None:
        self._config = config
        # (time, ongoing, queued) in the order recorded; entries older than the look-back are
        # dropped. ongoing counts the queued requests too.
        self._samples: deque[tuple[float, float, float]] = deque()
        # The direction wanted on the previous decision(s) and since when it has been wanted.
        self._direction = _STAY
        self._direction_since = now
        # Since when the load has been 0 on every decision (None: it is not 0 now).
        self._zero_since: float | None = None

    @property
    def config(self) -> AutoscalingConfig:
        return self._config

    def initial_replicas(self) -> int:
        # Ray Serve: initial_replicas if set, else min_replicas.
        cfg = self._config
        return cfg.initial_replicas if cfg.initial_replicas is not None else cfg.min_replicas

    def record(self, now: float, ongoing: float, queued: float = 0.0) -> None:
        """One sample: total ongoing requests of the deployment.

        That is, requests running at its replicas plus those queued at callers (``queued``:
        those, for custom policies).
        """
        # A non-finite sample is ignored, a negative one counts as 0: load is never negative.
        if not (math.isfinite(ongoing) and math.isfinite(queued)):
            return
        self._samples.append((now, max(0.0, float(ongoing)), max(0.0, float(queued))))
        self._prune(now)

    def load(self, now: float) -> float:
        """Mean ongoing requests over the look-back (0 with no sample there)."""
        self._prune(now)
        return self._load(now)

    def queued(self, now: float) -> float:
        """Mean requests queued at callers over the look-back."""
        self._prune(now)
        return self._load(now, column=2)

    def decide(self, now: float, current: int) -> int:
        """The number of replicas wanted now, given `current` (the present target)."""
        cfg = self._config
        self._prune(now)
        load = self._load(now)

        # The zero-load timer is kept on every decision, whatever is returned.
        if load > 0:
            self._zero_since = None
        elif self._zero_since is None:
            self._zero_since = now

        raw = math.ceil(load / cfg.target_ongoing_requests)

        # Scale from zero: a request is waiting and nothing can serve it -> scale up now, no delay.
        if current <= 0 and load > 0:
            self._restart(now)
            return self._clamp(max(1, self._scaled(raw, 0)))

        # Hard bounds: a target outside [min, max] (e.g. after a config change) is fixed at once.
        if not cfg.min_replicas <= current <= cfg.max_replicas:
            self._restart(now)
            return self._clamp(current)

        desired = self._clamp(self._scaled(raw, current))
        direction = self._turn(now, desired, current)
        if direction == _STAY:
            return current
        elapsed = now - self._direction_since

        if direction == _UP:
            if elapsed < cfg.upscale_delay_s:
                return current
            self._restart(now)
            return desired

        if elapsed < cfg.downscale_delay_s:
            return current
        if desired == 0 and not self._zero_for(now, self._to_zero_delay()):
            # Down to zero needs zero load for downscale_delay_s; meanwhile stop at one replica
            # and keep the downscale timer running (the wish to go down has not changed).
            return 1 if current > 1 else current
        self._restart(now)
        return desired

    def decide_custom(self, now: float, current: int, wanted: float) -> int:
        """The number of replicas to target now, given `current` and what a custom policy
        wants this tick (its raw answer: a number >= 0, rounded up)."""
        cfg = self._config
        self._zero_since = None  # (the built-in's load timer: a custom policy decides zero)
        if not cfg.min_replicas <= current <= cfg.max_replicas:
            self._restart(now)
            return self._clamp(current)
        desired = self._clamp(self._scaled(math.ceil(wanted), current))
        if desired == 0 and current > 1:
            desired = 1  # down to zero from one replica only (its own delay)
        direction = self._turn(now, desired, current)
        if direction == _STAY:
            return current
        if direction == _UP:
            delay = cfg.upscale_delay_s
        elif desired == 0:
            delay = self._to_zero_delay()
        else:
            delay = cfg.downscale_delay_s
        if now - self._direction_since < delay:
            return current
        self._restart(now)
        return desired

    def cold_start(self, now: float) -> int:
        """For a custom policy at zero replicas with requests waiting: replicas now."""
        self._restart(now)
        factor = self._config.upscaling_factor
        return self._clamp(max(1, math.ceil(factor if factor is not None else 1.0)))

    # -- helpers ---------------------------------------------------------------------------

    def _turn(self, now: float, desired: int, current: int) -> int:
        """The direction from ``current`` to ``desired``. Hysteresis: a reversal or a "no
        change" decision restarts the timer."""
        direction = _UP if desired > current else _DOWN if desired < current else _STAY
        if direction != self._direction:
            self._direction = direction
            self._direction_since = now
        return direction

    def _prune(self, now: float) -> None:
        # Samples older than the look-back window are dropped for good.
        cutoff = now - self._config.look_back_period_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()

    def _load(self, now: float, column: int = 1) -> float:
        # Mean of the samples in [now - look_back_period_s, now]; 0 with no sample there.
        cutoff = now - self._config.look_back_period_s
        window = [sample[column] for sample in self._samples if cutoff <= sample[0] <= now]
        if not window:
            return 0.0
        return sum(window) / len(window)

    def _scaled(self, raw: int, current: int) -> int:
        # The factor scales the change; rounding up, but always at least one step when raw
        # differs, and a downscale never goes below what the load needs (raw).
        cfg = self._config
        if raw > current:
            factor = cfg.upscaling_factor if cfg.upscaling_factor is not None else 1.0
            return max(current + 1, math.ceil(current + factor * (raw - current)))
        if raw < current:
            factor = cfg.downscaling_factor if cfg.downscaling_factor is not None else 1.0
            stepped = min(current - 1, math.ceil(current + factor * (raw - current)))
            return max(raw, stepped)
        return current

    def _clamp(self, n: int) -> int:
        return max(self._config.min_replicas, min(self._config.max_replicas, n))

    def _to_zero_delay(self) -> float:
        cfg = self._config
        delay = cfg.downscale_to_zero_delay_s
        return cfg.downscale_delay_s if delay is None else delay

    def _zero_for(self, now: float, duration: float) -> bool:
        return self._zero_since is not None and now - self._zero_since >= duration

    def _restart(self, now: float) -> None:
        # After a change is applied, the next change waits its full delay again.
        self._direction = _STAY
        self._direction_since = now
