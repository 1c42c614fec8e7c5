"""HTTP abuse against the proxy, short form (the long form: benchmarks/chaos/run.py). The goals
are the issue's; only the numbers of connections and examples and the proxy's timeouts (set
short here so the test need not wait out the defaults) are smaller."""

from __future__ import annotations

from chaos import abuse, floods


def test_malformed_smuggled_and_oversize_requests() -> None:
    abuse.malformed().assert_goals()


def test_pipelined_requests() -> None:
    abuse.pipelined(requests=5000).assert_goals()


def test_half_sent_requests_are_closed_in_time() -> None:
    abuse.half_sent(header_timeout_s=2.0, body_timeout_s=2.0).assert_goals()


def test_fuzzed_raw_requests() -> None:
    abuse.fuzz(examples=2000, derandomize=True).assert_goals()


def test_slowloris() -> None:
    floods.slowloris(connections=500, header_timeout_s=2.0, samples=300).assert_goals()


def test_fd_exhaustion_with_idle_connections() -> None:
    floods.fd_exhaustion(samples=300, measure_s=2.0).assert_goals()


def test_concurrent_large_uploads() -> None:
    floods.uploads(count=10, size_mb=90).assert_goals()


def test_slow_readers_of_streamed_responses() -> None:
    floods.slow_readers(count=4, size_mb=100, hold_s=2.0).assert_goals()
