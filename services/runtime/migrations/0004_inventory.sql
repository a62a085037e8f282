-- Inventory, expiry notices and renewal (issue 5 item 4).
--
-- Search reads one table, `requests`, so that every hot filter is an index range read in the keyset order
-- (not_after, id) and a page costs about `limit` index entries whatever the number of certificates:
--   * names (CN and SANs) are indexed by CLM when it records the request (request_names), from what it approved;
--   * issuer and not_after are copied onto the request by CARA in the fenced transaction that stores the
--     certificate (it already sets status and serial there); CLM never writes `certificates`;
--   * `revoked` is set by CLM in the transaction that inserts the revocations row (CLM owns both).
-- A join from requests to certificates would put the order key (not_after) in another table than the filters
-- (requester, profile, names), so a filter matching many certificates would sort all of them for every page.

ALTER TABLE requests
  ADD COLUMN IF NOT EXISTS renews_serial VARCHAR(40) NULL COMMENT 'renewal: the serial of the predecessor',
  ADD COLUMN IF NOT EXISTS issuer VARCHAR(64) NULL COMMENT 'copied from certificates by CARA when issued',
  ADD COLUMN IF NOT EXISTS not_after DATETIME(6) NULL COMMENT 'copied from certificates by CARA when issued',
  ADD COLUMN IF NOT EXISTS revoked TINYINT(1) NOT NULL DEFAULT 0 COMMENT 'set by CLM with its revocations row',
  ADD COLUMN IF NOT EXISTS expiry_check_at DATETIME(6) NULL
    COMMENT 'when the expiry scheduler looks at it next (NULL: not yet, 9999-12-31: never again)';

CREATE INDEX IF NOT EXISTS ix_requests_serial ON requests (serial);
CREATE INDEX IF NOT EXISTS ix_requests_renews ON requests (renews_serial);
CREATE INDEX IF NOT EXISTS ix_requests_expiry ON requests (not_after, id);
CREATE INDEX IF NOT EXISTS ix_requests_revoked_expiry ON requests (revoked, not_after, id);
CREATE INDEX IF NOT EXISTS ix_requests_requester_expiry ON requests (requester, not_after, id);
CREATE INDEX IF NOT EXISTS ix_requests_profile_expiry ON requests (profile, not_after, id);
-- The expiry scheduler reads only what needs it: certificates it has not seen (NULL, not_after set) and those
-- whose next window opens now. Not a scan of every certificate inside a window on every run.
CREATE INDEX IF NOT EXISTS ix_requests_expiry_check ON requests (expiry_check_at, not_after);

-- The names CLM approved for a request: the subject CN (kind cn) and every SAN. Values as normalised by
-- validation (DNS lowercase A-labels, IPs in Python's canonical text form); ASCII only, compared case-insensitively.
CREATE TABLE IF NOT EXISTS request_names (
  request_id  CHAR(32)                                      NOT NULL,
  kind        ENUM('cn', 'dns', 'ip', 'email')              NOT NULL,
  value       VARCHAR(255) CHARACTER SET ascii COLLATE ascii_general_ci NOT NULL,
  PRIMARY KEY (request_id, kind, value),
  KEY ix_request_names_value (value, kind)
) ENGINE=InnoDB;

-- Expiry notices: one row per (certificate, window), the outbox of pki.v1.clm.expiring. Recorded first, in the
-- transaction that moves the certificate's expiry_check_at on (the primary key makes a second scheduler, or a run
-- after a failover, record nothing new), then published to stream PKI_EXPIRY with Nats-Msg-Id =
-- issuer:serial:window (JetStream drops a republish), then marked.
CREATE TABLE IF NOT EXISTS expiry_notices (
  issuer          VARCHAR(64)   NOT NULL,
  serial          VARCHAR(40)   NOT NULL,
  window_seconds  INT           NOT NULL,
  request_id      CHAR(32)      NOT NULL,
  event           TEXT          NOT NULL COMMENT 'the CertificateExpiring message, JSON',
  recorded_at     DATETIME(6)   NOT NULL,
  published_at    DATETIME(6)   NULL COMMENT 'NULL: not yet acknowledged by the stream',
  PRIMARY KEY (issuer, serial, window_seconds),
  KEY ix_expiry_notices_unpublished (published_at, recorded_at)
) ENGINE=InnoDB;

-- Backfill for rows that existed before this migration (idempotent).
UPDATE requests r JOIN certificates c ON c.request_id = r.id
  SET r.issuer = c.issuer, r.not_after = c.not_after
  WHERE r.not_after IS NULL;

UPDATE requests r JOIN revocations v ON v.issuer = r.issuer AND v.serial = r.serial
  SET r.revoked = 1
  WHERE r.revoked = 0;

INSERT IGNORE INTO request_names (request_id, kind, value)
  SELECT r.id, 'cn', JSON_VALUE(r.sign_request, '$.common_name') FROM requests r
  WHERE JSON_VALUE(r.sign_request, '$.common_name') IS NOT NULL;

INSERT IGNORE INTO request_names (request_id, kind, value)
  SELECT r.id, 'dns', j.v FROM requests r,
    JSON_TABLE(r.sign_request, '$.dns_names[*]' COLUMNS (v VARCHAR(255) PATH '$')) AS j;

INSERT IGNORE INTO request_names (request_id, kind, value)
  SELECT r.id, 'ip', j.v FROM requests r,
    JSON_TABLE(r.sign_request, '$.ip_addresses[*]' COLUMNS (v VARCHAR(255) PATH '$')) AS j;

INSERT IGNORE INTO request_names (request_id, kind, value)
  SELECT r.id, 'email', j.v FROM requests r,
    JSON_TABLE(r.sign_request, '$.emails[*]' COLUMNS (v VARCHAR(255) PATH '$')) AS j
