"""Secrets never logged: after the lab tests before this one (faults, failovers, issuance, revocation), no log line
of any lab process holds an HSM PIN, a database password or private key material."""

from __future__ import annotations

import pytest
from hapki.lab.ha import Lab
from hapki.lab.secrets_scan import log_files, scan_tree, secrets_in

pytestmark = pytest.mark.lab


def test_no_secret_in_any_lab_log(lab: Lab) -> None:
    secrets = secrets_in(lab.base_dir)
    # The scan must know what to look for, or it proves nothing: the PINs and the service passwords at least.
    assert any("pin" in label.lower() for label in secrets), sorted(secrets)
    assert any("password" in label.lower() for label in secrets), sorted(secrets)
    assert len(log_files(lab.base_dir)) >= 10  # every service, keepalived, haproxy, Galera and NATS log
    assert scan_tree(lab.base_dir) == []
