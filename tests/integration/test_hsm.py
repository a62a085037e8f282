"""The HSM adapter and the CA ceremony against a real SoftHSM2 token."""

from __future__ import annotations

import asyncio
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest_hsm import TOKEN, WRONG_PIN_TOKEN, SoftHSMStore, hsm_pool, p256_key, softhsm  # noqa: F401 (fixtures)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters

from hapki.cara import issuance
from hapki.cara.ca_init import CAHierarchy, create_hierarchy
from hapki.contracts.errors import HSMUnavailable
from hapki.runtime.hsm import PKCS11_LOCK, HSMMemberConfig, HSMPool, HSMPrivateKey, SignMechanism
from hapki.runtime.hsm_library import library_for

pytestmark = pytest.mark.integration

DIGEST = bytes(range(32))


def _leaf(issuing: x509.Certificate, issuing_key: HSMPrivateKey, now: datetime) -> x509.Certificate:
    subject_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    issuer_ski = issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.com")]))
        .issuer_name(issuing.subject)
        .public_key(subject_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("www.example.com")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
        .sign(issuing_key, hashes.SHA256())
    )


def _openssl_verify(tmp_path: Path, root: x509.Certificate, leaf: x509.Certificate, *untrusted: x509.Certificate) -> None:
    (tmp_path / "root.pem").write_bytes(root.public_bytes(Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(Encoding.PEM))
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp_path / "root.pem")]
    if untrusted:
        (tmp_path / "chain.pem").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in untrusted))
        args += ["-untrusted", str(tmp_path / "chain.pem")]
    result = subprocess.run([*args, str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def hierarchy(hsm_pool: HSMPool) -> CAHierarchy:
    # openssl verifies against the wall clock, so the ceremony runs at the real "now" (the test is the edge).
    return create_hierarchy(hsm_pool, now=datetime.now(UTC))


def test_generated_key_is_sensitive_non_extractable_and_sign_only(
    softhsm: SoftHSMStore, hsm_pool: HSMPool, p256_key: HSMPrivateKey
) -> None:
    library = library_for(softhsm.module_path)
    with PKCS11_LOCK:
        # No PIN: login is per token per process, and the pool already holds it.
        session = library.get().get_token(token_label=TOKEN).open()
        try:
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=p256_key.key_id)
            attrs = private.get_attributes([
                Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
                Attribute.ALWAYS_SENSITIVE, Attribute.NEVER_EXTRACTABLE, Attribute.LOCAL,
                Attribute.SIGN, Attribute.DERIVE, Attribute.DECRYPT, Attribute.UNWRAP, Attribute.LABEL,
            ])
            public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=p256_key.key_id)
            public_attrs = public.get_attributes([Attribute.TOKEN, Attribute.VERIFY, Attribute.ENCRYPT, Attribute.WRAP])
        finally:
            session.close()
    assert attrs[Attribute.TOKEN] and attrs[Attribute.PRIVATE] and attrs[Attribute.LOCAL]
    assert attrs[Attribute.SENSITIVE] and attrs[Attribute.ALWAYS_SENSITIVE]
    assert not attrs[Attribute.EXTRACTABLE] and attrs[Attribute.NEVER_EXTRACTABLE]
    assert attrs[Attribute.SIGN]
    assert not (attrs[Attribute.DERIVE] or attrs[Attribute.DECRYPT] or attrs[Attribute.UNWRAP])
    assert attrs[Attribute.LABEL] == f"test-{p256_key.key_id.hex()}"
    assert public_attrs[Attribute.TOKEN] and public_attrs[Attribute.VERIFY]
    assert not (public_attrs[Attribute.ENCRYPT] or public_attrs[Attribute.WRAP])


def test_hierarchy_and_hsm_signed_leaf_pass_openssl_x509_strict(
    hsm_pool: HSMPool, hierarchy: CAHierarchy, tmp_path: Path
) -> None:
    root, issuing = hierarchy.root_cert, hierarchy.issuing_cert
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey) and root.public_key().curve.name == "secp384r1"
    assert hierarchy.issuing_curve == "secp256r1"
    assert hsm_pool.public_key(hierarchy.root_key_id).public_numbers() == root.public_key().public_numbers()
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).critical
    issuing_bc = issuing.extensions.get_extension_for_class(x509.BasicConstraints)
    assert issuing_bc.critical and issuing_bc.value.ca and issuing_bc.value.path_length == 0
    # the same serial rule as end-entity certificates: positive, at most 20 octets, 151 CSPRNG bits
    assert 0 < issuing.serial_number and issuing.serial_number.bit_length() == issuance.SERIAL_RANDOM_BITS + 1
    assert root.not_valid_after_utc.year - root.not_valid_before_utc.year == 20
    assert issuing.not_valid_after_utc.year - issuing.not_valid_before_utc.year == 10

    _openssl_verify(tmp_path, root, issuing)
    issuing_key = hsm_pool.private_key(hierarchy.issuing_key_id)
    leaf = _leaf(issuing, issuing_key, datetime.now(UTC))
    leaf.verify_directly_issued_by(issuing)
    issuing.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    _openssl_verify(tmp_path, root, leaf, issuing)


def test_eight_threads_sign_concurrently(p256_key: HSMPrivateKey) -> None:
    def work(n: int) -> list[tuple[bytes, bytes]]:
        out = []
        for i in range(100):
            data = f"{n}-{i}".encode()
            out.append((data, p256_key.sign(data, ec.ECDSA(hashes.SHA256()))))
        return out

    with ThreadPoolExecutor(8) as executor:
        results = [pair for batch in executor.map(work, range(8)) for pair in batch]
    assert len(results) == 800
    for data, signature in results:
        p256_key.public_key().verify(signature, data, ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize("broken", ["missing module", "wrong PIN"])
def test_broken_member_yields_hsm_unavailable(softhsm: SoftHSMStore, hsm_pool: HSMPool, broken: str) -> None:
    if broken == "missing module":
        member = HSMMemberConfig("hsm-x", str(softhsm.dir / "no-such-module.so"), TOKEN, softhsm.pin_file)
    else:
        member = softhsm.member("hsm-x", token=WRONG_PIN_TOKEN, pin_file=softhsm.wrong_pin_file)
    pool = HSMPool([member])
    try:
        with pytest.raises(HSMUnavailable) as opened:
            pool.open()
        assert opened.value.details == {"members": {"hsm-x": "down"}}
        with pytest.raises(HSMUnavailable):
            pool.sign_digest(os.urandom(16), SignMechanism.ECDSA, DIGEST)
        assert pool.health() == {"hsm-x": False}
    finally:
        pool.close()  # an open() that raised still holds the library: the pool keeps retrying until closed


def test_pool_fails_over_past_a_broken_member(softhsm: SoftHSMStore, hsm_pool: HSMPool, p256_key: HSMPrivateKey) -> None:
    broken = softhsm.member("hsm-bad", token=WRONG_PIN_TOKEN, pin_file=softhsm.wrong_pin_file)
    with HSMPool([broken, softhsm.member("hsm-good")]) as pool:
        key = pool.private_key(p256_key.key_id)
        key.public_key().verify(key.sign(b"x", ec.ECDSA(hashes.SHA256())), b"x", ec.ECDSA(hashes.SHA256()))
        assert pool.health() == {"hsm-bad": False, "hsm-good": True}
    # The second pool shared the login of the session pool and must not have ended it.
    p256_key.sign(b"still logged in", ec.ECDSA(hashes.SHA256()))


def test_down_member_is_retried_only_after_the_cool_down(
    softhsm: SoftHSMStore, hsm_pool: HSMPool, p256_key: HSMPrivateKey, tmp_path: Path
) -> None:
    now = [1000.0]
    pin_file = tmp_path / "late.pin"  # missing for now: the member cannot log in
    pool = HSMPool([softhsm.member("hsm-late", pin_file=pin_file)], retry_after_s=5.0, clock=lambda: now[0])
    try:
        with pytest.raises(HSMUnavailable):
            pool.open()
        pin_file.write_text(softhsm.pin_file.read_text())
        pin_file.chmod(0o600)
        now[0] += 4.9
        assert pool.health() == {"hsm-late": False}
        now[0] += 0.2
        assert pool.health() == {"hsm-late": True}
        assert len(pool.sign_digest(p256_key.key_id, SignMechanism.ECDSA, DIGEST)) == 64
    finally:
        pool.close()


def test_sessions_voided_by_reinitialize_are_reopened(softhsm: SoftHSMStore, hsm_pool: HSMPool, p256_key: HSMPrivateKey) -> None:
    with PKCS11_LOCK:
        library_for(softhsm.module_path).reinitialize()  # C_Finalize + C_Initialize
    p256_key.public_key().verify(p256_key.sign(b"y", ec.ECDSA(hashes.SHA256())), b"y", ec.ECDSA(hashes.SHA256()))
    assert hsm_pool.health() == {"hsm-a": True}


def test_a_module_path_serves_one_softhsm_conf_at_a_time(softhsm: SoftHSMStore, tmp_path: Path) -> None:
    module = tmp_path / "libsofthsm2-copy.so"  # its own library instance: the session pool is not disturbed
    module.write_bytes(Path(softhsm.module_path).read_bytes())
    pools = []
    for name in ("one", "two"):
        store = tmp_path / name
        (store / "tokens").mkdir(parents=True)
        conf = store / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {store / 'tokens'}\nobjectstore.backend = file\n")
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", name, "--so-pin", "1234", "--pin", "5678"],
                       env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=True, capture_output=True, timeout=60)
        pools.append(HSMPool([HSMMemberConfig(f"hsm-{name}", str(module), name, softhsm.pin_file, conf)]))
    one, two = pools
    one.open()
    try:
        with pytest.raises(ValueError, match="in use with SOFTHSM2_CONF"):
            two.open()
    finally:
        one.close()
    two.open()  # the last close finalized the library; it comes back up with the second config
    try:
        assert two.health() == {"hsm-two": True}
    finally:
        two.close()


def test_unknown_key_id_does_not_take_the_member_down(hsm_pool: HSMPool) -> None:
    with pytest.raises(HSMUnavailable) as missing:
        hsm_pool.sign_digest(os.urandom(16), SignMechanism.ECDSA, DIGEST)
    assert missing.value.details["key_missing_on"] == ["hsm-a"]
    assert hsm_pool.health() == {"hsm-a": True}


def test_key_id_cannot_be_generated_twice(hsm_pool: HSMPool, p256_key: HSMPrivateKey) -> None:
    with pytest.raises(ValueError, match="already in use"):
        hsm_pool.generate_ec_key("again", p256_key.key_id, ec.SECP256R1())


async def test_hsm_sign_span_is_a_child_of_the_callers_span(
    hsm_pool: HSMPool, p256_key: HSMPrivateKey, span_exporter: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        await hsm_pool.asign(p256_key.key_id, SignMechanism.ECDSA, DIGEST)
        # A builder run in a thread: asyncio.to_thread copies contextvars, so the span still nests.
        await asyncio.to_thread(
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "csr")]))
            .sign, p256_key, hashes.SHA256(),
        )
    spans = [s for s in span_exporter.get_finished_spans() if s.name == "hsm.sign"]
    assert len(spans) == 2
    for span in spans:
        assert span.parent is not None and span.parent.span_id == caller.get_span_context().span_id
        assert span.context.trace_id == caller.get_span_context().trace_id
        assert span.attributes["hsm.member"] == "hsm-a"
        assert span.attributes["hsm.key_id"] == p256_key.key_id.hex()


# --- least privilege at run time (issue 6 item 4) ---------------------------------------------------------


def _ec_params(session: object) -> object:
    return session.create_domain_parameters(  # type: ignore[attr-defined]
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)


def test_the_runtime_session_cannot_create_or_export_keys(softhsm: SoftHSMStore, hsm_pool: HSMPool,
                                                          p256_key: HSMPrivateKey) -> None:
    """CARA's pool opens read-only sessions: the token itself refuses to store a new key or to change one, and the
    CA key (sensitive, non-extractable) can be neither read nor wrapped out, even under a key the caller made."""
    runtime = HSMPool([softhsm.member("hsm-runtime")])  # as CaraRuntime opens it (rw=False by default)
    runtime.open()
    try:
        runtime.verify_keys([p256_key.key_id])  # a ceremony key: sign-only, sensitive, non-extractable
        with pytest.raises(ValueError, match="read-only"):
            runtime.generate_ec_key("runtime-key", os.urandom(16), ec.SECP256R1())
        with PKCS11_LOCK:
            session = runtime._members[0].session  # the very session the service signs through
            with pytest.raises(p11.SessionReadOnly):
                _ec_params(session).generate_keypair(store=True, id=os.urandom(16), label="runtime-key")
            with pytest.raises(p11.SessionReadOnly):
                session.generate_key(KeyType.AES, 256, store=True, id=os.urandom(16), label="runtime-aes")
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=p256_key.key_id)
            with pytest.raises(p11.AttributeSensitive):
                private[Attribute.VALUE]  # noqa: B018 (the read is the test)
            with pytest.raises((p11.SessionReadOnly, p11.AttributeReadOnly)):
                private[Attribute.EXTRACTABLE] = True
            with pytest.raises(p11.SessionReadOnly):
                private.destroy()
            # PKCS#11 lets a read-only session make a session key (gone at logout, never stored); what matters is
            # that the CA key does not leave under it.
            wrapper = session.generate_key(KeyType.AES, 256, store=False,
                                           capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP)
            with pytest.raises(p11.KeyUnextractable):
                wrapper.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        assert len(runtime.sign_digest(p256_key.key_id, SignMechanism.ECDSA, DIGEST)) == 64  # it still signs
        assert runtime.health() == {"hsm-runtime": True}
    finally:
        runtime.close()


def test_a_key_that_is_not_sign_only_is_refused(softhsm: SoftHSMStore, hsm_pool: HSMPool) -> None:
    """A key someone created extractable (or able to decrypt) stops the service at start and is never signed with."""
    key_id = os.urandom(16)
    with PKCS11_LOCK:
        public, private = _ec_params(hsm_pool._members[0].session).generate_keypair(
            store=True, id=key_id, label="not-sign-only", capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            private_template={Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                              Attribute.SIGN: True, Attribute.DECRYPT: False, Attribute.UNWRAP: False,
                              Attribute.DERIVE: False})
    runtime = HSMPool([softhsm.member("hsm-runtime")])
    runtime.open()
    try:
        with pytest.raises(ValueError, match=rf"key {key_id.hex()} is not a sign-only, non-extractable key.*EXTRACTABLE"):
            runtime.verify_keys([key_id])
        with pytest.raises(HSMUnavailable) as refused:
            runtime.sign_digest(key_id, SignMechanism.ECDSA, DIGEST)
        assert refused.value.details["key_missing_on"] == ["hsm-runtime"]
        assert runtime.health() == {"hsm-runtime": True}  # the member stays up for its good keys
    finally:
        runtime.close()
        with PKCS11_LOCK:
            private.destroy()
            public.destroy()
