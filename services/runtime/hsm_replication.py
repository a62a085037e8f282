"""Key replication between HSM members: one CA key in every token of the pool, copied the way HSM vendors do it.

A vendor cluster (Luna HA groups, nShield Security Worlds, CloudHSM clusters) shares a cluster key among its
members inside the hardware and copies keys wrapped under it; the key never exists in the clear outside an HSM.
SoftHSM has no cluster, so this module does the same with standard PKCS#11 calls:

1. `provision_kek`: the Security Officer of every token imports the same AES-256 key-encryption key (KEK) with
   CKA_TRUSTED set. Only an SO session may set CKA_TRUSTED, and SoftHSM lets the SO create public objects only,
   so the KEK is CKA_PRIVATE=false (visible to unauthenticated sessions) but sensitive and non-extractable.
   HONEST LIMIT: the KEK bytes are drawn on this host and live in this process's memory for the few
   milliseconds of the import; Python cannot erase them (python-pkcs11 copies them into immutable bytes), so
   they stay in freed heap memory until it is reused. This is a stand-in for a vendor's in-hardware cluster-key
   sync, acceptable for the lab and for SoftHSM, not for a production CA.
2. `generate_replicated_ec_key`: the key pair is generated in the first member with CKA_EXTRACTABLE and
   CKA_WRAP_WITH_TRUSTED (it can leave the token only wrapped under a trusted key), wrapped with
   CKM_AES_KEY_WRAP_PAD (RFC 5649) under the KEK, unwrapped into every other member as a sensitive,
   non-extractable, sign-only token key with the same CKA_ID and label, the public key object is created next to
   it, and CKA_EXTRACTABLE is cleared in the source (SoftHSM allows true -> false, never back). The wrapped blob
   exists only in memory during the call. Every member then signs a random digest that must verify under the
   one public key, and the key attributes are read back; any failure destroys what the ceremony created.

Facts measured with SoftHSM 2.6.1 + python-pkcs11 0.10.1:
- PKCS#11 sets CKA_NEVER_EXTRACTABLE and CKA_ALWAYS_SENSITIVE to false on unwrapped keys and SoftHSM refuses
  them in the template (AttributeReadOnly), so the copies report never_extractable=false, as does the source,
  which was extractable for a moment. What guarantees the key never left an HSM in the clear is
  CKA_WRAP_WITH_TRUSTED plus an SO-only CKA_TRUSTED KEK, not those attributes.
- SO login fails (AnotherUserAlreadyLoggedIn) while any session in the process is logged in as user on that
  token: provision the KEK before an HSMPool on these members is opened.
- Unwrapping under a different KEK gives GeneralError, indistinguishable from a dead token; the ceremony
  compares the KEKs' CKA_CHECK_VALUE (3-byte KCV) across members first to tell the two apart.
No python-pkcs11 exception leaves this module: a token that does not answer becomes `HSMUnavailable`, a
refusal (PIN, login state, template, missing or differing KEK, key id in use) a `ValueError`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from hapki.contracts.errors import HSMUnavailable
from hapki.runtime.hsm import HSMMemberConfig
from hapki.runtime.hsm_library import PKCS11_LOCK, library_for

__all__ = ["KEK_ID", "generate_replicated_ec_key", "provision_kek"]

_log = logging.getLogger(__name__)

KEK_ID = b"hapki-cluster-kek"
"""CKA_ID (and, decoded, CKA_LABEL) of the cluster KEK in every member."""

_CURVES = {"secp256r1", "secp384r1"}
# The token refused what was asked: retrying will not help, the caller must change something.
_REFUSALS = (
    p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinExpired, p11.PinLocked, p11.UserPinNotInitialized,
    p11.AnotherUserAlreadyLoggedIn, p11.UserTooManyTypes, p11.SessionReadWriteSOExists,
    p11.AttributeReadOnly, p11.AttributeTypeInvalid, p11.AttributeValueInvalid, p11.AttributeSensitive,
    p11.TemplateIncomplete, p11.TemplateInconsistent, p11.MechanismInvalid, p11.MechanismParamInvalid,
    p11.KeyNotWrappable, p11.KeyUnextractable, p11.KeyTypeInconsistent, p11.FunctionNotSupported,
    p11.DomainParamsInvalid, p11.MultipleTokensReturned, p11.MultipleObjectsReturned, p11.ArgumentsBad,
)
_PRIVATE_CHECKS = (Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
                   Attribute.ALWAYS_SENSITIVE, Attribute.SIGN, Attribute.DERIVE, Attribute.DECRYPT, Attribute.UNWRAP)


def provision_kek(members: Sequence[HSMMemberConfig], so_pin_files: Mapping[str, Path], *,
                  kek_id: bytes = KEK_ID) -> None:
    """Import one fresh trusted AES-256 KEK into every member, replacing any earlier KEK under `kek_id`.

    `so_pin_files` maps member name -> file whose first line is that token's SO PIN. Keys replicated under an
    earlier KEK are unaffected. Run it before an HSMPool on these members logs in (see the module docstring).
    """
    _check_members(members, minimum=1)
    missing = [m.name for m in members if m.name not in so_pin_files]
    if missing:
        raise ValueError(f"no SO PIN file for HSM member(s) {missing}")
    pins = {m.name: _read_pin(so_pin_files[m.name], m.name, "SO") for m in members}
    with PKCS11_LOCK, _sessions(members, pins, so=True) as sessions:
        kek = bytearray(secrets.token_bytes(32))
        try:
            for member, session in zip(members, sessions, strict=True):
                with _step(member, "import the KEK"):
                    for old in list(session.get_objects({Attribute.ID: kek_id})):  # list(): end the search first
                        old.destroy()
                    session.create_object({
                        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                        Attribute.VALUE: kek, Attribute.ID: kek_id, Attribute.LABEL: kek_id.decode(errors="replace"),
                        Attribute.TOKEN: True, Attribute.PRIVATE: False,  # the SO may create public objects only
                        Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.TRUSTED: True,
                        Attribute.WRAP: True, Attribute.UNWRAP: True, Attribute.ENCRYPT: False,
                        Attribute.DECRYPT: False, Attribute.SIGN: False, Attribute.VERIFY: False,
                        Attribute.DERIVE: False, Attribute.MODIFIABLE: False,
                    })
        finally:
            kek[:] = bytes(len(kek))  # best effort: python-pkcs11 made its own copy (module docstring)
            del kek
        _kek_check_value(members, sessions, kek_id)  # all equal, or ValueError
    _log.info("cluster KEK %s provisioned in %s", kek_id.hex(), [m.name for m in members])


def generate_replicated_ec_key(members: Sequence[HSMMemberConfig], label: str, key_id: bytes,
                               curve: ec.EllipticCurve, *, kek_id: bytes = KEK_ID) -> ec.EllipticCurvePublicKey:
    """Generate a sign-only EC key pair in `members[0]`, copy it into every other member, return its public key.

    Every member must be reachable and hold the same KEK (`provision_kek`). An open HSMPool on the same members
    may keep running: the ceremony shares its login and holds PKCS11_LOCK throughout (about 30 ms on SoftHSM).
    """
    _check_members(members, minimum=2)
    if curve.name not in _CURVES:
        raise ValueError(f"unsupported curve {curve.name}; use one of {sorted(_CURVES)}")
    if not key_id:
        raise ValueError("key_id must not be empty")
    pins = {m.name: _read_pin(m.pin_file, m.name, "user") for m in members}
    began = time.perf_counter()
    source, targets = members[0], members[1:]
    with PKCS11_LOCK, _sessions(members, pins, so=False) as sessions:
        # Step 1: preconditions: the same KEK everywhere, the key id free everywhere.
        keks = _kek_check_value(members, sessions, kek_id)
        for member, session in zip(members, sessions, strict=True):
            with _step(member, "look for the key id"):
                if list(session.get_objects({Attribute.ID: key_id})):
                    raise ValueError(f"key id {key_id.hex()} is already in use on {member.name}")
        created: list[tuple[HSMMemberConfig, Any]] = []
        try:
            # Step 2: the key pair in the source, extractable only under a trusted key.
            with _step(source, "generate the key pair"):
                params = sessions[0].create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve.name)}, local=True)
                public, private = params.generate_keypair(
                    id=key_id, label=label, store=True, capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    public_template={Attribute.VERIFY: True, Attribute.ENCRYPT: False, Attribute.WRAP: False},
                    private_template={
                        Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                        Attribute.WRAP_WITH_TRUSTED: True, Attribute.SIGN: True, Attribute.DERIVE: False,
                        Attribute.DECRYPT: False, Attribute.UNWRAP: False,
                    },
                )
                created += [(source, private), (source, public)]
                point = public.get_attributes([Attribute.EC_PARAMS, Attribute.EC_POINT])
                public_key = load_der_public_key(encode_ec_public_key(public))
            # Step 3: wrap under the KEK. The blob is ciphertext, but anyone holding it and a user PIN could
            # unwrap it as an extractable key in a member, so it lives in this frame only.
            with _step(source, "wrap the key under the KEK"):
                blob = keks[0].wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
            # Step 4: unwrap into each target as non-extractable and sign-only, and add the public half.
            for member, session, kek in zip(targets, sessions[1:], keks[1:], strict=True):
                with _step(member, "unwrap the key"):
                    created.append((member, kek.unwrap_key(
                        ObjectClass.PRIVATE_KEY, KeyType.EC, blob, id=key_id, label=label,
                        mechanism=Mechanism.AES_KEY_WRAP_PAD, store=True, capabilities=MechanismFlag.SIGN,
                        template={
                            Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                            Attribute.WRAP_WITH_TRUSTED: True,
                            # python-pkcs11's generic template also names public-key capabilities, which
                            # SoftHSM refuses on a private key (AttributeTypeInvalid): leave them out.
                            Attribute.ENCRYPT: pkcs11.DEFAULT, Attribute.WRAP: pkcs11.DEFAULT,
                            Attribute.VERIFY: pkcs11.DEFAULT,
                        },
                    )))
                with _step(member, "create the public key object"):
                    created.append((member, session.create_object({
                        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.EC,
                        Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.ID: key_id, Attribute.LABEL: label,
                        Attribute.EC_PARAMS: point[Attribute.EC_PARAMS], Attribute.EC_POINT: point[Attribute.EC_POINT],
                        Attribute.VERIFY: True, Attribute.ENCRYPT: False, Attribute.WRAP: False,
                        Attribute.DERIVE: False,
                    })))
            del blob
            # Step 5: from now on the source key cannot leave its token either.
            with _step(source, "clear CKA_EXTRACTABLE"):
                private[Attribute.EXTRACTABLE] = False
            # Step 6: check the HSMs' work before anyone relies on it.
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            _check_copies(members, sessions, key_id, public_key)
        except BaseException:
            _destroy(created, key_id)
            raise
    _log.info("key %s (%s) generated in %s and replicated to %s in %.1f ms", key_id.hex(), curve.name,
              source.name, [m.name for m in targets], (time.perf_counter() - began) * 1000)
    return public_key


# --- everything below runs with PKCS11_LOCK held ---


@contextlib.contextmanager
def _sessions(members: Sequence[HSMMemberConfig], pins: Mapping[str, str], *, so: bool) -> Iterator[list[Any]]:
    """One R/W session per member, logged in as SO or user; closed (and libraries released) on exit."""
    attached: list[HSMMemberConfig] = []
    opened: list[tuple[Any, Any]] = []  # (session, library generation it belongs to)
    try:
        for member in members:
            library_for(member.module_path).attach(member.softhsm_conf, member.name)  # ValueError: other config
            attached.append(member)
        for member in members:
            with _step(member, "log in as SO" if so else "log in"):
                opened.append(_open(member, pins[member.name], so=so))
        yield [session for session, _ in opened]
    finally:
        for member, (session, generation) in zip(members, opened, strict=False):
            library = library_for(member.module_path)
            if library.generation == generation and library.lib is not None and library.lib.initialized:
                try:
                    session.close()  # logs out only if this session logged in (not when sharing a pool's login)
                except p11.PKCS11Error:
                    pass
        for member in attached:
            library_for(member.module_path).detach()


def _open(member: HSMMemberConfig, pin: str, *, so: bool) -> tuple[Any, Any]:
    library = library_for(member.module_path)
    try:
        token = library.get().get_token(token_label=member.token_label)
    except _REFUSALS:
        raise
    except p11.PKCS11Error:
        # A library another member voided, or a token that died and came back: same cure as HSMPool's.
        token = library.reinitialize().get_token(token_label=member.token_label)
    if so:
        return token.open(rw=True, so_pin=pin), library.generation
    try:
        return token.open(rw=True, user_pin=pin), library.generation
    except p11.UserAlreadyLoggedIn:
        # Login is per token per process: an open HSMPool holds it; share it, and never log it out.
        return token.open(rw=True), library.generation


@contextlib.contextmanager
def _step(member: HSMMemberConfig, what: str) -> Iterator[None]:
    """Turn python-pkcs11 errors (and unreadable files) of one step into HSMUnavailable or ValueError."""
    try:
        yield
    except (p11.AnotherUserAlreadyLoggedIn, p11.SessionReadOnlyExists):
        # SessionReadOnlyExists: the SO cannot log in while a read-only session is open (an HSMPool's, since pools
        # are read-only at run time); AnotherUserAlreadyLoggedIn: a read/write pool holds the user login.
        raise ValueError(f"HSM member {member.name}: cannot {what}: a user session in this process holds the "
                         "token's login (provision the KEK before opening an HSMPool on it)") from None
    except _REFUSALS as exc:
        raise ValueError(f"HSM member {member.name}: cannot {what}: the token refused ({type(exc).__name__})") from None
    except (p11.PKCS11Error, OSError) as exc:
        raise HSMUnavailable(f"HSM member {member.name} failed to {what}",
                             {"member": member.name, "error": type(exc).__name__}) from None


def _kek_check_value(members: Sequence[HSMMemberConfig], sessions: Sequence[Any], kek_id: bytes) -> list[Any]:
    """The KEK of each member; ValueError unless every one is trusted and all share one check value."""
    keks, values = [], {}
    for member, session in zip(members, sessions, strict=True):
        with _step(member, "find the KEK"):
            try:
                kek = session.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES, id=kek_id)
            except p11.NoSuchKey:
                # A dead token also answers "no such key"; one whose slot still answers really lacks the KEK.
                library_for(member.module_path).get().get_token(token_label=member.token_label)
                raise ValueError(f"HSM member {member.name} has no KEK {kek_id.hex()}: run provision_kek") from None
            attrs = kek.get_attributes([Attribute.TRUSTED, Attribute.UNWRAP, Attribute.WRAP, Attribute.CHECK_VALUE])
        if not (attrs[Attribute.TRUSTED] and attrs[Attribute.WRAP] and attrs[Attribute.UNWRAP]):
            raise ValueError(f"KEK {kek_id.hex()} on {member.name} is not a trusted wrap/unwrap key")
        keks.append(kek)
        values[member.name] = bytes(attrs[Attribute.CHECK_VALUE]).hex()
    if len(set(values.values())) != 1:
        raise ValueError(f"the members hold different KEKs under {kek_id.hex()} (check values {values}): "
                         "run provision_kek again")
    return keks


def _check_copies(members: Sequence[HSMMemberConfig], sessions: Sequence[Any], key_id: bytes,
                  public_key: ec.EllipticCurvePublicKey) -> None:
    """Every member signs under `public_key`; the private keys are sensitive, non-extractable and sign-only."""
    algorithm = hashes.SHA384() if public_key.curve.key_size > 256 else hashes.SHA256()
    digest = os.urandom(algorithm.digest_size)
    half = (public_key.curve.key_size + 7) // 8
    for index, (member, session) in enumerate(zip(members, sessions, strict=True)):
        with _step(member, "check the replicated key"):
            private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=key_id)
            attrs = private.get_attributes(list(_PRIVATE_CHECKS))
            raw = private.sign(digest, mechanism=Mechanism.ECDSA)
        expected = {
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True, Attribute.DERIVE: False, Attribute.DECRYPT: False, Attribute.UNWRAP: False,
        }
        if index == 0:
            expected[Attribute.ALWAYS_SENSITIVE] = True  # generated sensitive; copies are "unwrapped", hence false
        wrong = {attr.name: attrs[attr] for attr, value in expected.items() if bool(attrs[attr]) != value}
        if wrong:
            raise ValueError(f"key {key_id.hex()} on {member.name} has unexpected attributes {wrong}")
        try:
            signature = encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
            public_key.verify(signature, digest, ec.ECDSA(Prehashed(algorithm)))
        except InvalidSignature:
            raise ValueError(
                f"the copy of key {key_id.hex()} on {member.name} does not sign under its public key") from None


def _destroy(created: Sequence[tuple[HSMMemberConfig, Any]], key_id: bytes) -> None:
    """Best-effort rollback of a failed ceremony; what cannot be destroyed is logged for the operator."""
    left = []
    for member, obj in reversed(created):
        try:
            obj.destroy()
        except p11.PKCS11Error:
            left.append(member.name)
    if left:
        _log.error("replication of key %s failed and its objects could not be removed from %s (CKA_ID %s; the "
                   "source copy may still be extractable under the KEK): destroy them by hand",
                   key_id.hex(), sorted(set(left)), key_id.hex())


def _check_members(members: Sequence[HSMMemberConfig], *, minimum: int) -> None:
    if len(members) < minimum:
        raise ValueError(f"replication needs at least {minimum} HSM member(s), got {len(members)}")
    if len({m.name for m in members}) != len(members):
        raise ValueError("HSM member names must be unique")


def _read_pin(path: Path, member: str, role: str) -> str:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"HSM member {member}: cannot read the {role} PIN file {path}: {exc.strerror}") from None
    if not lines or not lines[0]:
        raise ValueError(f"HSM member {member}: the {role} PIN file {path} is empty")
    return lines[0]
