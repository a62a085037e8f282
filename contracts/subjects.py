"""NATS subjects, streams and consumers: the one place that names them (`pki.v1.<service>.<verb>`)."""

# Request/reply API of CLM (the RA). Clients call these.
CLM_ISSUE = "pki.v1.clm.issue"
CLM_STATUS = "pki.v1.clm.status"
CLM_CERTIFICATE = "pki.v1.clm.certificate"
CLM_REVOKE = "pki.v1.clm.revoke"
CLM_SEARCH = "pki.v1.clm.search"
CLM_RENEW = "pki.v1.clm.renew"
# Event CLM publishes (core NATS) after recording a revocation: CARA regenerates its CRLs within seconds.
# Best effort: CARA also polls the database for revocations not yet on a CRL.
CLM_REVOKED = "pki.v1.clm.revoked"
# Event the CLM expiry scheduler (VIP holder only) publishes into stream PKI_EXPIRY, once per certificate per
# window, Nats-Msg-Id = "<issuer>:<serial>:<window_seconds>". Consumers that must see each notice once read the
# stream (a republish after a crash reaches core subscribers twice, the stream only once).
CLM_EXPIRING = "pki.v1.clm.expiring"

# Work queue from CLM to CARA: one message per approved request, Nats-Msg-Id = request id.
CARA_SIGN = "pki.v1.cara.sign"
# Events CARA publishes when a request reaches a final state.
CARA_ISSUED = "pki.v1.cara.issued"
CARA_FAILED = "pki.v1.cara.failed"

# HA events from the watchers: pki.v1.ha.events.<tier>.<member>, kept in a JetStream stream (history survives).
HA_EVENTS_PREFIX = "pki.v1.ha.events"


def ha_events(tier: str, member: str) -> str:
    return f"{HA_EVENTS_PREFIX}.{tier}.{member}"


# JetStream objects. Stream and consumer definitions are owned by hapki.runtime.bus.
SIGNING_STREAM = "PKI_SIGNING"
SIGNING_CONSUMER = "cara-signer"
HA_EVENTS_STREAM = "PKI_HA_EVENTS"
EXPIRY_STREAM = "PKI_EXPIRY"
