"""The log scanner finds a secret in any of its forms, and key material by marker; it never reports the value."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hapki.lab.secrets_scan import Finding, log_files, scan, scan_tree, secrets_in

PIN = "3f9a1c0b7e2d4a55"


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "hsm").mkdir()
    (tmp_path / "hsm" / "hapki-a.pin").write_text(PIN + "\n")
    (tmp_path / "hsm" / "hapki-a.so-pin").write_text("0011223344556677")
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "password").write_text("s3cret-db-password")
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "haproxy.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n" + key)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "clm.log").write_text("2026 INFO started\n2026 INFO issued serial 0a\n")
    return tmp_path


def test_a_clean_tree_has_no_findings(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert len(secrets_in(root)) >= 4  # two PINs, the password, the key's lines
    assert scan_tree(root) == []


@pytest.mark.parametrize("leak", [
    f"pin={PIN}", f"pin b'{base64.b64encode(PIN.encode()).decode()}'", f"pin {PIN.encode().hex()}",
    "password: s3cret-db-password", "-----BEGIN PRIVATE KEY-----", "KEY-LINE-2",
])
def test_a_secret_in_a_log_line_is_found_by_label_never_by_value(tmp_path: Path, leak: str) -> None:
    root = _tree(tmp_path)
    if leak == "KEY-LINE-2":  # a line of the key's body, without its markers
        leak = "key " + (root / "haproxy.pem").read_text().splitlines()[4]
    (root / "logs" / "cara.log").write_text(f"2026 INFO fine\n2026 DEBUG {leak}\n")
    findings = scan_tree(root)
    assert findings and {(f.path.name, f.line) for f in findings} == {("cara.log", 2)}
    assert all(PIN not in str(f) and "s3cret" not in str(f) for f in findings)


def test_scan_takes_explicit_secrets_and_paths(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("a\nb token=abcdefgh\n")
    assert scan([log], {"nats token": "abcdefgh"}) == [Finding(log, 2, "nats token")]
    assert scan([log], {"short": "ab"}) == []  # too short to look for: would match by chance
    assert log_files(tmp_path) == [log]


def test_a_tree_without_secrets_is_an_error_not_a_pass(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        scan_tree(tmp_path)
