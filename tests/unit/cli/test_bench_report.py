"""The pure parts of `hapki bench --compare` and `--growth`: ratios, the table, and reading the hot path's SQL."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hapki.cli import bench_compare, bench_growth, k6
from hapki.lab.cluster import wait_until
from hapki.runtime.telemetry import PRODUCTION_SAMPLER, SamplerSetting


def _run(rate: float, errors: int = 0, clm_ms: float = 1.25) -> dict[str, object]:
    return {"issued": int(rate * 10), "seconds": 10, "rate_per_s": rate, "p50_ms": 5.0, "p95_ms": 9.0, "p99_ms": 12.0,
            "errors": errors, "cpu_ms_per_issuance": {"clm": clm_ms, "k6": 0.5}}


def _column(max_rate: float) -> dict[str, object]:
    return {"runs": {"rate": {**_run(100.0, clm_ms=2.5), "offered_per_s": 300},
                     "max": {**_run(max_rate), "offered_per_s": None}}, "rss_peak_mib": {"clm": 80.4, "k6": None},
            "verified": {"stored": 1234, "checked": 50, "failed": 0}}


def test_ratios_are_against_cfssl_at_max_load() -> None:
    columns = {"cfssl": _column(800.0), "single": _column(400.0), "lab": {"skipped": "not asked"}}
    assert bench_compare.ratios(columns) == {"single/cfssl": 0.5, "lab/cfssl": None}
    assert bench_compare.ratios({"single": _column(1.0)}) == {"single/cfssl": None, "lab/cfssl": None}


def test_table_shows_every_column_skips_and_failures_by_name() -> None:
    report = {"cores": 2, "shape": {"rate": 300, "vus": 32, "seconds": 10.0, "warmup": 3.0},
              "columns": {"cfssl": _column(800.0), "single": _column(400.0), "lab": {"skipped": "lab not up"},
                          "raw": {"failed": "RuntimeError: no softhsm"}},
              "ratios": {"single/cfssl": 0.5, "lab/cfssl": None}, "ceiling_ratios": {"single/cfssl": 0.25,
                                                                                        "lab/cfssl": None}}
    assert "Trace sampler" not in bench_compare.table(report)  # a report from before the sampler was recorded
    report["tracing"] = {"sampler": "parentbased_traceidratio 0.01", "source": "production default"}
    text = bench_compare.table(report)
    assert "Trace sampler of (c): parentbased_traceidratio 0.01 (production default;" in text
    assert "(d) hapki HA lab         skipped: lab not up" in text
    assert "(a) raw limit            FAILED: RuntimeError: no softhsm" in text
    assert "measured: single/cfssl 0.50, lab/cfssl -; by CPU ceiling: single/cfssl 0.25, lab/cfssl -" in text
    assert "50/50 of 1234" in text and "cpu: clm 1.25  k6 0.50" in text and "rss: clm 80  k6 -" in text
    assert "cpu at 300/s: clm 2.50  k6 0.50" in text  # the rate run's CPU too, where per-round costs show


def test_ceiling_is_cores_over_cpu_seconds_per_issuance() -> None:
    assert bench_compare.ceiling({"clm": 3.0, "k6": 1.0}, 1000, cores=2) == 500.0
    assert bench_compare.ceiling({"clm": 0.0}, 1000, cores=2) is None and bench_compare.ceiling({"a": 1.0}, 0) is None
    columns = {"cfssl": {"runs": {"max": {"ceiling_per_s": 1000.0}}}, "single": {"runs": {"max": {"ceiling_per_s": 250.0}}}}
    assert bench_compare.ratios(columns, key="ceiling_per_s") == {"single/cfssl": 0.25, "lab/cfssl": None}


def test_the_single_node_is_measured_with_the_production_sampler_unless_the_environment_names_one() -> None:
    assert bench_compare.tracing_sampler({}) == (PRODUCTION_SAMPLER, "production default")
    assert bench_compare.tracing_sampler({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}) == (
        SamplerSetting("parentbased_always_on"), "OTEL_TRACES_SAMPLER")
    assert bench_compare.tracing_sampler({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"})[0] \
        == SamplerSetting("traceidratio", 0.5)
    with pytest.raises(ValueError):
        bench_compare.tracing_sampler({"OTEL_TRACES_SAMPLER": "sometimes"})


def test_load_shape_env_measures_without_a_warmup_of_its_own() -> None:
    env = bench_compare.LoadShape(rate=300, vus=32, seconds=10.0, warmup=3.0).env("max")
    assert env == {"MODE": "max", "RATE": "300", "VUS": "32", "SECONDS": "10", "WARMUP": "0"}


def test_several_rates_are_one_run_each_in_order_then_max() -> None:
    one = bench_compare.LoadShape(rate=300, vus=32, seconds=10.0, warmup=3.0)
    assert one.modes() == ["rate", "max"] and one.offered("rate") == 300 and one.offered("max") is None
    curve = bench_compare.LoadShape(rate=50, vus=32, seconds=10.0, warmup=3.0, more_rates=(150, 300))
    assert curve.modes() == ["rate@50", "rate@150", "rate@300", "max"]
    assert curve.env("rate@150") == {"MODE": "rate", "RATE": "150", "VUS": "32", "SECONDS": "10", "WARMUP": "0"}
    assert curve.env("max")["MODE"] == "max"


def test_counters_are_reported_per_issuance_for_every_run(monkeypatch, tmp_path: Path) -> None:
    """The lab's column reads Galera's write-sets around each run: how many transactions a batch shared."""
    issued = iter([20, 40, 10])  # rate@50, rate@100, max (the warm-up's comes first, below)

    def fake_run(script: str, env: dict[str, str], summary_file: Path, **_: object) -> k6.K6Summary:
        # The RUN_ID is part of every idempotency key k6 sends: CLM takes only these characters in one.
        assert re.fullmatch(r"[A-Za-z0-9._:-]+", env["RUN_ID"]), env["RUN_ID"]
        n = 5 if summary_file.name.endswith("-warmup.json") else next(issued)
        return k6.K6Summary(issued=n, errors=0, seconds=1.0, rate_per_s=float(n), p50_ms=1.0, p95_ms=2.0,
                            p99_ms=3.0, max_ms=4.0, raw={})

    class Groups:
        def start(self) -> None: ...
        def stop(self) -> dict[str, float]: return {"clm": 0.01}
        def peak_rss_mib(self) -> dict[str, float]: return {"clm": 80.0}

    readings = iter([{"galera_writesets": 100}, {"galera_writesets": 160},   # rate@50: 60 for 20 issuances
                     {"galera_writesets": 160}, {"galera_writesets": 200},   # rate@100: 40 for 40
                     {"galera_writesets": 200}, {}])                         # max: the last read failed
    monkeypatch.setattr(bench_compare.k6, "run", fake_run)
    shape = bench_compare.LoadShape(rate=50, vus=32, seconds=1.0, warmup=1.0, more_rates=(100,))
    column = bench_compare._k6_column(  # noqa: SLF001
        "lab", "hapki", "https://x", Groups(), shape, tmp_path / "csrs.json", tmp_path, lambda _: None,
        counters=lambda: next(readings))
    runs = column["runs"]
    assert list(runs) == ["rate@50", "rate@100", "max"]
    assert [run["offered_per_s"] for run in runs.values()] == [50, 100, None]
    assert [run["per_issuance"] for run in runs.values()] == [
        {"galera_writesets": 3.0}, {"galera_writesets": 1.0}, {"galera_writesets": None}]
    report = {"cores": 2, "shape": shape.__dict__, "columns": {"lab": {**column, "verified": {
        "stored": 70, "checked": 50, "failed": 0}}}, "ratios": {}, "ceiling_ratios": {}}
    text = bench_compare.table(report)
    assert "rate = 50/s, 100/s arrivals" in text
    assert "(d) hapki HA lab         rate@50       20.0" in text and "cpu at 100/s: clm 0.25  k6" in text
    assert "Galera write-sets per issuance: 50/s 3.00  100/s 1.00  max -" in text


def test_split_statements_respects_quotes() -> None:
    text = "UPDATE a SET x = 'a;b\\'c' WHERE id = 1; INSERT INTO t VALUES (\"q;\"); COMMIT;"
    assert bench_growth.split_statements(text) == ["UPDATE a SET x = 'a;b\\'c' WHERE id = 1",
                                                   'INSERT INTO t VALUES ("q;")', "COMMIT"]


def test_normalise_folds_literals_into_one_shape() -> None:
    a = bench_growth.normalise("SELECT 1 FROM requests WHERE id = 'abc'  AND n = 42")
    b = bench_growth.normalise("SELECT 1 FROM requests\n WHERE id = 'x\\'y' AND n = 7")
    assert a == b == "SELECT ? FROM requests WHERE id = ? AND n = ?"


def test_explainable_statements_are_those_with_an_access_path() -> None:
    assert bench_growth.explainable("  select 1")
    assert bench_growth.explainable("UPDATE epochs SET x = 1")
    assert bench_growth.explainable("DELETE FROM audit_unsealed WHERE entry_id = 'a'")
    assert bench_growth.explainable("INSERT INTO a SELECT * FROM b")
    assert not bench_growth.explainable("INSERT INTO a (x) VALUES (1)")
    assert not bench_growth.explainable("COMMIT") and not bench_growth.explainable("SET SESSION x = 1")
    assert not bench_growth.explainable("")


def test_scans_flags_full_scans_of_big_tables_only() -> None:
    output = ("id\tselect_type\ttable\ttype\tpossible_keys\tkey\tkey_len\tref\trows\tExtra\n"
              "1\tSIMPLE\tcertificates\tALL\tNULL\tNULL\tNULL\tNULL\t1000000\tUsing where\n"
              "1\tSIMPLE\tissuers\tALL\tNULL\tNULL\tNULL\tNULL\t1\t\n"
              "1\tSIMPLE\trequests\tindex\tNULL\tix_requests_status\t4\tNULL\t5000\t\n"
              "1\tSIMPLE\tsigning_intents\tref\tix_intents_request\tix_intents_request\t128\tconst\t1\t\n"
              "1\tSIMPLE\tepochs\tconst\tPRIMARY\tPRIMARY\t66\tconst\tNULL\t\n"
              # With a rowid filter MariaDB gives the estimate and the share kept (CARA's reservation check).
              "4\tSUBQUERY\tsigning_intents\tref|filter\tix_intents_request\tix_intents_request\t128\tconst\t1 (0%)\t\n"
              "5\tSUBQUERY\taudit_entries\tALL\tNULL\tNULL\tNULL\tNULL\t9000 (10%)\tUsing where\n")
    rows = bench_growth.parse_explain(output)
    assert [r["table"] for r in rows] == ["certificates", "issuers", "requests", "signing_intents", "epochs",
                                          "signing_intents", "audit_entries"]
    assert bench_growth.scans(rows) == ["certificates: ALL over ~1000000 rows", "requests: index over ~5000 rows",
                                        "audit_entries: ALL over ~9000 rows"]
    assert bench_growth.parse_explain("") == []


def test_clone_statement_gives_each_copy_its_own_identity_and_copies_the_rest() -> None:
    sql = bench_growth.clone_statement("certificates", ["issuer", "serial", "request_id", "cert_pem"], 1, 100000,
                                       1000000)
    assert sql.startswith("INSERT INTO `certificates` (`issuer`, `serial`, `request_id`, `cert_pem`) SELECT t.`issuer`,")
    assert "MD5(CONCAT('growth-s', s)), 23)" in sql and "MD5(CONCAT('growth-r', s)), 24)" in sql
    assert "(s - 1) * 4294.967296" in sql and "t.`cert_pem`" in sql and "SCALE" not in sql
    assert sql.endswith("FROM `growth_certificates` t, (SELECT seq AS s FROM seq_1_to_100000) g")
    staging = bench_growth.staging_statements("certificates", "ab" * 16)
    assert "CREATE TABLE `growth_certificates` LIKE `certificates`" in staging and f"'{'ab' * 16}'" in staging


def test_change_in_percent() -> None:
    assert bench_growth.change(100.0, 91.0) == -9.0
    assert bench_growth.change(None, 1.0) is None and bench_growth.change(0, 1.0) is None


def test_secondary_indexes_are_re_created_as_they_were() -> None:
    rows = ("ix_a\t1\tstatus\t\nix_a\t1\tcreated_at\t\nuq_b\t0\trequester\t\nuq_b\t0\tidempotency_key\t\n"
            "ix_c\t1\tvalue\t16\n")
    asked: list[str] = []
    indexes = bench_growth.secondary_indexes(lambda q: asked.append(q) or rows, "requests")
    assert "table_name = 'requests'" in asked[0] and "index_name <> 'PRIMARY'" in asked[0]
    assert indexes == {"ix_a": "ADD INDEX `ix_a` (`status`, `created_at`)",
                       "uq_b": "ADD UNIQUE INDEX `uq_b` (`requester`, `idempotency_key`)",
                       "ix_c": "ADD INDEX `ix_c` (`value`(16))"}


def test_clone_keys_are_32_hex_digits_in_the_order_of_s_over_the_whole_key_space() -> None:
    import hashlib

    def key(s: int, n: int, first: str, tag: str) -> str:  # what _key's SQL computes
        return first + format(int((s - 1) * 2**32 / n), "08x") + hashlib.md5(f"growth-{tag}{s}".encode()).hexdigest()[
            :24 - len(first)]

    keys = [key(s, 1000, "7", "s") for s in (1, 2, 500, 1000)]
    assert all(len(k) == 32 for k in keys) and keys == sorted(keys)
    assert keys[0].startswith("700000000") and keys[-1].startswith("7ffbe76c")
    assert "LPAD(HEX(FLOOR((s - 1) * SCALE)), 8, '0')" in bench_growth.OVERRIDES["certificates"]["serial"]


def test_growth_table_compares_empty_and_loaded_and_marks_scans() -> None:
    def phase(rate: float, cpu: float) -> dict[str, object]:
        figures = {"rate_per_s": rate, "p50_ms": 10.0, "p99_ms": 20.0, "errors": 0, "cpu_ms": cpu,
                   "cpu_ms_by_process": {"clm": cpu / 2, "mariadbd": cpu / 2}}
        return {"issuance": figures, "ocsp": figures, "ocsp_nonce": {**figures, "rate_per_s": rate * 10}}

    report = {"count": 1000000, "seconds": 10, "empty": phase(100.0, 10.0), "loaded": phase(90.0, 12.0),
              "preload": {"seconds": 138.0, "rows": {"certificates": 1000001}},
              "statements_sent": {"hapki_clm": 37, "hapki_cara": 212}, "issuances_captured": 5,
              "explain": [{"statement": "SELECT ? FROM requests WHERE id = ?", "scans": [],
                           "plan": [{"table": "requests", "type": "const", "key": "PRIMARY", "rows": "1"}]},
                          {"statement": "SELECT * FROM certificates", "scans": ["certificates: ALL over ~1000000 rows"],
                           "plan": [{"table": "certificates", "type": "ALL", "key": None, "rows": "1000000"}]}]}
    text = bench_growth.table(report)
    assert "issuance/s                 100.0      90.0   -10.0%" in text
    assert "issuance CPU ms each        10.0      12.0   +20.0%" in text
    assert "issuance CPU ms each by process, empty -> loaded: clm 5.00 -> 6.00, mariadbd 5.00 -> 6.00" in text
    assert "ocsp nonce/s              1000.0     900.0   -10.0%" in text
    assert "ocsp nonce CPU ms each by process, empty -> loaded: clm 5.00 -> 6.00" in text
    assert "2 shapes, 1 with a full scan" in text and "SCAN SELECT * FROM certificates" in text
    # A report written before the nonce figure existed still prints
    for phase in ("empty", "loaded"):
        del report[phase]["ocsp_nonce"]  # type: ignore[attr-defined]
    assert "ocsp nonce" not in bench_growth.table(report)
    assert "hapki_clm 37, hapki_cara 212" in text


def test_the_lab_column_reports_the_sampler_its_running_services_have() -> None:
    """(d) reads the sampler from a running CLM's environment: what `hapki lab up` was started with."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_TRACES_SAMPLER")}
    sampled = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env={
        **env, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"})
    default = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)

    def exec_done(pid: int) -> bool:  # until the exec, /proc/<pid>/environ is still the forking parent's
        try:
            return b"time.sleep(30)" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    try:
        assert wait_until(lambda: exec_done(sampled.pid) and exec_done(default.pid), 10.0, 0.01) is not None
        assert bench_compare.lab_sampler([None, sampled.pid]) == "parentbased_traceidratio 0.01"
        assert bench_compare.lab_sampler([default.pid]) == "parentbased_always_on"
    finally:
        for proc in (sampled, default):
            proc.kill()
            proc.wait()
    assert bench_compare.lab_sampler([sampled.pid]).startswith("unknown")  # reaped: nothing to read
    assert bench_compare.lab_sampler([]).startswith("unknown")


def test_every_k6_run_of_a_column_and_every_bench_run_uses_new_idempotency_keys(monkeypatch, tmp_path: Path) -> None:
    """k6's keys are RUN_ID, VU and iteration. The warm-up's RUN_ID once was the same every run: on the lab, which is not
    reset between runs, it replayed the last run's keys and got only 409s, and the column's report did not show it."""
    run_ids: list[str] = []

    def fake_run(script: str, env: dict[str, str], summary_file: Path, **_: object) -> k6.K6Summary:
        run_ids.append(env["RUN_ID"])
        errors = 7 if summary_file.name.endswith("-warmup.json") else 0  # only the warm-up had errors
        return k6.K6Summary(issued=10, errors=errors, seconds=1.0, rate_per_s=10.0, p50_ms=1.0, p95_ms=2.0,
                            p99_ms=3.0, max_ms=4.0, raw={})

    class Groups:
        def start(self) -> None: ...
        def stop(self) -> dict[str, float]: return {"clm": 0.01}
        def peak_rss_mib(self) -> dict[str, float]: return {"clm": 80.0}

    monkeypatch.setattr(bench_compare.k6, "run", fake_run)
    shape = bench_compare.LoadShape(rate=300, vus=32, seconds=1.0, warmup=1.0)
    columns = [bench_compare._k6_column("lab", "hapki", "https://x", Groups(), shape, tmp_path / "csrs.json",  # noqa: SLF001
                                        tmp_path, lambda _: None) for _ in range(2)]
    assert len(run_ids) == 2 * (1 + len(shape.modes())) == len(set(run_ids))
    assert columns[0]["warmup"] == {"issued": 10, "errors": 7}  # reported, not dropped
    assert all(run["errors"] == 0 for run in columns[0]["runs"].values())  # and not mixed into the measured runs


@pytest.mark.parametrize("rates", ["50,x", "0", "100,100", ","])
def test_compare_refuses_rates_that_are_not_different_positive_integers(rates: str, capsys) -> None:
    from hapki.cli.main import main as hapki_main

    assert hapki_main(["bench", "--compare", "--columns", "lab", "--rate", rates]) == 2
    assert "--rate (one or more different, comma-separated)" in capsys.readouterr().err


def test_nonce_requests_ask_about_each_serial_for_the_template_issuer_each_with_its_own_nonce() -> None:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import ocsp
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "growth issuer")])
    now = datetime.now(UTC)
    issuer = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
              .serial_number(7).not_valid_before(now).not_valid_after(now + timedelta(days=1))
              .sign(key, hashes.SHA256()))
    template = (ocsp.OCSPRequestBuilder().add_certificate(issuer, issuer, hashes.SHA1()).build()
                .public_bytes(serialization.Encoding.DER))
    asked = [ocsp.load_der_ocsp_request(der) for der in bench_growth.nonce_requests(template, ["1f", "7000abc"])]
    assert [q.serial_number for q in asked] == [0x1F, 0x7000ABC]
    model = ocsp.load_der_ocsp_request(template)
    assert all((q.issuer_name_hash, q.issuer_key_hash) == (model.issuer_name_hash, model.issuer_key_hash)
               for q in asked)
    nonces = [q.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce for q in asked]
    assert len(set(nonces)) == 2 and all(len(n) == 16 for n in nonces)
