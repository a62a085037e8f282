-- Revocation: revocations (written by CLM), CRLs and the delegated OCSP signer (written by CARA).

-- One row per revoked certificate, final (no holds). `crl_number` is the number of the first full CRL that
-- lists it, stamped by CARA in the fenced transaction that allocates that CRL's number: a delta CRL with base B
-- lists exactly the rows with crl_number NULL or > B, i.e. the revocations not on its base.
CREATE TABLE IF NOT EXISTS revocations (
  issuer      VARCHAR(64)   NOT NULL,
  serial      VARCHAR(40)   NOT NULL,
  reason      VARCHAR(32)   NOT NULL COMMENT 'cryptography x509.ReasonFlags name',
  revoked_at  DATETIME(6)   NOT NULL,
  requester   VARCHAR(128)  NOT NULL,
  request_id  CHAR(32)      NULL COMMENT 'the request that produced the certificate',
  crl_number  BIGINT        NULL COMMENT 'first full CRL listing it, NULL: on none yet',
  PRIMARY KEY (issuer, serial),
  KEY ix_revocations_crl (issuer, crl_number)
) ENGINE=InnoDB;

-- Every CRL signed and published, full and delta, one number sequence per issuer (RFC 5280 5.2.3).
-- The number is max+1 read inside a transaction fenced by the CARA epoch; the UNIQUE key is the guard.
CREATE TABLE IF NOT EXISTS crls (
  issuer           VARCHAR(64)  NOT NULL,
  crl_number       BIGINT       NOT NULL,
  is_delta         TINYINT(1)   NOT NULL,
  base_crl_number  BIGINT       NULL COMMENT 'delta only: the full CRL it is relative to',
  entries          INT          NOT NULL,
  this_update      DATETIME(6)  NOT NULL,
  next_update      DATETIME(6)  NOT NULL,
  der              LONGBLOB     NOT NULL,
  epoch            BIGINT       NOT NULL,
  member           VARCHAR(64)  NOT NULL,
  created_at       DATETIME(6)  NOT NULL,
  UNIQUE KEY uq_crls_number (issuer, crl_number),
  KEY ix_crls_latest (issuer, is_delta, crl_number)
) ENGINE=InnoDB;

-- The delegated OCSP responder of an issuer: certificate issued by the issuing CA, key in the HSM (CKA_ID).
CREATE TABLE IF NOT EXISTS ocsp_signers (
  issuer      VARCHAR(64)  NOT NULL,
  key_id      VARCHAR(64)  NOT NULL COMMENT 'CKA_ID of the responder key, hex',
  cert_pem    TEXT         NOT NULL,
  not_after   DATETIME(6)  NOT NULL,
  created_at  DATETIME(6)  NOT NULL,
  PRIMARY KEY (issuer, key_id),
  KEY ix_ocsp_signers_latest (issuer, not_after)
) ENGINE=InnoDB
