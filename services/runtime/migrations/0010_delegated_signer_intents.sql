-- The certificates an issuing CA key signs besides the requested ones: its OCSP responder's and its audit signer's.
-- Their serials are reserved like a requested certificate's (DESIGN invariants 3 and 4): a signing intent in the
-- same UNIQUE (issuer, serial), committed before the HSM signs, resolved `issued` in the transaction that stores
-- the certificate (or `abandoned`). `purpose` says which; such an intent has no request: its request_id is its own
-- id. The stored certificates carry their serial, so `hapki db check` can pair every issued intent with its
-- certificate and back; rows made before this migration have none (NULL) and are not paired.
ALTER TABLE signing_intents
  ADD COLUMN IF NOT EXISTS purpose VARCHAR(16) NOT NULL DEFAULT 'certificate'
    COMMENT 'certificate (of a request) | ocsp_signer | audit_signer';
ALTER TABLE ocsp_signers
  ADD COLUMN IF NOT EXISTS serial VARCHAR(40) NULL COMMENT 'hex; NULL: certified before migration 0010';
ALTER TABLE audit_signers
  ADD COLUMN IF NOT EXISTS serial VARCHAR(40) NULL COMMENT 'hex; NULL: certified before migration 0010';
