"""scripts/bench_clm_clients.py: which process serves under a supervisor, and CPU per issuance."""

from __future__ import annotations

from helpers.scripts import load_script


def test_the_serving_process_is_the_supervisors_only_descendant() -> None:
    script = load_script("bench_clm_clients")
    assert script.serving_child(100, [100, 101]) == 101
    assert script.serving_child(100, [100]) is None  # being forked again
    assert script.serving_child(100, [100, 101, 102]) is None  # not a supervisor with one child: ambiguous


def test_cpu_per_issuance_needs_the_whole_run_and_an_issuance() -> None:
    script = load_script("bench_clm_clients")
    assert script.per_issuance_ms(1.0, 4.0, 1500) == 2.0
    assert script.per_issuance_ms(None, 4.0, 1500) is None  # the process started during the run
    assert script.per_issuance_ms(1.0, None, 1500) is None  # and ended during it
    assert script.per_issuance_ms(1.0, 4.0, 0) is None


def test_mixed_alternates_nats_and_https_as_the_fault_suite_does() -> None:
    script = load_script("bench_clm_clients")
    assert [script.via_of("mixed", i) for i in range(4)] == ["nats", "https", "nats", "https"]
    assert {script.via_of("nats", i) for i in range(4)} == {"nats"}
