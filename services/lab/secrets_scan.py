"""Scan log files for secrets: HSM PINs, database passwords, credentials and private key material.

For the single-host stack (tests/integration/test_secrets_in_logs.py) and for the HA lab:

    from hapki.lab.secrets_scan import scan_tree
    findings = scan_tree(Path(".run/lab"))          # secrets found under the tree, every log under it
    assert not findings, "\\n".join(map(str, findings))

A finding names the file, the line and which secret (by its label, a file name), never the secret itself.
Each secret is searched as written and in the encodings a careless log line would use (base64, hex,
repr-escaped); private key material by its PEM marker and by the lines of every private key found on disk.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

# A PEM marker in a log line means key material was logged: "-----BEGIN PRIVATE KEY-----", "EC PRIVATE KEY",
# "ENCRYPTED PRIVATE KEY", "OPENSSH PRIVATE KEY", ... (no log message of hapki spells the words this way).
PRIVATE_KEY_MARKER = "PRIVATE KEY"
# Files whose whole content is a secret, by name: SoftHSM PINs and SO PINs, database passwords, NATS credentials
# and NKey seeds, approval keys.
SECRET_FILE_PATTERNS = ("*.pin", "*.so-pin", "*.password", "password", "*.creds", "*.nk", "*.seed", "*.secret",
                        "*approval*.key", "*.hmac")
# Files that may hold a PEM private key (haproxy's combined PEMs, the infrastructure CA's key, TLS keys).
KEY_FILE_PATTERNS = ("*.key", "*.pem")
LOG_PATTERNS = ("*.log", "*.jsonl", "*.out", "*.err")
# Shorter values would match by chance (and no secret hapki makes is this short).
MIN_SECRET_CHARS = 6
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----\s*(.*?)-----END [A-Z ]*PRIVATE KEY-----", re.S)


@dataclass(frozen=True)
class Finding:
    """A secret in a log: where, and which (by label). The value is never kept."""

    path: Path
    line: int
    secret: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.secret}"


def secrets_in(root: Path) -> dict[str, str]:
    """Every secret kept in files under `root`, labelled by path: secret files whole, private keys by PEM line."""
    found: dict[str, str] = {}
    for pattern in SECRET_FILE_PATTERNS:
        for path in sorted(root.rglob(pattern)):
            if path.is_file():
                value = path.read_text(errors="replace").strip()
                if len(value) >= MIN_SECRET_CHARS:
                    found[str(path.relative_to(root))] = value
    for pattern in KEY_FILE_PATTERNS:
        for path in sorted(root.rglob(pattern)):
            if not path.is_file() or path.stat().st_size > 1_000_000:
                continue
            for index, block in enumerate(_PEM_KEY.findall(path.read_text(errors="replace"))):
                for number, line in enumerate(block.split()):
                    if len(line) >= 16:
                        found[f"{path.relative_to(root)} (private key {index}, line {number})"] = line
    return found


def log_files(root: Path) -> list[Path]:
    """Every log file under `root` (services', nats-server's, MariaDB's, haproxy's, span files)."""
    return sorted({p for pattern in LOG_PATTERNS for p in root.rglob(pattern) if p.is_file()})


def _forms(value: str) -> set[str]:
    raw = value.encode()
    forms = {value, base64.b64encode(raw).decode().rstrip("="), raw.hex(), repr(value)[1:-1]}
    return {form for form in forms if len(form) >= MIN_SECRET_CHARS}


def scan(paths: Iterable[Path], secrets: Mapping[str, str], *, markers: Iterable[str] = (PRIVATE_KEY_MARKER,),
         ) -> list[Finding]:
    """Every line of `paths` that holds one of `secrets` (label -> value, any of its forms) or a marker."""
    needles = [(label, form) for label, value in secrets.items() if len(value) >= MIN_SECRET_CHARS
               for form in _forms(value)]
    needles += [(f"marker {marker!r}", marker) for marker in markers]
    findings = []
    for path in paths:
        with path.open("r", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                for label, needle in needles:
                    if needle in line:
                        findings.append(Finding(path, number, label))
    return findings


def scan_tree(root: Path, extra_secrets: Mapping[str, str] | None = None) -> list[Finding]:
    """Scan every log file under `root` for every secret kept under `root` (plus `extra_secrets`)."""
    root = Path(root)
    secrets = {**secrets_in(root), **(extra_secrets or {})}
    if not secrets:
        raise ValueError(f"no secrets found under {root}: nothing to look for (wrong directory?)")
    return scan(log_files(root), secrets)
