"""hapki.lab.tls: the infrastructure CA, haproxy-ready server PEMs that openssl verifies and haproxy loads."""

from __future__ import annotations

import ipaddress
import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hapki.lab.tls import create_infra_ca, issue_server_cert

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _blocks(pem: bytes) -> list[bytes]:
    return [b"-----BEGIN " + b for b in pem.split(b"-----BEGIN ")[1:]]


def test_infra_ca_is_a_p256_ca_for_ten_years_and_is_reused(tmp_path: Path) -> None:
    ca = create_infra_ca(tmp_path, now=NOW)
    cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.not_valid_after_utc - NOW >= timedelta(days=3650)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    assert create_infra_ca(tmp_path, now=NOW + timedelta(days=1)) == ca
    assert x509.load_pem_x509_certificate(ca.cert_path.read_bytes()) == cert  # not issued again


def test_server_pem_verifies_against_the_infra_ca_with_its_sans(tmp_path: Path) -> None:
    ca = create_infra_ca(tmp_path / "ca")
    pem_path = issue_server_cert(ca, tmp_path / "srv", "haproxy-clm", ["10.0.0.10", "127.0.0.1"], ["clm.lab"])
    assert stat.S_IMODE(pem_path.stat().st_mode) == 0o600
    blocks = _blocks(pem_path.read_bytes())
    assert [b.split(b"\n")[0] for b in blocks] == [
        b"-----BEGIN CERTIFICATE-----", b"-----BEGIN CERTIFICATE-----", b"-----BEGIN PRIVATE KEY-----"]
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(blocks[0])
    result = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(ca.cert_path), str(leaf)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cert = x509.load_pem_x509_certificate(blocks[0])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.10"),
                                                        ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["clm.lab"]


def test_server_pem_is_reused_when_valid_and_reissued_when_names_or_ca_change(tmp_path: Path) -> None:
    ca = create_infra_ca(tmp_path / "ca", now=NOW)
    path = issue_server_cert(ca, tmp_path, "h", ["10.0.0.10"], [], now=NOW)
    first = path.read_bytes()
    assert issue_server_cert(ca, tmp_path, "h", ["10.0.0.10"], [], now=NOW + timedelta(days=30)).read_bytes() == first
    assert issue_server_cert(ca, tmp_path, "h", ["10.0.0.11"], [], now=NOW).read_bytes() != first
    second = path.read_bytes()
    near_end = NOW + timedelta(days=380)
    assert issue_server_cert(ca, tmp_path, "h", ["10.0.0.11"], [], now=near_end).read_bytes() != second
    other = create_infra_ca(tmp_path / "other-ca", now=NOW)
    third = path.read_bytes()
    assert issue_server_cert(other, tmp_path, "h", ["10.0.0.11"], [], now=NOW).read_bytes() != third


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_haproxy_accepts_the_pem(tmp_path: Path) -> None:
    ca = create_infra_ca(tmp_path)
    pem_path = issue_server_cert(ca, tmp_path, "haproxy", ["127.0.0.1"], ["localhost"])
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(
        "global\n  log stderr local0\n"
        "defaults\n  mode http\n  timeout connect 1s\n  timeout client 1s\n  timeout server 1s\n"
        # haproxy -c parses and loads the certificate without binding; it refuses port 0.
        f"frontend fe\n  bind 127.0.0.1:8443 ssl crt {pem_path}\n  default_backend be\n"
        "backend be\n  server s1 127.0.0.1:9\n"
    )
    result = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
