"""Bad values through handles and HTTP, short form (the long form: benchmarks/chaos/run.py):
every case, repeated past max_ongoing_requests; only the huge values are smaller."""

from __future__ import annotations

from chaos import values


def test_bad_values_through_handles() -> None:
    values.through_handles(huge_mb=64, timeout_s=3.0).assert_goals()


def test_bad_values_through_http() -> None:
    values.through_http(huge_mb=64, timeout_s=3.0).assert_goals()
