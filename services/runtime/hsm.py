"""PKCS#11 adapter: a pool of HSM members that hold the same keys, and the only code that knows it is PKCS#11.

Facts this module is built on (measured with SoftHSM2 2.6 + python-pkcs11 0.10.1; see also hsm_library):
- Every PKCS#11 call holds the process-wide `PKCS11_LOCK`; C_Sign releases the GIL, so Python work goes on.
- Login state is per token per process and `Session.close()` calls C_Logout: one logged-in session per member
  is kept for the process's life. Two pools on one token in one process share (and end) each other's login.
- A dead token shows as ObjectHandleInvalid, NoSuchKey or GeneralError; any PKCS11Error marks the member down,
  and it is re-opened (after reinitializing the library when needed) once a cool-down has passed.
- Least privilege at run time: a pool opens read-only user sessions unless built with `rw=True` (key ceremonies
  only), so the token itself refuses to create, change or destroy token objects through it (CKR_SESSION_READ_ONLY).
  Keys are checked to be sign-only (CKA_SIGN, sensitive, not extractable, no decrypt/unwrap/derive) before first
  use on every member (`verify_keys` at start, `_KeyUnsafe` after), and a PIN file that group or others may read
  stops the pool from opening.
No python-pkcs11 type or exception leaves this module: failures become `HSMUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from opentelemetry import trace
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from hapki.contracts.errors import HSMUnavailable
from hapki.runtime.config import require_owner_only
from hapki.runtime.hsm_key import DigestSigner, HSMPrivateKey, SignMechanism
from hapki.runtime import metrics, telemetry
from hapki.runtime.hsm_library import PKCS11_LOCK, library_for

__all__ = ["HSMMemberConfig", "HSMPool", "HSMPrivateKey", "SignMechanism", "DigestSigner", "PKCS11_LOCK"]

_log = logging.getLogger(__name__)
_tracer = trace.get_tracer("hapki.hsm")
_SIGN_SECONDS = metrics.histogram("hapki.hsm.sign.duration")
_FAILURES = metrics.counter("hapki.hsm.member.failures")
T = TypeVar("T")

_MECHANISMS = {SignMechanism.ECDSA: Mechanism.ECDSA}
_CURVES = {"secp256r1", "secp384r1"}
# Errors that re-initializing the library cannot cure; re-initializing would only cut other members' sessions.
_CREDENTIAL_ERRORS = (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinExpired, p11.PinLocked,
                      p11.UserPinNotInitialized, p11.MultipleTokensReturned)


@dataclass(frozen=True)
class HSMMemberConfig:
    """One HSM (token) of the pool. Every member must hold the same keys under the same CKA_IDs."""

    name: str  # shows in logs, health and the `hsm.member` span attribute, e.g. "hsm-a"
    module_path: str  # PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so
    token_label: str  # tokens are selected by label: slot ids change across restarts
    pin_file: Path  # user PIN, first line of this file; never logged
    softhsm_conf: Path | None = None  # SoftHSM only: SOFTHSM2_CONF for this module's library instance


class _Member:
    """Mutable state of one member; touched only while PKCS11_LOCK is held."""

    def __init__(self, config: HSMMemberConfig) -> None:
        self.config = config
        self.library = library_for(config.module_path)
        self.session: Any = None
        self.generation = -1  # library generation the session belongs to
        self.keys: dict[bytes, Any] = {}  # CKA_ID -> private key handle
        self.up = False
        self.down_at: float | None = None  # None: not tried since open()/close()

    @property
    def name(self) -> str:
        return self.config.name

    def session_current(self) -> bool:
        # False after a reinitialize by any member, or a finalize by anyone else: the session is void.
        lib = self.library.lib
        return (self.session is not None and self.generation == self.library.generation
                and lib is not None and lib.initialized)


# What a CA key must be, attribute by attribute. CKA_WRAP is not an attribute of a private key (the token answers
# AttributeTypeInvalid): a private key cannot wrap; CKA_UNWRAP and CKA_DECRYPT are what it could be misused for.
SIGN_ONLY: dict[Attribute, bool] = {
    Attribute.SIGN: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
    Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.DERIVE: False,
}


def _read_pin(path: Path) -> str:
    try:
        require_owner_only(path, "HSM PIN file")  # also checked at open(); here for a file changed since
    except ValueError as exc:
        raise PermissionError(str(exc)) from None  # an OSError: the member is down, with this reason logged
    lines = path.read_text().splitlines()  # OSError if missing: the member is down, like any other failure
    if not lines or not lines[0]:
        raise OSError(f"PIN file {path} is empty")
    return lines[0]


class _KeyMissing(Exception):
    """The member is alive but does not hold the key."""


class _KeyUnsafe(Exception):
    """The member holds the key, but not as a sign-only, non-extractable key: it is not used there."""


class HSMPool:
    """Signs with the first member that can; members that fail are skipped until `retry_after_s` has passed."""

    def __init__(self, members: Sequence[HSMMemberConfig], *, retry_after_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, rw: bool = False) -> None:
        """`rw`: read/write sessions, for key ceremonies (`hapki ca init`) only; services use read-only ones."""
        if not members:
            raise ValueError("an HSM pool needs at least one member")
        if len({m.name for m in members}) != len(members):
            raise ValueError("HSM member names must be unique")
        if len({(m.module_path, m.softhsm_conf) for m in members}) != len({m.module_path for m in members}):
            raise ValueError("members sharing a module path must share its softhsm_conf (or use a copy of the .so)")
        self._members = [_Member(m) for m in members]
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._rw = rw
        self._public_keys: dict[bytes, ec.EllipticCurvePublicKey] = {}
        self._closed = True

    def __enter__(self) -> HSMPool:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Log in to every member; raise HSMUnavailable if none is usable (the pool keeps retrying later).

        Raises ValueError if another open pool in the process uses a member's module path with another config, or
        if a member's PIN file is accessible to group or others (a missing one only keeps that member down).
        """
        for member in self._members:
            try:
                require_owner_only(member.config.pin_file, f"HSM member {member.name}: PIN file")
            except FileNotFoundError:
                pass
        with PKCS11_LOCK:
            if self._closed:
                attached: list[_Member] = []
                try:
                    for member in self._members:
                        member.library.attach(member.config.softhsm_conf, member.name)
                        attached.append(member)
                except ValueError:
                    for member in attached:
                        member.library.detach()
                    raise
            self._closed = False
            for member in self._members:
                member.down_at = None
                self._usable(member)
                metrics.State.of("hapki.hsm.member.up").watch({"hsm.member": member.name},
                                                              lambda m=member: float(m.up))
            if not any(m.up for m in self._members):
                raise HSMUnavailable("no HSM member could be opened", {"members": self._states()})

    def close(self) -> None:
        """Log out and close every member's session. Later calls raise HSMUnavailable until `open()`."""
        with PKCS11_LOCK:
            if self._closed:
                return
            self._closed = True
            for member in self._members:
                self._drop_session(member)
                member.up, member.down_at = False, None
                metrics.State.of("hapki.hsm.member.up").discard({"hsm.member": member.name})
            for member in self._members:
                member.library.detach()  # the last claim on a library finalizes it

    def health(self) -> dict[str, bool]:
        """Member name -> usable now. Probes live members and retries down ones whose cool-down has passed."""
        with PKCS11_LOCK:
            if not self._closed:
                for member in self._members:
                    if member.up and member.session_current():
                        try:
                            member.library.lib.get_token(token_label=member.config.token_label)
                        except p11.PKCS11Error as exc:
                            self._mark_down(member, exc)
                    else:
                        self._usable(member)
            return {m.name: m.up for m in self._members}

    def sign_digest(self, key_id: bytes, mechanism: SignMechanism, digest: bytes) -> bytes:
        """Sign a host-computed digest with key `key_id`; ECDSA returns raw r || s. Blocks while the HSM works."""
        if not 1 <= len(digest) <= 64:
            raise ValueError(f"digest must be 1..64 bytes, got {len(digest)}")
        p11_mechanism = _MECHANISMS[mechanism]
        with telemetry.span(_tracer, "hsm.sign") as span:
            span.set_attribute("hsm.key_id", key_id.hex())
            waited = time.perf_counter()
            with PKCS11_LOCK:
                began = time.perf_counter()
                span.set_attribute("hsm.lock_wait_ms", (began - waited) * 1000)
                try:
                    member, signature = self._run("sign", lambda m: self._sign_on(m, key_id, p11_mechanism, digest))
                except HSMUnavailable:
                    _SIGN_SECONDS.record(time.perf_counter() - began, {"hsm.member": "none", "pki.outcome": "unavailable"})
                    raise
                _SIGN_SECONDS.record(time.perf_counter() - began, {"hsm.member": member, "pki.outcome": "ok"})
            span.set_attribute("hsm.member", member)
            return signature

    async def asign(self, key_id: bytes, mechanism: SignMechanism, digest: bytes) -> bytes:
        """`sign_digest` in a worker thread; to_thread copies contextvars, so `hsm.sign` nests under the caller."""
        return await asyncio.to_thread(self.sign_digest, key_id, mechanism, digest)

    def public_key(self, key_id: bytes) -> ec.EllipticCurvePublicKey:
        """The public key stored next to the private key `key_id` (CKO_PUBLIC_KEY with the same CKA_ID)."""
        if key_id not in self._public_keys:
            with PKCS11_LOCK:
                _, der = self._run("read a public key", lambda m: encode_ec_public_key(
                    self._find(m, ObjectClass.PUBLIC_KEY, key_id)))
            self._public_keys[key_id] = load_der_public_key(der)  # type: ignore[assignment]
        return self._public_keys[key_id]

    def find_key_id(self, public_key: ec.EllipticCurvePublicKey) -> bytes | None:
        """The CKA_ID of the key pair whose public half is `public_key` in the first usable member, or None: how a
        ceremony finds a CA's key from its certificate (`hapki ca rollover` and the root key)."""

        def search(member: _Member) -> bytes | None:
            found = list(member.session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY,  # list(): finish
                                                     Attribute.KEY_TYPE: KeyType.EC}))  # the search first
            for obj in found:
                if load_der_public_key(encode_ec_public_key(obj)) == public_key:
                    return bytes(obj[Attribute.ID])
            return None

        with PKCS11_LOCK:
            _, key_id = self._run("look a key up by its public key", search)
        return key_id

    def private_key(self, key_id: bytes) -> HSMPrivateKey:
        """A key object for cryptography's builders that signs with `key_id` through this pool."""
        return HSMPrivateKey(self, key_id, self.public_key(key_id))

    def verify_keys(self, key_ids: Sequence[bytes]) -> None:
        """Check that each key is a sign-only key (SIGN_ONLY) on every usable member that holds it; ValueError naming
        each member, key and wrong attribute otherwise. A member that is down now is checked when it is first used."""
        problems = []
        with PKCS11_LOCK:
            for member in self._members:
                if not self._usable(member):
                    continue
                for key_id in key_ids:
                    try:
                        self._sign_key(member, key_id)
                    except _KeyUnsafe as exc:
                        problems.append(str(exc))
                    except _KeyMissing:
                        pass  # logged by _find; signing uses the members that hold the key, as before
                    except p11.PKCS11Error as exc:
                        self._mark_down(member, exc)
        if problems:
            raise ValueError("refusing to use the HSM keys: " + "; ".join(problems))

    def generate_ec_key(self, label: str, key_id: bytes, curve: ec.EllipticCurve) -> ec.EllipticCurvePublicKey:
        """Generate a sign-only, non-extractable EC key pair inside the first usable member (a `rw=True` pool).

        Copying the key to the other members (wrap under a trusted KEK, unwrap) is a separate ceremony.
        """
        if not self._rw:
            raise ValueError("this HSM pool has read-only sessions and cannot create keys; key ceremonies open "
                             "their pool with rw=True")
        if curve.name not in _CURVES:
            raise ValueError(f"unsupported curve {curve.name}; use one of {sorted(_CURVES)}")
        with PKCS11_LOCK:
            _, der = self._run("generate a key", lambda m: self._generate_on(m, label, key_id, curve.name))
        public_key = load_der_public_key(der)
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        self._public_keys[key_id] = public_key
        return public_key

    # --- everything below runs with PKCS11_LOCK held ---

    def _run(self, what: str, operation: Callable[[_Member], T]) -> tuple[str, T]:
        if self._closed:
            raise HSMUnavailable(f"HSM pool is closed, cannot {what}")
        lacking: list[str] = []
        for member in self._members:
            if not self._usable(member):
                continue
            try:
                return member.name, operation(member)
            except _KeyMissing:
                lacking.append(member.name)
            except _KeyUnsafe as exc:
                _log.error("%s; not signing with it", exc)
                lacking.append(member.name)
            except p11.PKCS11Error as exc:
                self._mark_down(member, exc)
        details: dict[str, Any] = {"members": self._states()}
        if lacking:
            details["key_missing_on"] = lacking
        raise HSMUnavailable(f"no HSM member could {what}", details)

    def _usable(self, member: _Member) -> bool:
        if member.up and member.session_current():
            return True
        # A session voided by another member's reinitialize is not this member's failure: reopen right away.
        stale = member.up
        if not stale and member.down_at is not None and self._clock() - member.down_at < self._retry_after_s:
            return False
        try:
            self._open_member(member)
        except (p11.PKCS11Error, OSError) as exc:
            self._mark_down(member, exc)
        return member.up

    def _open_member(self, member: _Member) -> None:
        self._drop_session(member)
        pin = _read_pin(member.config.pin_file)
        try:
            session = self._login(member.library.get(), member.config.token_label, pin, self._rw)
        except _CREDENTIAL_ERRORS:
            raise
        except p11.PKCS11Error as exc:
            _log.warning("HSM member %s: %s while opening; reinitializing %s",
                         member.name, type(exc).__name__, member.library.path)
            session = self._login(member.library.reinitialize(), member.config.token_label, pin, self._rw)
        member.session, member.generation = session, member.library.generation
        if not member.up:
            _log.info("HSM member %s is up", member.name)
        member.up, member.down_at = True, None

    @staticmethod
    def _login(lib: Any, token_label: str, pin: str, rw: bool) -> Any:
        token = lib.get_token(token_label=token_label)
        try:
            return token.open(rw=rw, user_pin=pin)
        except p11.UserAlreadyLoggedIn:
            # Login is per token per process: another session already holds it, and this one shares it.
            return token.open(rw=rw)

    def _drop_session(self, member: _Member) -> None:
        if member.session_current():
            try:
                member.session.close()
            except p11.PKCS11Error:
                pass  # the member is being dropped anyway
        member.session = None
        member.keys.clear()

    def _mark_down(self, member: _Member, exc: BaseException) -> None:
        if member.up or member.down_at is None:
            _log.warning("HSM member %s is down: %s %s", member.name, type(exc).__name__, exc)
            _FAILURES.add(1, {"hsm.member": member.name})
        member.up, member.down_at = False, self._clock()
        member.keys.clear()

    def _states(self) -> dict[str, str]:
        return {m.name: "up" if m.up else "down" for m in self._members}

    def _find(self, member: _Member, object_class: ObjectClass, key_id: bytes) -> Any:
        try:
            return member.session.get_key(object_class=object_class, id=key_id)
        except p11.NoSuchKey:
            # A dead token also answers "no such key"; a token that still answers really lacks the key, and a
            # bad key id must not take every member down.
            member.library.lib.get_token(token_label=member.config.token_label)
            _log.warning("HSM member %s has no key %s", member.name, key_id.hex())
            raise _KeyMissing(key_id.hex()) from None

    def _sign_on(self, member: _Member, key_id: bytes, mechanism: Mechanism, digest: bytes) -> bytes:
        key = member.keys.get(key_id)
        if key is not None:
            try:
                return key.sign(digest, mechanism=mechanism)
            except (p11.ObjectHandleInvalid, p11.KeyHandleInvalid):
                pass  # cached handle went stale (e.g. the token reloaded its objects): look the key up again
        return self._sign_key(member, key_id).sign(digest, mechanism=mechanism)

    def _sign_key(self, member: _Member, key_id: bytes) -> Any:
        """Look up private key `key_id` on `member`, check it is SIGN_ONLY, and cache its handle."""
        key = self._find(member, ObjectClass.PRIVATE_KEY, key_id)
        found = key.get_attributes(list(SIGN_ONLY))
        wrong = {attr.name: bool(found[attr]) for attr, value in SIGN_ONLY.items() if bool(found[attr]) != value}
        if wrong:
            raise _KeyUnsafe(f"HSM member {member.name}: key {key_id.hex()} is not a sign-only, non-extractable key "
                             f"(wrong: {wrong})")
        member.keys[key_id] = key
        return key

    def _generate_on(self, member: _Member, label: str, key_id: bytes, curve_name: str) -> bytes:
        session = member.session
        if list(session.get_objects({Attribute.ID: key_id})):  # list(): finish the search (C_FindObjectsFinal)
            raise ValueError(f"key id {key_id.hex()} is already in use on {member.name}")
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve_name)}, local=True)
        public, private = params.generate_keypair(
            id=key_id, label=label, store=True, capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
            public_template={Attribute.VERIFY: True, Attribute.ENCRYPT: False, Attribute.WRAP: False},
            private_template={
                Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True, Attribute.DERIVE: False, Attribute.DECRYPT: False, Attribute.UNWRAP: False,
            },
        )
        member.keys[key_id] = private
        return encode_ec_public_key(public)
