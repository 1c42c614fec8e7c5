"""The cluster and its host, short form (the long form: benchmarks/chaos/run.py): the owner's
SIGKILL with blocked replicas, modules planted in the current directory, another Unix user."""

from __future__ import annotations

import pytest

from chaos import hosts
from chaos.harness import ScenarioSkipped


def test_driver_sigkill_with_blocked_replicas() -> None:
    hosts.driver_kill(rounds=1).assert_goals()


def test_planted_modules_in_the_cwd_are_not_imported() -> None:
    hosts.shadowing(crash=False).assert_goals()


def test_crashing_planted_modules_do_not_stop_the_cluster() -> None:
    hosts.shadowing(crash=True, start_timeout_s=20).assert_goals()


def test_another_unix_user_is_kept_out() -> None:
    try:
        report = hosts.other_user()
    except ScenarioSkipped as exc:
        pytest.skip(str(exc))
    report.assert_goals()
