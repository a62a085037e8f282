"""`hapki clm keygen`: CLM's approval key pair, P-256 unless asked for Ed25519; an existing key is never replaced."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from hapki.cli.main import main as hapki_main
from hapki.runtime.approval import ALGORITHMS, ApprovalKey, ApprovalVerifier


@pytest.mark.parametrize(("flags", "kind"), [([], ec.EllipticCurvePublicKey),
                                             (["--algorithm", "p256"], ec.EllipticCurvePublicKey),
                                             (["--algorithm", "ed25519"], ed25519.Ed25519PublicKey)])
def test_keygen_writes_a_pair_that_approves_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         flags: list[str], kind: type) -> None:
    private = tmp_path / "clm-approval.key"
    assert hapki_main(["clm", "keygen", "--out", str(private), *flags]) == 0
    public = private.with_suffix(".pub")
    assert isinstance(serialization.load_pem_public_key(public.read_bytes()), kind)
    key = ApprovalKey.from_file(private)
    assert key.key_id in capsys.readouterr().out
    assert ApprovalVerifier.from_files([public]).key_ids == [key.key_id]
    assert hapki_main(["clm", "keygen", "--out", str(private)]) == 2  # never overwritten
    assert "exists already" in capsys.readouterr().err


def test_the_command_offers_the_algorithms_the_library_has(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        hapki_main(["clm", "keygen", "--help"])
    usage = capsys.readouterr().out
    assert all(algorithm in usage for algorithm in ALGORITHMS) and f"{{{','.join(ALGORITHMS)}}}" in usage
