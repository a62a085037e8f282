"""Signing intents of the delegated signers' certificates: the OCSP responder's and the audit signer's, which an
issuing CA key signs besides the requested certificates (migration 0010).

Their serials are reserved as a requested certificate's are (DESIGN invariants 3 and 4): an intent in the same
UNIQUE (issuer, serial) committed before the HSM signs, so no two certificates of one CA share a serial and
every signature of the CA key is accounted for. It is resolved `issued` in the transaction that stores the
certificate (which carries the serial), or `abandoned`: by the ceremony that failed, or, when its process died,
by the next CARA activation (an intent of an older epoch; a ceremony's is epoch 0). A ceremony runs unfenced
while the site runs, so an activation may abandon its intent between the signature and the store: the store then
resolves it `issued` all the same (the certificate exists; the audit log holds both steps).
"""

from __future__ import annotations

from datetime import datetime

from hapki.runtime.db import db_time

__all__ = ["AUDIT_SIGNER", "CEREMONY", "ISSUED_SQL", "OCSP_SIGNER", "RESERVE_SQL", "issued_args", "reserve_args"]

OCSP_SIGNER = "ocsp_signer"
AUDIT_SIGNER = "audit_signer"
CEREMONY = "ceremony"  # the member named on a ceremony's intents (`hapki ca init`, `rollover`, `ocsp-rekey`)

# No request: request_id is the intent's own id.
RESERVE_SQL = ("INSERT INTO signing_intents (id, request_id, issuer, serial, epoch, member, state, created_at,"
               " purpose) VALUES (%s, %s, %s, %s, %s, %s, 'reserved', %s, %s)")
ISSUED_SQL = "UPDATE signing_intents SET state = 'issued', resolved_at = %s, resolution = %s WHERE id = %s"


def reserve_args(intent_id: str, *, issuer: str, serial: str, purpose: str, epoch: int, member: str,
                 now: datetime) -> tuple[object, ...]:
    return intent_id, intent_id, issuer, serial, epoch, member, db_time(now), purpose


def issued_args(intent_id: str, *, now: datetime, purpose: str) -> tuple[object, ...]:
    return db_time(now), f"{purpose} certificate stored", intent_id
