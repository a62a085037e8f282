"""The OCSP responder's certificate over time: renewed by the active member before it expires, and every member
signing with the newest one.

The delegated responder certificate lives 90 days (it carries id-pkix-ocsp-nocheck, so relying parties cannot
check its revocation: hapki.cara.ca_init). Without renewal every OCSP answer would stop verifying on day 90 after
`hapki ca init`. Each member reads which certificate is newest every `[ocsp] signer_check_seconds` and signs with
it from then on (a new key too, from `hapki ca ocsp-rekey`, once the HSM shows it sign-only); the active member first certifies the same HSM key again when fewer than
`signer_renew_before_days` are left. That needs no new key, so CARA's read-only HSM sessions suffice, and the copy
of the key in every HSM member keeps working.

A renewal is accounted for like a certificate: its serial is reserved in a signing intent (purpose `ocsp_signer`,
hapki.runtime.delegated_intents) with the audit entry `ocsp_signer.certifying` (serial, key, not_after), committed
under the member's epoch before the HSM signs; the certificate, its intent resolved `issued` and
`ocsp_signer.created` after it, under the same epoch. A member that dies in between leaves the intent reserved
(the next activation abandons it) and the first entry naming a certificate that was never stored; the next check
renews again under a new serial.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hapki.cara import issuance
from hapki.cara.ca_init import OCSP_SIGNER_VALIDITY, recertify
from hapki.cara.ocsp import OcspResponder
from hapki.cara.ports import IssuerRecord, OcspSignerRecord
from hapki.cara.role import Activity
from hapki.contracts.errors import FencedOut, HapkiError
from hapki.runtime.metrics import State

__all__ = ["OcspSignerKeeper", "SignerStore"]

log = logging.getLogger("hapki.cara.ocsp_signer")


class SignerStore(Protocol):
    async def ocsp_signer(self, issuer: str) -> OcspSignerRecord | None: ...

    async def ocsp_signer_certifying(self, issuer: str, *, serial: str, key_id: bytes, not_after: datetime,
                                     epoch: int, member: str, now: datetime) -> str: ...

    async def save_ocsp_signer(self, record: OcspSignerRecord, *, not_after: datetime, now: datetime,
                               epoch: int | None = None, intent_id: str | None = None) -> None: ...


class OcspSignerKeeper:
    """Keeps `responder` signing with the newest responder certificate of `issuer`; renews it while active."""

    def __init__(self, *, store: SignerStore, issuer: IssuerRecord, issuing_key: ec.EllipticCurvePrivateKey,
                 responder: OcspResponder, signer_key: Callable[[bytes], ec.EllipticCurvePrivateKey],
                 activity: Activity, member: str, renew_before: timedelta, check_seconds: float,
                 clock: Callable[[], datetime], key_id: bytes | None = None,
                 check_keys: Callable[[Sequence[bytes]], None] | None = None) -> None:
        """`key_id`: the responder's key now; `check_keys`: raises ValueError for a key not to sign with (a new key
        from `hapki ca ocsp-rekey` is checked before it is used: HSMPool.verify_keys)."""
        self._store, self._issuer, self._issuing_key = store, issuer, issuing_key
        self._responder, self._signer_key = responder, signer_key
        self._key_id, self._check_keys = key_id, check_keys
        self._activity, self._member, self._clock = activity, member, clock
        self._renew_before, self._check_seconds = renew_before, check_seconds

    def watch_expiry(self) -> Callable[[], None]:
        """Export the seconds left of the responder's certificate (`hapki.ca.certificate.remaining`, read at each
        scrape; none while it ends with its issuing CA, whose own end no renewal can pass: an older CA's after a
        rollover, or the CA in use, `issuing_ca`, in its last weeks); returns the undo."""
        gauge = State.of("hapki.ca.certificate.remaining")
        responder = {"pki.member": self._member, "pki.certificate": "ocsp_signer", "pki.issuer": self._issuer.name}
        issuing_after = self._issuer.certificate.not_valid_after_utc

        def remaining() -> float | None:
            after = self._responder.signer_certificate.not_valid_after_utc
            return None if after >= issuing_after else (after - self._clock()).total_seconds()

        gauge.watch(responder, remaining)
        return lambda: gauge.discard(responder)

    async def run(self) -> None:
        """Check now, then every `check_seconds`, until cancelled; a failure is logged and retried next time."""
        while True:
            try:
                await self.tick()
            except FencedOut as exc:
                log.info("OCSP signer renewal: fenced out (the signer steps down on its own): %s", exc)
            except ValueError as exc:  # check_keys refused a new responder key: the one in use stays
                log.error("OCSP responses of %s stay under the responder in use: %s", self._issuer.name, exc)
            except HapkiError as exc:
                log.warning("OCSP signer check failed: %s; retrying in %.0f s", exc, self._check_seconds)
            except Exception:  # a bug must not end the checks (nor the service): logged with its traceback
                log.exception("bug in the OCSP signer check; retrying in %.0f s", self._check_seconds)
            await asyncio.sleep(self._check_seconds)

    async def tick(self) -> OcspSignerRecord | None:
        """Renew the newest responder certificate if due and this member is active; sign with the newest."""
        newest = await self._store.ocsp_signer(self._issuer.name)
        if newest is None:
            return None
        epoch = self._activity.epoch
        if self._activity.active and epoch is not None and self._due(newest):
            newest = await self.renew(newest, epoch)
        await self._use(newest)
        return newest

    def _due(self, record: OcspSignerRecord) -> bool:
        return record.certificate.not_valid_after_utc - self._clock() <= self._renew_before

    async def renew(self, current: OcspSignerRecord, epoch: int) -> OcspSignerRecord:
        """Certify the responder key again (accounted as the module says); the new record (`current` when a new
        certificate would not end later)."""
        now = self._clock()
        serial = issuance.random_serial()
        not_after = min(now.replace(microsecond=0) + OCSP_SIGNER_VALIDITY, self._issuer.certificate.not_valid_after_utc)
        if not_after <= current.certificate.not_valid_after_utc:
            # It would not last longer: made this second, or capped by the issuing CA, whose own expiry is the
            # operator's (HapkiIssuingCaExpiring); renewing at every check would only add certificates.
            return current
        intent_id = await self._store.ocsp_signer_certifying(
            self._issuer.name, serial=format(serial, "x"), key_id=current.key_id, not_after=not_after, epoch=epoch,
            member=self._member, now=now)
        cert = await asyncio.to_thread(recertify, current.certificate, "ocsp", issuing_cert=self._issuer.certificate,
                                       issuing_key=self._issuing_key, serial=serial, now=now)
        record = OcspSignerRecord(issuer=self._issuer.name, key_id=current.key_id,
                                  cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode())
        await self._store.save_ocsp_signer(record, not_after=cert.not_valid_after_utc, now=now, epoch=epoch,
                                           intent_id=intent_id)
        log.info("renewed the OCSP responder certificate of %s: serial %x until %s (epoch %d; the one in use ended "
                 "%s)", self._issuer.name, serial, cert.not_valid_after_utc.isoformat(), epoch,
                 current.certificate.not_valid_after_utc.isoformat())
        return record

    async def _use(self, record: OcspSignerRecord) -> None:
        cert = record.certificate
        if cert == self._responder.signer_certificate:
            return
        if record.key_id != self._key_id and self._check_keys is not None:  # a new key (`hapki ca ocsp-rekey`)
            await asyncio.to_thread(self._check_keys, [record.key_id])
        self._responder.use_signer(cert, self._signer_key(record.key_id))
        self._key_id = record.key_id
        log.info("OCSP responses of %s are signed under responder certificate %x from now on (until %s)",
                 self._issuer.name, cert.serial_number, cert.not_valid_after_utc.isoformat())
