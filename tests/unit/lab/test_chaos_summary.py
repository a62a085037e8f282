"""hapki.lab.chaos's arithmetic: the Galera probe's resume time, the lag behind it, and the summary table."""

from __future__ import annotations

from hapki.lab.chaos import RunResult, _GaleraProbe, format_table, summarize


def test_galera_resumed_is_the_first_commit_of_a_write_begun_after_the_fault() -> None:
    probe = _GaleraProbe(lab=None)
    probe.commits = [
        ("db-2", 99.0, 100.02),   # begun before the fault at 100.0: a commit racing the fault does not count
        ("db-1", 100.05, 112.5),  # stalled through the reconfiguration: done when Galera committed again
        ("db-3", 100.06, 107.3),
        ("db-3", 107.4, 107.41),
    ]
    assert probe.resumed_after(100.0) == 107.3
    assert probe.resumed_after(200.0) is None


def test_the_table_shows_the_lag_behind_galera_for_db_scenarios_only() -> None:
    runs = [
        RunResult(scenario="db-partition", run=i, rate=50.0, sent=10, accepted=10, completed=10,
                  first_signature=6.4 + i, galera_resumed=6.0 + i, resume_lag=0.4) for i in range(3)
    ] + [RunResult(scenario="cara-crash", run=0, rate=50.0, sent=10, accepted=10, completed=10, first_signature=0.4)]
    summaries = summarize(runs)
    assert summaries[0].galera_resumed == {"p50": 7.0, "p99": 8.0, "max": 8.0, "missing": 0}
    assert summaries[0].resume_lag["max"] == 0.4
    table = format_table(summaries).splitlines()
    assert "galera resumed s" in table[0] and "lag s" in table[0]
    assert table[2].split()[-2:] == ["7.00/8.00/8.00", "0.40/0.40/0.40"]
    assert table[3].split()[-2:] == ["-", "-"]
