-- An issuing CA revoked by its root (`hapki ca revoke-issuer`): listed on the root's CRL, the ARL served at
-- /crl/root.crl (crls rows of issuer 'root', signed by the root key in a ceremony). Its members answer OCSP about
-- what it issued with `revoked` from then on, and nothing issues from it.
ALTER TABLE issuers
  ADD COLUMN IF NOT EXISTS revoked_at DATETIME(6) NULL COMMENT 'revoked by the root (hapki ca revoke-issuer)',
  ADD COLUMN IF NOT EXISTS revocation_reason VARCHAR(32) NULL COMMENT 'cryptography x509.ReasonFlags name';
