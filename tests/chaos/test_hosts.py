"""The cluster and its host, short form (the long form: benchmarks/chaos/run.py): the owner's
SIGKILL with blocked replicas, modules planted in the current directory, another Unix user."""

from __future__ import annotations

import pytest

from chaos import hosts
from chaos.harness import ScenarioSkipped


def test_driver_sigkill_with_blocked_replicas() -> None:
    hosts.driver_kill(rounds=1).assert_goals()


@pytest.mark.parametrize("crash", [False, True], ids=["passing-through", "crashing"])
def test_planted_modules_in_the_cwd_are_not_imported(crash: bool) -> None:
    hosts.shadowing(crash=crash, where="cwd", start_timeout_s=20).assert_goals()


@pytest.mark.parametrize("crash", [False, True], ids=["passing-through", "crashing"])
def test_planted_modules_on_pythonpath_reach_replicas_only(crash: bool) -> None:
    hosts.shadowing(crash=crash, where="pythonpath", start_timeout_s=30).assert_goals()


def test_another_unix_user_is_kept_out() -> None:
    try:
        report = hosts.other_user()
    except ScenarioSkipped as exc:
        pytest.skip(str(exc))
    report.assert_goals()
