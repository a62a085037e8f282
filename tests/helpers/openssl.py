"""openssl's view of what the CA published: the command-line checks a relying party would run."""

from __future__ import annotations

import subprocess
from pathlib import Path


def reply_files(tmp: Path, serial: str, cert_pem: str, chain_pem: str) -> tuple[Path, Path, Path]:
    """The certificate, its issuer and its whole chain (issuer first, up to the root) as PEM files in `tmp`, named
    after the serial (several certificates can share `tmp`)."""
    certs = [c + "-----END CERTIFICATE-----\n" for c in chain_pem.split("-----END CERTIFICATE-----") if c.strip()]
    leaf, issuer, chain = tmp / f"{serial}.pem", tmp / f"{serial}-issuer.pem", tmp / f"{serial}-chain.pem"
    leaf.write_text(cert_pem)
    issuer.write_text(certs[0])
    chain.write_text("".join(certs))
    return leaf, issuer, chain


def openssl_ocsp(tmp: Path, serial: str, cert_pem: str, chain_pem: str, url: str) -> str:
    """`openssl ocsp` about the certificate at `url`, the response verified under its chain; openssl's output
    (asserted: it ran, and said Response verify OK)."""
    leaf, issuer, chain = reply_files(tmp, serial, cert_pem, chain_pem)
    out = subprocess.run(["openssl", "ocsp", "-issuer", str(issuer), "-cert", str(leaf), "-url", url,
                          "-CAfile", str(chain), "-timeout", "5"], capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "Response verify OK" in text, text
    return text
