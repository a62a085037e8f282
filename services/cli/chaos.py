"""`hapki chaos`: the fault suite (hapki.lab.chaos) against the HA lab, a table per scenario and JSON.

Brings the lab up if it is not up and leaves it as it found it: taken down again if this command started it,
healed and left running otherwise.
"""

from __future__ import annotations

import fcntl
import json
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from hapki.cli.client import new_key_and_csr


def run_chaos(base_dir: Path, *, scenarios: list[str] | None, runs: int, rate: float, seconds: float | None,
              as_json: bool) -> int:
    from hapki.lab.chaos import ChaosRunner, RunResult, format_table, resolve, summarize
    from hapki.lab.ha import Lab, LabError

    try:
        chosen = resolve(scenarios)
    except KeyError as exc:
        print(f"hapki chaos: {exc.args[0]}", file=sys.stderr)
        return 2
    # Two fault runs on one lab would inject each other's faults into each other's measurements.
    Path(base_dir).mkdir(parents=True, exist_ok=True)
    lock = (Path(base_dir) / "chaos.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"hapki chaos: another hapki chaos is running on {base_dir}", file=sys.stderr)
        return 2
    lab = Lab(base_dir)
    was_up = lab.procs.meta.get("state") == "up" and lab.reachable()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if as_json else (lambda *a: print(*a, flush=True))
    if not was_up:
        say(f"bringing the HA lab up in {lab.base_dir} ...")
        try:
            lab.up()
        except LabError as exc:
            print(f"hapki chaos: lab up failed: {exc}", file=sys.stderr)
            return 1
    csrs = [new_key_and_csr([f"chaos-{i}.example.com", "192.0.2.45"])[0].decode() for i in range(16)]
    runner = ChaosRunner(lab, csrs, rate=rate, seconds=seconds)
    results: list[RunResult] = []
    started = time.time()
    try:
        for scenario in chosen:
            for i in range(runs):
                try:
                    result = runner.run(scenario, i)
                except Exception as exc:  # noqa: BLE001 - a run that cannot complete is reported, not fatal
                    result = RunResult(scenario=scenario.name, run=i, rate=rate, galera_agree=False,
                                       notes=[f"run failed: {type(exc).__name__}: {exc}"[:2000]])
                    say(traceback.format_exc(limit=3))
                results.append(result)
                say(f"{scenario.name} run {i + 1}/{runs}: sent {result.sent} lost {result.lost} dup "
                    f"{result.duplicated} unacct {result.unaccounted} unavailability {result.unavailability} s "
                    f"first signature {result.first_signature} s ({result.first_signer}) "
                    f"{'' if result.galera_resumed is None else f'galera resumed {result.galera_resumed} s '}"
                    f"{'' if result.clean else 'NOT CLEAN ' + str(result.violations) + ' ' + str(result.notes)}"
                    f"{'' if result.audit is None else ' AUDIT: ' + result.audit}")
            say(format_table(summarize([r for r in results if r.scenario == scenario.name])))
    finally:
        try:
            if was_up:
                lab.heal()
                lab.detach()
            else:
                lab.down()
        except LabError as exc:
            print(f"hapki chaos: leaving the lab as found failed: {exc}", file=sys.stderr)
    summaries = summarize(results)
    report = {"started_at": started, "rate": rate, "runs_per_scenario": runs,
              "summaries": [asdict(s) for s in summaries],
              "runs": [dict(asdict(r), clean=r.clean) for r in results]}
    out = lab.base_dir.parent / f"chaos-{int(started)}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    if as_json:
        print(json.dumps(report, indent=1, default=str))
    else:
        print(format_table(summaries))
        print(f"(times in seconds, p50/p99/max over runs; every run in {out})")
    return 0 if results and all(r.clean for r in results) else 1
