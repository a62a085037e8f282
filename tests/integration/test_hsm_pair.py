"""Two real SoftHSM tokens holding the same CA keys (the HA lab's hsm-a and hsm-b): replication and failover.

Each member is its own token store with its own softhsm2.conf, loaded through its own copy of libsofthsm2.so, so
the two fail independently in this one process. A member "dies" when its token directory is moved away: SoftHSM
re-checks the token files on every call, so the next call fails at once (cached handle -> ObjectHandleInvalid,
lookup -> NoSuchKey, get_token -> GeneralError) and C_Initialize fails until the directory is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from hapki.cara.ca_init import CAHierarchy, create_hierarchy
from hapki.contracts.errors import HSMUnavailable
from hapki.lab import stack
from hapki.lab.local import LocalEnv, SoftHSM
from hapki.runtime.config import HSMConfig, HSMMember
from hapki.runtime.hsm import PKCS11_LOCK, HSMMemberConfig, HSMPool, SignMechanism
from hapki.runtime.hsm_library import library_for
from hapki.runtime.hsm_replication import KEK_ID, generate_replicated_ec_key, provision_kek

pytestmark = pytest.mark.integration

SYSTEM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
COOL_DOWN_S = 5.0
TIMINGS: dict[str, float] = {}  # milliseconds; printed at the end of the module (pytest -s shows them)


@dataclass
class PairMember:
    """One HSM of the pair: its token store, how the pool reaches it, and a switch to kill it."""

    store: SoftHSM
    config: HSMMemberConfig

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def so_pin_file(self) -> Path:
        return self.store.so_pin_file(self.config.token_label)

    def kill(self) -> None:
        self.store.token_dir.rename(self.store.token_dir.with_name("tokens.dead"))

    def revive(self) -> None:
        self.store.token_dir.with_name("tokens.dead").rename(self.store.token_dir)


@dataclass(frozen=True)
class Ceremony:
    key_id: bytes
    label: str
    public_key: ec.EllipticCurvePublicKey


def _make_pair(base: Path, tag: str) -> list[PairMember]:
    """hsm-a and hsm-b under `base`: two token stores, each with one token and its own copy of the library."""
    members = []
    for name in ("hsm-a", "hsm-b"):
        store = SoftHSM(base, name)
        label = f"{tag}-{name}"  # different labels: a member reaching the other's token would fail loudly
        store.init_token(label)
        module = store.dir / f"libsofthsm2-{tag}-{name}.so"  # a library instance of this module's own
        shutil.copyfile(SYSTEM_MODULE, module)
        members.append(PairMember(store, HSMMemberConfig(
            name=name, module_path=str(module), token_label=label, pin_file=store.pin_file(label),
            softhsm_conf=store.conf_path,
        )))
    return members


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> list[PairMember]:
    """The pair most tests share (with one pool, which holds both tokens' login for the module's life)."""
    if not Path(SYSTEM_MODULE).exists() or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (apt-get install softhsm2)")
    return _make_pair(tmp_path_factory.mktemp("hsm-pair"), "pair")


def _configs(pair: list[PairMember]) -> list[HSMMemberConfig]:
    return [m.config for m in pair]


@pytest.fixture(scope="module")
def ceremony(pair: list[PairMember]) -> Iterator[Ceremony]:
    """The cluster KEK in both tokens, then one replicated P-256 key. Runs before any pool logs in (SO login)."""
    began = time.perf_counter()
    provision_kek(_configs(pair), {m.name: m.so_pin_file for m in pair})
    TIMINGS["provision_kek"] = (time.perf_counter() - began) * 1000
    key_id = os.urandom(16)
    began = time.perf_counter()
    public_key = generate_replicated_ec_key(_configs(pair), f"pair-{key_id.hex()}", key_id, ec.SECP256R1())
    TIMINGS["generate_replicated_ec_key P-256"] = (time.perf_counter() - began) * 1000
    yield Ceremony(key_id, f"pair-{key_id.hex()}", public_key)
    print("\nHSM pair timings (ms):", {k: round(v, 2) for k, v in TIMINGS.items()})


@pytest.fixture(scope="module")
def now() -> list[float]:
    """The pool's clock (monotonic seconds), moved by hand."""
    return [1000.0]


@pytest.fixture(scope="module")
def pool(pair: list[PairMember], ceremony: Ceremony, now: list[float]) -> Iterator[HSMPool]:
    pool = HSMPool(_configs(pair), retry_after_s=COOL_DOWN_S, clock=lambda: now[0])
    pool.open()
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def hierarchy(pool: HSMPool, pair: list[PairMember]) -> CAHierarchy:
    # openssl verifies against the wall clock, so the ceremony runs at the real "now" (the test is the edge).
    began = time.perf_counter()
    result = create_hierarchy(pool, now=datetime.now(UTC), replicate_across=_configs(pair))
    TIMINGS["create_hierarchy (2 replicated keys + 2 certs)"] = (time.perf_counter() - began) * 1000
    return result


@contextlib.contextmanager
def _dead(member: PairMember, pool: HSMPool, now: list[float]) -> Iterator[None]:
    """`member` is dead inside the block; afterwards it is back and the pool has taken it up again."""
    member.kill()
    try:
        yield
    finally:
        member.revive()
        now[0] += COOL_DOWN_S + 1
        assert pool.health()[member.name], f"{member.name} did not come back"


@contextlib.contextmanager
def _session(member: PairMember, *, pin: bool = False) -> Iterator[Any]:
    """A session on the member's token; without `pin` it shares the login the pool holds in this process."""
    with PKCS11_LOCK:
        library = library_for(member.config.module_path)
        library.attach(member.config.softhsm_conf, member.name)
        token = library.get().get_token(token_label=member.config.token_label)
        session = token.open(rw=True, user_pin=member.config.pin_file.read_text().strip() if pin else None)
        try:
            yield session
        finally:
            session.close()
            library.detach()


def _verify_raw(public_key: Any, digest: bytes, raw: bytes, algorithm: hashes.HashAlgorithm | None = None) -> None:
    """Verify a raw r || s ECDSA signature over a digest (SHA-256 unless told; raises InvalidSignature)."""
    algorithm = algorithm or hashes.SHA256()
    half = len(raw) // 2
    signature = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    public_key.verify(signature, digest, ec.ECDSA(Prehashed(algorithm)))


def _members_of(spans: InMemorySpanExporter) -> list[str]:
    return [s.attributes["hsm.member"] for s in spans.get_finished_spans() if s.name == "hsm.sign"]


def test_each_member_signs_under_the_one_public_key(pair: list[PairMember], ceremony: Ceremony, pool: HSMPool) -> None:
    for member in pair:
        digest = hashlib.sha256(member.name.encode()).digest()
        with _session(member) as session:
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=ceremony.key_id)
            raw = private.sign(digest, mechanism=Mechanism.ECDSA)
            public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=ceremony.key_id)
            point = public[Attribute.EC_POINT]
        _verify_raw(ceremony.public_key, digest, raw)  # raises InvalidSignature if the copies differ
        # CKA_EC_POINT is the DER OCTET STRING around the uncompressed point (04 || x || y)
        assert point.endswith(ceremony.public_key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint))
    assert pool.public_key(ceremony.key_id).public_numbers() == ceremony.public_key.public_numbers()


def test_key_attributes_read_back_in_both_tokens(pair: list[PairMember], ceremony: Ceremony, pool: HSMPool) -> None:
    read = [Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
            Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE, Attribute.LOCAL, Attribute.WRAP_WITH_TRUSTED,
            Attribute.SIGN, Attribute.DERIVE, Attribute.DECRYPT, Attribute.UNWRAP, Attribute.LABEL, Attribute.ID]
    found = {}
    for member in pair:
        with _session(member) as session:
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=ceremony.key_id)
            found[member.name] = private.get_attributes(read)
    for attrs in found.values():  # both copies
        assert attrs[Attribute.TOKEN] and attrs[Attribute.PRIVATE]
        assert attrs[Attribute.SENSITIVE] and not attrs[Attribute.EXTRACTABLE]
        assert attrs[Attribute.SIGN]
        assert not (attrs[Attribute.DERIVE] or attrs[Attribute.DECRYPT] or attrs[Attribute.UNWRAP])
        assert attrs[Attribute.LABEL] == ceremony.label and attrs[Attribute.ID] == ceremony.key_id
    source, target = found["hsm-a"], found["hsm-b"]
    # Source: generated in the token, always sensitive, extractable cleared. It was extractable (under a trusted
    # key only) for the ceremony, so PKCS#11 keeps never_extractable false for good.
    assert source[Attribute.LOCAL] and source[Attribute.ALWAYS_SENSITIVE] and source[Attribute.WRAP_WITH_TRUSTED]
    assert not source[Attribute.NEVER_EXTRACTABLE]
    # Target: non-extractable from birth, but PKCS#11 marks every unwrapped key never_extractable=false and
    # always_sensitive=false, and SoftHSM refuses to be told otherwise (AttributeReadOnly).
    assert not target[Attribute.LOCAL]
    assert not target[Attribute.NEVER_EXTRACTABLE] and not target[Attribute.ALWAYS_SENSITIVE]


def test_the_kek_is_trusted_identical_and_the_keys_cannot_leave(
    pair: list[PairMember], ceremony: Ceremony, pool: HSMPool
) -> None:
    check_values = []
    for member in pair:
        with _session(member) as session:
            kek = session.get_key(object_class=ObjectClass.SECRET_KEY, id=KEK_ID)
            attrs = kek.get_attributes([Attribute.TRUSTED, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
                                        Attribute.WRAP, Attribute.UNWRAP, Attribute.ENCRYPT, Attribute.CHECK_VALUE])
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=ceremony.key_id)
            with pytest.raises(p11.KeyUnextractable):  # not even under the trusted KEK, in either token
                kek.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            with pytest.raises(p11.AttributeReadOnly):  # and extractable cannot be switched back on
                private[Attribute.EXTRACTABLE] = True
        assert attrs[Attribute.TRUSTED] and attrs[Attribute.SENSITIVE] and not attrs[Attribute.EXTRACTABLE]
        assert attrs[Attribute.WRAP] and attrs[Attribute.UNWRAP] and not attrs[Attribute.ENCRYPT]
        check_values.append(attrs[Attribute.CHECK_VALUE])
    assert len(set(check_values)) == 1


def test_ceremony_refusals_are_value_errors(pair: list[PairMember], ceremony: Ceremony, pool: HSMPool) -> None:
    configs = _configs(pair)
    with pytest.raises(ValueError, match="holds the token's login"):  # the pool is logged in as user
        provision_kek(configs, {m.name: m.so_pin_file for m in pair})
    with pytest.raises(ValueError, match="already in use on hsm-a"):
        generate_replicated_ec_key(configs, "again", ceremony.key_id, ec.SECP256R1())
    with pytest.raises(ValueError, match="has no KEK"):
        generate_replicated_ec_key(configs, "x", os.urandom(16), ec.SECP256R1(), kek_id=b"no-such-kek")
    with pytest.raises(ValueError, match="at least 2"):
        generate_replicated_ec_key(configs[:1], "x", os.urandom(16), ec.SECP256R1())
    with pytest.raises(ValueError, match="unsupported curve"):
        generate_replicated_ec_key(configs, "x", os.urandom(16), ec.SECP521R1())
    with pytest.raises(ValueError, match="no SO PIN file"):
        provision_kek(configs, {})
    assert pool.health() == {"hsm-a": True, "hsm-b": True}


def test_kek_provisioning_replaces_and_a_kek_mismatch_is_caught(pair: list[PairMember], tmp_path: Path) -> None:
    del pair  # only for its skip when SoftHSM is missing
    # A pair of its own: SO login needs tokens on which no pool in this process is logged in.
    spare = _make_pair(tmp_path, "pair-kek")
    configs, so_pins = _configs(spare), {m.name: m.so_pin_file for m in spare}
    provision_kek(configs, so_pins)
    provision_kek(configs, so_pins)  # replaces the KEK in both: still one KEK each, still equal
    generate_replicated_ec_key(configs, "first", b"first", ec.SECP384R1())  # no pool open: it logs in itself
    provision_kek(configs[1:], {"hsm-b": so_pins["hsm-b"]})  # only hsm-b gets a new one
    with pytest.raises(ValueError, match="different KEKs"):
        generate_replicated_ec_key(configs, "second", b"second", ec.SECP256R1())
    wrong = tmp_path / "wrong.so-pin"
    wrong.write_text("00000000\n")
    with pytest.raises(ValueError, match="hsm-a: cannot log in as SO: the token refused"):
        provision_kek(configs, {"hsm-a": wrong, "hsm-b": so_pins["hsm-b"]})
    with pytest.raises(ValueError, match="cannot read the SO PIN file"):
        provision_kek(configs, {"hsm-a": tmp_path / "missing", "hsm-b": so_pins["hsm-b"]})
    provision_kek(configs, so_pins)
    assert generate_replicated_ec_key(configs, "second", b"second", ec.SECP256R1()).curve.name == "secp256r1"
    with _session(spare[0], pin=True) as session:
        keks = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: KEK_ID}))
        assert len(keks) == 1


def test_ceremony_with_a_dead_target_is_hsm_unavailable_and_leaves_nothing(
    pair: list[PairMember], ceremony: Ceremony, pool: HSMPool, now: list[float]
) -> None:
    key_id = os.urandom(16)
    with _dead(pair[1], pool, now):
        with pytest.raises(HSMUnavailable) as failed:
            generate_replicated_ec_key(_configs(pair), "doomed", key_id, ec.SECP256R1())
        assert failed.value.details["member"] == "hsm-b"
    with _session(pair[0]) as session:
        assert list(session.get_objects({Attribute.ID: key_id})) == []


def test_hierarchy_keys_are_in_both_members(pair: list[PairMember], hierarchy: CAHierarchy, pool: HSMPool) -> None:
    for member in pair:
        with _session(member) as session:
            for key_id in (hierarchy.root_key_id, hierarchy.issuing_key_id):
                assert session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)[Attribute.SIGN]
    hierarchy.issuing_cert.verify_directly_issued_by(hierarchy.root_cert)


def _leaf(issuing: x509.Certificate, issuing_key: Any, now: datetime) -> x509.Certificate:
    subject_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    issuer_ski = issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "failover.example.com")]))
        .issuer_name(issuing.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("failover.example.com")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
        .sign(issuing_key, hashes.SHA256())
    )


def test_leaf_signed_while_hsm_a_is_dead_verifies(
    pair: list[PairMember], hierarchy: CAHierarchy, pool: HSMPool, now: list[float],
    span_exporter: InMemorySpanExporter, tmp_path: Path,
) -> None:
    issuing_key = pool.private_key(hierarchy.issuing_key_id)
    with _dead(pair[0], pool, now):
        leaf = _leaf(hierarchy.issuing_cert, issuing_key, datetime.now(UTC))
        assert pool.health() == {"hsm-a": False, "hsm-b": True}
    assert _members_of(span_exporter) == ["hsm-b"]
    leaf.verify_directly_issued_by(hierarchy.issuing_cert)
    for name, cert in (("root", hierarchy.root_cert), ("issuing", hierarchy.issuing_cert), ("leaf", leaf)):
        (tmp_path / f"{name}.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    result = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "root.pem"),
         "-untrusted", str(tmp_path / "issuing.pem"), str(tmp_path / "leaf.pem")],
        check=False, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hsm_a_dies_mid_sequence_and_the_caller_sees_no_error(
    pair: list[PairMember], ceremony: Ceremony, pool: HSMPool, now: list[float], span_exporter: InMemorySpanExporter
) -> None:
    key = pool.private_key(ceremony.key_id)
    algorithm = ec.ECDSA(hashes.SHA256())
    signed, errors, took = [], [], []
    kill_at = 80
    with contextlib.ExitStack() as stack:
        for i in range(200):
            if i == kill_at:
                stack.enter_context(_dead(pair[0], pool, now))
            data = f"message {i}".encode()
            began = time.perf_counter()
            try:
                signed.append((data, key.sign(data, algorithm)))
            except Exception as exc:  # noqa: BLE001 (the point: count whatever reaches the caller)
                errors.append(repr(exc))
            took.append((time.perf_counter() - began) * 1000)
    assert errors == []
    for data, signature in signed:
        ceremony.public_key.verify(signature, data, algorithm)
    members = _members_of(span_exporter)
    assert members == ["hsm-a"] * kill_at + ["hsm-b"] * (200 - kill_at)
    steady = sorted(took[:kill_at])[kill_at // 2]
    TIMINGS["sign, median before failure"] = steady
    TIMINGS["sign that hit the dead hsm-a (failover)"] = took[kill_at]
    TIMINGS["sign, median on hsm-b"] = sorted(took[kill_at + 1:])[(199 - kill_at) // 2]


def test_hsm_a_is_used_again_after_the_cool_down(
    pair: list[PairMember], ceremony: Ceremony, pool: HSMPool, now: list[float], span_exporter: InMemorySpanExporter
) -> None:
    digest = hashlib.sha256(b"recovery").digest()

    def sign() -> str:
        span_exporter.clear()
        _verify_raw(ceremony.public_key, digest, pool.sign_digest(ceremony.key_id, SignMechanism.ECDSA, digest))
        (member,) = _members_of(span_exporter)
        return member

    pair[0].kill()
    try:
        assert sign() == "hsm-b"
        now[0] += COOL_DOWN_S + 1
        assert sign() == "hsm-b"  # retried after the cool-down while still dead: down again, hsm-b signs
        assert pool.health() == {"hsm-a": False, "hsm-b": True}
    finally:
        pair[0].revive()
    assert sign() == "hsm-b"  # back, but its new cool-down has not passed
    now[0] += COOL_DOWN_S - 0.1
    assert sign() == "hsm-b"
    now[0] += 0.2
    began = time.perf_counter()
    assert sign() == "hsm-a"  # same process, same pool: reinitialized and logged in again
    TIMINGS["first sign on hsm-a after recovery"] = (time.perf_counter() - began) * 1000
    assert sign() == "hsm-a"
    assert pool.health() == {"hsm-a": True, "hsm-b": True}


def test_hsm_b_dies_and_hsm_a_is_not_disturbed(
    pair: list[PairMember], ceremony: Ceremony, pool: HSMPool, now: list[float], span_exporter: InMemorySpanExporter
) -> None:
    digest = hashlib.sha256(b"b dies").digest()
    with _dead(pair[1], pool, now):
        assert pool.health() == {"hsm-a": True, "hsm-b": False}
        for _ in range(3):
            pool.sign_digest(ceremony.key_id, SignMechanism.ECDSA, digest)
    assert _members_of(span_exporter) == ["hsm-a"] * 3


def test_cli_ca_init_with_two_members_replicates_both_ca_keys(tmp_path: Path) -> None:
    """`hapki ca init` on a two-member config: SO PIN files found beside the PIN files, keys in both tokens."""
    env = LocalEnv(tmp_path / "env").start()  # its own NATS, MariaDB and store: the CLI runs as a child process
    try:
        hsm_b = SoftHSM(env.base_dir, "hsm-b")
        hsm_b.init_token("hapki-b")
        module_b = hsm_b.dir / "libsofthsm2-pair-cli-hsm-b.so"
        shutil.copyfile(SYSTEM_MODULE, module_b)
        members = [*stack.hsm_config(env).members, HSMMember(
            name="hsm-b", module_path=module_b, token_label="hapki-b", pin_file=hsm_b.pin_file("hapki-b"),
            softhsm_conf=hsm_b.conf_path,
        )]
        config = stack.cara_config(env).model_copy(update={"hsm": HSMConfig(members=members)})
        config_path = stack.write_config(config, tmp_path / "cara.toml")
        command = [*stack.hapki_command(), "ca", "init", "--config", str(config_path), "--out", str(tmp_path)]

        so_pin = hsm_b.so_pin_file("hapki-b")
        so_pin.rename(tmp_path / "hidden.so-pin")
        refused = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and str(so_pin) in refused.stderr
        (tmp_path / "hidden.so-pin").rename(so_pin)

        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        root = x509.load_pem_x509_certificate((tmp_path / "root.pem").read_bytes())
        issuing = x509.load_pem_x509_certificate((tmp_path / "issuing.pem").read_bytes())
        issuing.verify_directly_issued_by(root)
        for store, label in ((env.hsm, stack.TOKEN), (hsm_b, "hapki-b")):
            pin = store.pin_file(label).read_text().strip()
            tool = ["pkcs11-tool", "--module", SYSTEM_MODULE, "--token-label", label, "--login", "--pin", pin]
            run_env = {**os.environ, **store.env}
            listing = subprocess.run([*tool, "--list-objects"], env=run_env, check=True, capture_output=True,
                                     text=True, timeout=60).stdout
            for cert, role, algorithm in ((root, "root", hashes.SHA384()), (issuing, "issuing", hashes.SHA256())):
                (key_id,) = set(re.findall(rf"label:\s+hapki-{role}-([0-9a-f]{{32}})", listing))
                digest = hashlib.new(algorithm.name, label.encode()).digest()
                (tmp_path / "digest").write_bytes(digest)
                subprocess.run([*tool, "--sign", "--mechanism", "ECDSA", "--id", key_id, "--input-file",
                                str(tmp_path / "digest"), "--output-file", str(tmp_path / "sig")],
                               env=run_env, check=True, capture_output=True, timeout=60)
                # this token's copy signs under the certified public key
                _verify_raw(cert.public_key(), digest, (tmp_path / "sig").read_bytes(), algorithm)
    finally:
        env.stop()
