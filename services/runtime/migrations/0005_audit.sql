-- The audit log: every state change appends an entry in the transaction that makes the change; the active CARA
-- member's sealer later chains the entries, in one transaction fenced by the CARA epoch.
-- Entries are only ever inserted (never updated or deleted by a service); the chain lives in its own tables, so
-- sealing never touches an entry row. See hapki.runtime.audit for the hash and the verification.

CREATE TABLE IF NOT EXISTS audit_entries (
  id          CHAR(32)      NOT NULL PRIMARY KEY COMMENT 'random (or, for deduplicated kinds, derived) 32 hex digits',
  kind        VARCHAR(32)   NOT NULL COMMENT 'hapki.runtime.audit.AuditKind value',
  actor       VARCHAR(128)  NOT NULL COMMENT 'service:member that made the change',
  epoch       BIGINT        NULL COMMENT 'CARA epoch the change was committed under, NULL for CLM changes',
  request_id  CHAR(32)      NULL,
  issuer      VARCHAR(64)   NULL,
  serial      VARCHAR(40)   NULL,
  detail      TEXT          NOT NULL COMMENT 'canonical JSON (sorted keys), hashed as stored',
  created_at  DATETIME(6)   NOT NULL,
  KEY ix_audit_request (request_id),
  KEY ix_audit_serial (serial)
) ENGINE=InnoDB;

-- Entries not chained yet: inserted with the entry, deleted by the sealer when it chains the entry. Small (one
-- sealing interval's worth), so the sealer never scans the whole log to find its work.
CREATE TABLE IF NOT EXISTS audit_unsealed (
  entry_id    CHAR(32)      NOT NULL PRIMARY KEY,
  created_at  DATETIME(6)   NOT NULL,
  KEY ix_audit_unsealed_order (created_at, entry_id)
) ENGINE=InnoDB;

-- The one chain: seq 1, 2, 3, ... in sealing order; hash = SHA-256(prev_hash || canonical(entry, seq)).
CREATE TABLE IF NOT EXISTS audit_chain (
  seq        BIGINT       NOT NULL PRIMARY KEY,
  entry_id   CHAR(32)     NOT NULL,
  prev_hash  CHAR(64)     NOT NULL,
  hash       CHAR(64)     NOT NULL,
  epoch      BIGINT       NOT NULL COMMENT 'CARA epoch of the sealer (not hashed: the fence is what enforces it)',
  sealed_at  DATETIME(6)  NOT NULL,
  UNIQUE KEY uq_audit_chain_entry (entry_id)
) ENGINE=InnoDB;

-- The newest link, written in the sealing transaction: removing the newest chained entries breaks the match.
CREATE TABLE IF NOT EXISTS audit_head (
  id          TINYINT      NOT NULL PRIMARY KEY COMMENT 'always 1',
  seq         BIGINT       NOT NULL,
  hash        CHAR(64)     NOT NULL,
  updated_at  DATETIME(6)  NOT NULL
) ENGINE=InnoDB;

-- The audit signer of an issuer: a P-256 key in the HSM (CKA_ID), certified by the issuing CA (hapki ca init).
CREATE TABLE IF NOT EXISTS audit_signers (
  issuer      VARCHAR(64)  NOT NULL,
  key_id      VARCHAR(64)  NOT NULL COMMENT 'CKA_ID of the signing key, hex',
  cert_pem    TEXT         NOT NULL,
  not_after   DATETIME(6)  NOT NULL,
  created_at  DATETIME(6)  NOT NULL,
  PRIMARY KEY (issuer, key_id)
) ENGINE=InnoDB;

-- Signed heads: the sealer signs (seq, hash, time) with the audit signer's key in the sealing transaction, at most
-- every checkpoint interval. Someone who can write the database but not use the HSM cannot recompute the chain
-- below a checkpoint, nor cut it below one, without a finding.
CREATE TABLE IF NOT EXISTS audit_checkpoints (
  seq        BIGINT       NOT NULL PRIMARY KEY,
  hash       CHAR(64)     NOT NULL,
  signed_at  DATETIME(6)  NOT NULL,
  issuer     VARCHAR(64)  NOT NULL,
  key_id     VARCHAR(64)  NOT NULL,
  signature  TEXT         NOT NULL COMMENT 'DER ECDSA-Sig-Value over checkpoint_message(), hex',
  epoch      BIGINT       NOT NULL
) ENGINE=InnoDB
