"""Faults under load, short form (the long form: benchmarks/chaos/run.py): the issue's goals are
asserted as they stand; only the load and the duration are smaller."""

from __future__ import annotations

import pytest

from chaos import faults


def test_replica_sigkill_under_load() -> None:
    faults.replica_kill(duration_s=6, kills=2, handles=2, conns=2).assert_goals()


@pytest.mark.parametrize("mode", ["kill", "stall", "slow-restart"])
def test_controller_fault_under_load(mode: str) -> None:
    faults.controller_fault(mode, stall_s=2.0, handles=2, conns=2, settle_s=1.0).assert_goals()


def test_proxy_sigkill_under_load() -> None:
    faults.proxy_kill(kills=1, handles=2, conns=2, settle_s=1.0).assert_goals()


def test_rolling_update_under_load() -> None:
    faults.rolling_update(updates=1, handles=2, conns=2).assert_goals()
