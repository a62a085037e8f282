-- Serials are random (64+ bits from a CSPRNG, by rule), so every index keyed by a serial takes each issuance's
-- insert on a random page: the working set of such an index is all of it. With five of them, a database past a
-- few hundred thousand certificates no longer held them in its buffer pool, and every issuance read and wrote
-- back pages of each (measured at 300,000 certificates with a 64 MiB pool: MariaDB CPU per issuance 0.51 ->
-- 0.88 ms; without these three, 0.65). Kept: certificates' primary key (issuer, serial) and signing_intents'
-- UNIQUE (issuer, serial), which the reservation needs. A lookup by serial alone goes through the primary key
-- for each issuer (issuers i JOIN certificates c ON c.issuer = i.name AND c.serial = ?).
DROP INDEX IF EXISTS ix_certificates_serial ON certificates;
DROP INDEX IF EXISTS ix_requests_serial ON requests;
DROP INDEX IF EXISTS ix_audit_serial ON audit_entries;
