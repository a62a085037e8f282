-- The active CARA member renews the OCSP responder's certificate before it expires by certifying the same HSM key
-- again (hapki.cara.ocsp_signer): one row per certificate, so a key has several rows over time, the newest
-- not_after the one in use. The primary key was (issuer, key_id): one certificate per key.
ALTER TABLE ocsp_signers DROP PRIMARY KEY, ADD PRIMARY KEY (issuer, key_id, not_after);
