"""A real SoftHSM2 token store for the HSM integration tests (import the fixtures into the test module).

The store uses a private copy of libsofthsm2.so: python-pkcs11 loads a module path once per process, and SoftHSM
reads SOFTHSM2_CONF only at C_Initialize, so tests that load the system path with another config (the lab tests)
would otherwise share, or finalize, this library instance. A copied file is an independent instance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from hapki.runtime.hsm import HSMMemberConfig, HSMPool, HSMPrivateKey

SYSTEM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN = "t"  # the working token; user PIN 5678
WRONG_PIN_TOKEN = "t-wrong-pin"  # a second token whose PIN file holds the wrong PIN
USER_PIN, SO_PIN = "5678", "1234"


@dataclass(frozen=True)
class SoftHSMStore:
    """Where the test token store lives and how a pool member reaches it."""

    dir: Path
    module_path: str  # private copy of libsofthsm2.so
    conf: Path  # softhsm2.conf of this store
    pin_file: Path  # correct user PIN of TOKEN
    wrong_pin_file: Path  # a PIN that WRONG_PIN_TOKEN refuses

    def member(self, name: str = "hsm-a", *, token: str = TOKEN, pin_file: Path | None = None) -> HSMMemberConfig:
        return HSMMemberConfig(
            name=name, module_path=self.module_path, token_label=token,
            pin_file=pin_file or self.pin_file, softhsm_conf=self.conf,
        )


def _write_secret(path: Path, value: str) -> None:
    path.write_text(value + "\n")
    path.chmod(0o600)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHSMStore:
    """Two initialized tokens (TOKEN, WRONG_PIN_TOKEN) in a fresh token directory, made before any library load."""
    if not Path(SYSTEM_MODULE).exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (apt-get install softhsm2)")
    base = tmp_path_factory.mktemp("softhsm")
    (base / "tokens").mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {base / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    module = base / "libsofthsm2.so"
    shutil.copyfile(SYSTEM_MODULE, module)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    for label in (TOKEN, WRONG_PIN_TOKEN):
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", USER_PIN],
            env=env, check=True, capture_output=True, timeout=60,
        )
    _write_secret(base / "user.pin", USER_PIN)
    _write_secret(base / "wrong.pin", "0000")
    return SoftHSMStore(base, str(module), conf, base / "user.pin", base / "wrong.pin")


@pytest.fixture(scope="session")
def hsm_pool(softhsm: SoftHSMStore) -> Iterator[HSMPool]:
    """One read/write pool (member hsm-a on TOKEN) for the whole session: it holds the token's login, and makes
    the test keys (a ceremony's pool)."""
    pool = HSMPool([softhsm.member()], rw=True)
    pool.open()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def p256_key(hsm_pool: HSMPool) -> HSMPrivateKey:
    """A P-256 signing key generated in the token for these tests."""
    key_id = os.urandom(16)
    hsm_pool.generate_ec_key(f"test-{key_id.hex()}", key_id, ec.SECP256R1())
    return hsm_pool.private_key(key_id)
