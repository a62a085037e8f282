-- hapki schema v1: requests (CLM), issuers, epochs, signing intents and certificates (CARA).
-- Serials are lowercase hex without colons; ids are 32 hex digits; times are UTC.

CREATE TABLE IF NOT EXISTS issuers (
  name        VARCHAR(64)  NOT NULL PRIMARY KEY,
  cert_pem    TEXT         NOT NULL,
  chain_pem   TEXT         NOT NULL COMMENT 'issuer then its parents up to the root',
  key_id      VARCHAR(64)  NOT NULL COMMENT 'CKA_ID of the signing key, hex',
  is_default  TINYINT(1)   NOT NULL DEFAULT 0,
  created_at  DATETIME(6)  NOT NULL
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS requests (
  id               CHAR(32)      NOT NULL PRIMARY KEY,
  requester        VARCHAR(128)  NOT NULL,
  idempotency_key  VARCHAR(128)  NULL,
  profile          VARCHAR(64)   NOT NULL,
  csr_sha256       CHAR(64)      NOT NULL,
  sign_request     MEDIUMTEXT    NOT NULL COMMENT 'the approved SignCertificate message, JSON',
  status           VARCHAR(16)   NOT NULL,
  error_code       VARCHAR(32)   NULL,
  error_message    VARCHAR(512)  NULL,
  serial           VARCHAR(40)   NULL,
  created_at       DATETIME(6)   NOT NULL,
  updated_at       DATETIME(6)   NOT NULL,
  UNIQUE KEY uq_requests_idempotency (requester, idempotency_key),
  KEY ix_requests_status (status, created_at)
) ENGINE=InnoDB;

-- One row per HA tier. `epoch` is bumped by compare-and-set when a member becomes active; every signing
-- transaction increments `fence_seq` WHERE epoch = its own, so a stale member cannot commit.
CREATE TABLE IF NOT EXISTS epochs (
  tier        VARCHAR(16)  NOT NULL PRIMARY KEY,
  epoch       BIGINT       NOT NULL,
  holder      VARCHAR(64)  NOT NULL,
  fence_seq   BIGINT       NOT NULL DEFAULT 0,
  updated_at  DATETIME(6)  NOT NULL
) ENGINE=InnoDB;

-- A serial is reserved here, with the intent to sign, before the HSM is asked. Every intent ends issued or
-- abandoned (never reused): that is how every HSM signature is accounted for.
CREATE TABLE IF NOT EXISTS signing_intents (
  id           CHAR(32)      NOT NULL PRIMARY KEY,
  request_id   CHAR(32)      NOT NULL,
  issuer       VARCHAR(64)   NOT NULL,
  serial       VARCHAR(40)   NOT NULL,
  epoch        BIGINT        NOT NULL,
  member       VARCHAR(64)   NOT NULL,
  state        VARCHAR(16)   NOT NULL COMMENT 'reserved | issued | abandoned',
  resolution   VARCHAR(255)  NULL,
  created_at   DATETIME(6)   NOT NULL,
  resolved_at  DATETIME(6)   NULL,
  UNIQUE KEY uq_intents_serial (issuer, serial),
  KEY ix_intents_request (request_id),
  KEY ix_intents_state (state, epoch)
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS certificates (
  issuer      VARCHAR(64)  NOT NULL,
  serial      VARCHAR(40)  NOT NULL,
  request_id  CHAR(32)     NOT NULL,
  intent_id   CHAR(32)     NOT NULL,
  epoch       BIGINT       NOT NULL,
  cert_pem    TEXT         NOT NULL,
  not_before  DATETIME(6)  NOT NULL,
  not_after   DATETIME(6)  NOT NULL,
  created_at  DATETIME(6)  NOT NULL,
  PRIMARY KEY (issuer, serial),
  UNIQUE KEY uq_certificates_request (request_id),
  UNIQUE KEY uq_certificates_intent (intent_id),
  KEY ix_certificates_serial (serial)
) ENGINE=InnoDB;
