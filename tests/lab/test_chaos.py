"""The fault suite, once per scenario (hapki.lab.chaos): under steady load through each single failure, no accepted
request is lost, none gets two certificates, every HSM signature is accounted for, no invariant of
hapki.runtime.invariants gains a violating row, the Galera nodes agree, and issuance resumes within a bound.

The bounds on resuming are generous (a 2-core host running 16 lab processes); the measured figures and the goals
are in docs/RELIABILITY.md (`hapki chaos --runs 20`).
"""

from __future__ import annotations

import pytest
from hapki.cli.client import new_key_and_csr
from hapki.lab.chaos import ChaosRunner
from hapki.lab.ha import Lab
from hapki.lab.scenarios import SCENARIOS

pytestmark = pytest.mark.lab

CSRS = [new_key_and_csr([f"chaos-{i}.example.com", "192.0.2.46"])[0].decode() for i in range(8)]
# Lighter than the CLI's 100/s: the suite runs beside the other lab tests under `make test`.
RATE = 50.0
# Seconds from the fault until a client gets a certificate for a request sent after it.
RESUME_BOUND = {
    # cara-link: the other member usually signs 0.6 s after the cut, but 3.2-3.5 s was seen (signing resumed only
    # when the link came back at 3 s; RELIABILITY.md, open), so the bound is the restore plus a margin.
    # signer-crash: the member's supervisor forks CARA again at once (0.2-0.4 s to the first signature measured).
    "cara-crash": 2.0, "cara-graceful": 2.0, "cara-link": 4.0, "cara-split-brain": 3.0, "signer-crash": 3.0,
    "cara-kill": 3.0, "clm-crash": 6.0, "clm-kill": 4.0, "db-node-kill": 15.0, "db-partition": 20.0, "db-minority": 25.0, "hsm-member-down": 2.0,
    # db-cluster-down: the hold (5 s), then the three nodes re-form the Primary Component (measured 9.9 s).
    "db-cluster-down": 20.0,
    # nats-node-kill: a follower campaigns 4-9 s (random) after the stream leader's last heartbeat (nats-server's
    # raft election timeout, a constant; RELIABILITY.md), then clients retry: 5.6-8.2 s measured, 12 s allowed.
    "nats-node-kill": 12.0,
    # nats-partition: the stream's leader cut off for 25 s. Services on it move to another server after 3 probes
    # (hapki.runtime.bus.QuorumWatchdog), the other two elect a new leader (4-9 s): measured 5.0-9.1 s.
    "nats-partition": 15.0,
    # clm-split-brain: both CLM members answer; nothing waits (measured 0.02 s).
    "clm-split-brain": 3.0,
    # hsm-all-down: nothing can be signed for the hold (5 s); the signers resume once a token is back (5.2 s).
    "hsm-all-down": 9.0,
    # ca-rollover: no failure; the first request after it is answered as fast as any (measured 0.02-0.05 s).
    "ca-rollover": 2.0,
    # site-crash: the hold (3 s), then the whole site boots: Galera re-forms 4-5 s later, the services wait for it and
    # the bus, the VIPs settle (measured 13.5 s to the first certificate; RELIABILITY.md, "The whole site").
    "site-crash": 40.0,
}
# db scenarios: seconds from Galera committing again (the chaos probe's writes) to the first signature. The CA
# must resume as soon as Galera does; db-minority adds the VIP move: two failed checks of the track script at 1 s
# intervals, VRRP, the other signer's start (measured 2.6-4.3 s over 20 runs, RELIABILITY.md).
RESUME_LAG_BOUND = {"db-node-kill": 2.0, "db-partition": 2.0, "db-minority": 6.0, "db-cluster-down": 4.0,
                    # the whole site: the services boot meanwhile, wait for the bus too, then the VIPs settle.
                    "site-crash": 20.0}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_keeps_the_invariants(lab: Lab, name: str, timing) -> None:
    result = ChaosRunner(lab, CSRS, rate=RATE, give_up_after=45.0, quiet_timeout=60.0).run(SCENARIOS[name])
    timing(f"chaos.{name}.unavailability", result.unavailability or 0.0)
    timing(f"chaos.{name}.first_signature", result.first_signature if result.first_signature is not None else -1)
    assert result.sent > 0 and result.accepted == result.sent, result
    assert result.lost == 0, result
    assert result.duplicated == 0, result
    assert result.unaccounted == 0, result
    assert not any(result.violations.values()), (result.violations, result.violation_rows)
    assert result.galera_agree, result.galera
    assert result.audit is None, result.audit  # the audit chain verifies after the fault
    assert result.quiet_after is not None, result.notes
    assert result.completed == result.sent, result
    assert result.resumed is not None and result.resumed < RESUME_BOUND[name], result
    assert result.seconds < 120, result
    if SCENARIOS[name].kind in ("db", "site"):
        assert result.galera_resumed is not None, result
        assert result.resume_lag is not None and result.resume_lag < RESUME_LAG_BOUND[name], result
    if name in ("signer-crash", "cara-kill"):
        # Its own supervisor brought the crashed member back before keepalived's track script (two failed checks,
        # 1 s apart) could move the VIP: the same member signs again.
        assert result.faulted_member and result.first_signer == result.faulted_member, result
    if name == "db-minority":
        # The member left with only a non-Primary node must give the VIP away: the other member signs.
        assert result.faulted_member and result.first_signer not in (None, result.faulted_member), result
