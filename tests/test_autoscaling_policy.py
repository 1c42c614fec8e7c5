"""The autoscaling decision, tested as a pure function with a fake clock (plain floats)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serval._private.controller.autoscaling import AutoscalingPolicy
from serval.config import AutoscalingConfig


def make(**kw: Any) -> AutoscalingConfig:
    base: dict[str, Any] = dict(
        min_replicas=1,
        max_replicas=10,
        target_ongoing_requests=2.0,
        upscale_delay_s=30.0,
        downscale_delay_s=600.0,
        metrics_interval_s=10.0,
        look_back_period_s=30.0,
    )
    base.update(kw)
    return AutoscalingConfig(**base)


class Sim:
    """A controller loop in miniature: every `step` seconds, record one sample then decide."""

    def __init__(self, config: AutoscalingConfig, step: float = 1.0) -> None:
        self.now = 0.0
        self.step = step
        self.policy = AutoscalingPolicy(config, self.now)
        self.current = self.policy.initial_replicas()

    def tick(self, ongoing: float) -> int:
        self.now += self.step
        self.policy.record(self.now, ongoing)
        self.current = self.policy.decide(self.now, self.current)
        return self.current

    def run(self, ongoing: float, seconds: float) -> list[tuple[float, int]]:
        """Hold `ongoing` for `seconds`; the (time, target) after each tick."""
        out = []
        for _ in range(round(seconds / self.step)):
            out.append((self.now + self.step, self.tick(ongoing)))
        return out


def first_change(trace: list[tuple[float, int]], start: int) -> tuple[float, int] | None:
    for t, n in trace:
        if n != start:
            return t, n
    return None


# -- initial replicas ------------------------------------------------------------------------


def test_initial_replicas_defaults_to_min() -> None:
    assert AutoscalingPolicy(make(min_replicas=2), 0.0).initial_replicas() == 2
    assert AutoscalingPolicy(make(min_replicas=0), 0.0).initial_replicas() == 0


def test_initial_replicas_when_set() -> None:
    assert AutoscalingPolicy(make(min_replicas=1, initial_replicas=4), 0.0).initial_replicas() == 4


# -- steady, spike, drop ---------------------------------------------------------------------


def test_steady_load_keeps_count() -> None:
    sim = Sim(make(initial_replicas=3))
    # 6 ongoing at target 2 -> exactly 3 replicas, for a long time.
    trace = sim.run(6, 2000)
    assert {n for _, n in trace} == {3}


def test_spike_scales_up_only_after_upscale_delay() -> None:
    sim = Sim(make(upscale_delay_s=30.0, look_back_period_s=5.0))
    sim.run(2, 50)  # steady at 1
    assert sim.current == 1
    t0 = sim.now
    trace = sim.run(8, 60)  # wants ceil(8/2) = 4 once the window is full of the spike
    change = first_change(trace, 1)
    assert change is not None
    t, _ = change
    assert t - t0 >= 30.0
    assert t - t0 <= 31.0  # and not much later: the timer started with the first spike sample
    assert sim.current == 4


def test_spike_capped_at_max() -> None:
    sim = Sim(make(max_replicas=5, upscale_delay_s=10.0))
    sim.run(1000, 100)
    assert sim.current == 5


def test_upscale_exact_ceil() -> None:
    sim = Sim(make(target_ongoing_requests=3.0, upscale_delay_s=0.0, look_back_period_s=0.0))
    assert sim.tick(10) == 4  # ceil(10/3)
    assert sim.tick(9) == 4  # ceil(9/3) = 3, but downscale waits downscale_delay_s


def test_load_drop_scales_down_only_after_downscale_delay() -> None:
    sim = Sim(make(initial_replicas=8, downscale_delay_s=600.0, look_back_period_s=10.0))
    sim.run(16, 20)
    assert sim.current == 8
    t0 = sim.now
    trace = sim.run(4, 700)  # wants 2
    change = first_change(trace, 8)
    assert change is not None
    t, n = change
    assert 600.0 <= t - t0 <= 611.0
    assert n == 2
    assert sim.current == 2


def test_flapping_load_resets_delays() -> None:
    sim = Sim(
        make(
            initial_replicas=2, upscale_delay_s=10.0, downscale_delay_s=10.0, look_back_period_s=0.0
        )
    )
    # Alternate up-wanting and down-wanting load every 5 s: neither delay ever elapses.
    for _ in range(40):
        sim.run(10, 5)  # wants 5
        sim.run(0, 5)  # wants 1
    assert sim.current == 2
    # A "no change" decision resets too: 9 s up, 1 s steady, 9 s up -> still 2.
    sim.run(4, 1)
    sim.run(10, 9)
    sim.run(4, 1)
    sim.run(10, 9)
    assert sim.current == 2
    # Holding it long enough finally applies.
    sim.run(10, 10)
    assert sim.current == 5


# -- look-back window ------------------------------------------------------------------------


def test_look_back_window_averages_samples() -> None:
    cfg = make(upscale_delay_s=0.0, downscale_delay_s=0.0, look_back_period_s=10.0)
    p = AutoscalingPolicy(cfg, 0.0)
    for t, v in [(1.0, 2.0), (2.0, 4.0), (3.0, 12.0)]:
        p.record(t, v)
    # mean(2, 4, 12) = 6 -> ceil(6 / 2) = 3
    assert p.decide(3.0, 1) == 3


def test_look_back_drops_old_samples() -> None:
    cfg = make(upscale_delay_s=0.0, downscale_delay_s=0.0, look_back_period_s=10.0)
    p = AutoscalingPolicy(cfg, 0.0)
    p.record(0.0, 100.0)
    p.record(15.0, 2.0)
    # The sample at t=0 is older than 10 s: only 2 counts -> 1 replica.
    assert p.decide(15.0, 1) == 1
    # At t=5 both were in the window: mean 51 -> 26, capped at 10. (Dropped samples stay dropped.)
    p2 = AutoscalingPolicy(cfg, 0.0)
    p2.record(0.0, 100.0)
    p2.record(5.0, 2.0)
    assert p2.decide(5.0, 1) == 10


def test_no_sample_in_window_is_zero_load() -> None:
    cfg = make(min_replicas=1, initial_replicas=5, downscale_delay_s=0.0, look_back_period_s=5.0)
    p = AutoscalingPolicy(cfg, 0.0)
    p.record(0.0, 100.0)
    assert p.decide(100.0, 5) == 1  # the old sample is gone: load 0 -> min


# -- factors ---------------------------------------------------------------------------------


def test_upscaling_factor_scales_the_change() -> None:
    cfg = make(max_replicas=100, upscale_delay_s=0.0, look_back_period_s=0.0, upscaling_factor=0.5)
    p = AutoscalingPolicy(cfg, 0.0)
    p.record(1.0, 40.0)  # raw 20
    assert p.decide(1.0, 2) == 11  # 2 + 0.5 * 18
    p.record(2.0, 6.0)  # raw 3, 2 + 0.5 = 2.5 -> rounds up to 3
    assert p.decide(2.0, 2) == 3


def test_upscaling_factor_moves_at_least_one() -> None:
    cfg = make(upscale_delay_s=0.0, look_back_period_s=0.0, upscaling_factor=0.01)
    p = AutoscalingPolicy(cfg, 0.0)
    p.record(1.0, 20.0)
    assert p.decide(1.0, 1) == 2


def test_aggressive_upscaling_factor_capped_at_max() -> None:
    cfg = make(max_replicas=6, upscale_delay_s=0.0, look_back_period_s=0.0, upscaling_factor=3.0)
    p = AutoscalingPolicy(cfg, 0.0)
    p.record(1.0, 8.0)  # raw 4: 1 + 3 * 3 = 10 -> capped at 6
    assert p.decide(1.0, 1) == 6


def test_downscaling_factor_scales_the_change() -> None:
    cfg = make(
        max_replicas=20, downscale_delay_s=0.0, look_back_period_s=0.0, downscaling_factor=0.5
    )
    p = AutoscalingPolicy(cfg, 0.0)
    p.record(1.0, 4.0)  # raw 2
    assert p.decide(1.0, 10) == 6  # 10 - 0.5 * 8
    assert p.decide(1.0, 6) == 4
    assert p.decide(1.0, 4) == 3
    assert p.decide(1.0, 3) == 2  # 2.5 -> 3 would not move: at least one step
    assert p.decide(1.0, 2) == 2


def test_downscaling_factor_never_below_need() -> None:
    cfg = make(
        max_replicas=20, downscale_delay_s=0.0, look_back_period_s=0.0, downscaling_factor=5.0
    )
    p = AutoscalingPolicy(cfg, 0.0)
    p.record(1.0, 8.0)  # raw 4
    assert p.decide(1.0, 10) == 4


# -- clamps ----------------------------------------------------------------------------------


def test_min_clamp() -> None:
    sim = Sim(make(min_replicas=3, downscale_delay_s=0.0))
    sim.run(0, 100)
    assert sim.current == 3


def test_max_clamp() -> None:
    sim = Sim(make(max_replicas=4, upscale_delay_s=0.0))
    sim.run(100, 10)
    assert sim.current == 4


def test_out_of_bounds_current_is_fixed_at_once() -> None:
    p = AutoscalingPolicy(make(min_replicas=2, max_replicas=4), 0.0)
    assert p.decide(0.0, 9) == 4
    assert p.decide(0.0, 1) == 2


# -- zero ------------------------------------------------------------------------------------


def test_scale_from_zero_is_immediate() -> None:
    cfg = make(min_replicas=0, upscale_delay_s=3600.0)
    p = AutoscalingPolicy(cfg, 0.0)
    assert p.initial_replicas() == 0
    assert p.decide(1.0, 0) == 0  # nothing waiting: stay at 0
    p.record(2.0, 1.0)
    assert p.decide(2.0, 0) == 1  # a request waits: a replica at once


def test_scale_from_zero_sizes_for_the_burst() -> None:
    cfg = make(min_replicas=0, upscale_delay_s=3600.0, look_back_period_s=0.0)
    p = AutoscalingPolicy(cfg, 0.0)
    p.record(1.0, 7.0)
    assert p.decide(1.0, 0) == 4  # ceil(7/2)


def test_scale_from_zero_respects_min_and_max() -> None:
    cfg = make(min_replicas=0, max_replicas=2, upscale_delay_s=3600.0, look_back_period_s=0.0)
    p = AutoscalingPolicy(cfg, 0.0)
    p.record(1.0, 100.0)
    assert p.decide(1.0, 0) == 2


def test_scale_to_zero_after_downscale_delay() -> None:
    sim = Sim(
        make(min_replicas=0, initial_replicas=3, downscale_delay_s=100.0, look_back_period_s=10.0)
    )
    sim.run(6, 20)
    assert sim.current == 3
    t0 = sim.now
    trace = sim.run(0, 200)
    # Zero load only once the window has emptied of the old samples (10 s), then 100 s.
    zero_at = next(t for t, n in trace if n == 0)
    assert 110.0 <= zero_at - t0 <= 112.0
    assert all(n >= 1 for t, n in trace if t < zero_at)
    assert sim.current == 0
    # And scale from zero again, immediately.
    assert sim.tick(1) == 1


def test_scale_to_zero_needs_zero_load_for_the_whole_delay() -> None:
    sim = Sim(
        make(min_replicas=0, initial_replicas=4, downscale_delay_s=100.0, look_back_period_s=0.0)
    )
    sim.run(1, 90)  # wants 1 for 90 s
    sim.run(0, 20)  # zero load from t=91: the downscale delay elapses at t=101, not the zero one
    assert sim.current == 1
    sim.run(0, 80)  # t=190: zero load for 99 s
    assert sim.current == 1
    sim.run(0, 1)  # t=191: 100 s
    assert sim.current == 0


def test_no_scale_to_zero_when_min_positive() -> None:
    sim = Sim(make(min_replicas=1, initial_replicas=2, downscale_delay_s=0.0))
    sim.run(0, 1000)
    assert sim.current == 1


# -- properties ------------------------------------------------------------------------------

configs = st.builds(
    lambda lo, span, target, up, down, look, uf, df: AutoscalingConfig(
        min_replicas=lo,
        max_replicas=max(lo, 1) + span,
        target_ongoing_requests=target,
        upscale_delay_s=up,
        downscale_delay_s=down,
        look_back_period_s=look,
        upscaling_factor=uf,
        downscaling_factor=df,
    ),
    st.integers(0, 3),
    st.integers(0, 6),
    st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    st.sampled_from([0.0, 1.0, 5.0, 30.0]),
    st.sampled_from([0.0, 1.0, 5.0, 60.0]),
    st.sampled_from([0.0, 1.0, 5.0, 30.0]),
    st.none() | st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    st.none() | st.sampled_from([0.25, 0.5, 1.0, 2.0]),
)

# Each event: (time step, samples to record now or None).
events = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0, 20.0]),
        st.none() | st.lists(st.integers(0, 40), min_size=1, max_size=3),
    ),
    max_size=80,
)


def _mean(samples: list[tuple[float, float]], now: float, look: float) -> float:
    window = [v for t, v in samples if now - look <= t <= now]
    return sum(window) / len(window) if window else 0.0


@settings(max_examples=400, deadline=None)
@given(configs, events)
def test_decision_bounded_and_delayed(cfg: AutoscalingConfig, evs: list[Any]) -> None:
    now = 0.0
    policy = AutoscalingPolicy(cfg, now)
    current = policy.initial_replicas()
    samples: list[tuple[float, float]] = []
    # Per decision: (time, wanted direction, load == 0), computed independently of the policy.
    history: list[tuple[float, int, bool]] = []

    for step, values in evs:
        now += step
        for v in values or []:
            policy.record(now, float(v))
            samples.append((now, float(v)))
        load = _mean(samples, now, cfg.look_back_period_s)
        wanted = min(
            cfg.max_replicas, max(cfg.min_replicas, math.ceil(load / cfg.target_ongoing_requests))
        )
        want = (wanted > current) - (wanted < current)
        history.append((now, want, load == 0))

        new = policy.decide(now, current)
        assert cfg.min_replicas <= new <= cfg.max_replicas
        moved = (new > current) - (new < current)
        if moved == 0:
            current = new
            continue
        # It moves only the way the load asks (the factors change the size, not the sign).
        assert moved == want
        if current == 0 and load > 0:
            assert new >= 1  # scale from zero: immediate
            current = new
            continue
        # The same direction has been wanted on every decision for the whole delay.
        delay = cfg.upscale_delay_s if moved > 0 else cfg.downscale_delay_s
        run_start = now
        for t, w, _ in reversed(history):
            if w != moved:
                break
            run_start = t
        assert now - run_start >= delay
        if new == 0:
            # To zero: min 0 and zero load on every decision for downscale_delay_s.
            assert cfg.min_replicas == 0
            zero_start = now
            for t, _, z in reversed(history):
                if not z:
                    break
                zero_start = t
            assert load == 0 and now - zero_start >= cfg.downscale_delay_s
        current = new


@settings(max_examples=200, deadline=None)
@given(configs, st.lists(st.integers(0, 40), max_size=60))
def test_decision_is_deterministic(cfg: AutoscalingConfig, loads: list[int]) -> None:
    def trace() -> list[int]:
        p = AutoscalingPolicy(cfg, 0.0)
        cur = p.initial_replicas()
        out = []
        for i, v in enumerate(loads):
            p.record(float(i), float(v))
            cur = p.decide(float(i), cur)
            out.append(cur)
        return out

    assert trace() == trace()


def test_bad_samples_are_harmless() -> None:
    p = AutoscalingPolicy(make(upscale_delay_s=0.0, downscale_delay_s=0.0), 0.0)
    p.record(1.0, float("nan"))
    p.record(1.0, float("inf"))
    p.record(1.0, -5.0)
    assert p.decide(1.0, 1) == 1


@pytest.mark.parametrize("look", [0.0, 30.0])
def test_time_without_samples_eventually_scales_down(look: float) -> None:
    cfg = make(min_replicas=1, initial_replicas=6, downscale_delay_s=60.0, look_back_period_s=look)
    p = AutoscalingPolicy(cfg, 0.0)
    assert p.decide(0.0, 6) == 6
    assert p.decide(59.0, 6) == 6
    assert p.decide(60.0, 6) == 1
