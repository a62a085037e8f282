-- Every backup `hapki db backup` wrote: when, from which node, the file's name, size and SHA-256 (as its manifest
-- and its audit entry `database.backed_up` say). CARA members read the newest for `hapki_db_backup_age_seconds`
-- (alert HapkiDatabaseBackupStale). Written by the admin account after the dump: a backup does not hold its own row.
CREATE TABLE IF NOT EXISTS backups (
  id              CHAR(32)      NOT NULL PRIMARY KEY,
  created_at      DATETIME(6)   NOT NULL,
  node            VARCHAR(255)  NOT NULL,
  file            VARCHAR(255)  NOT NULL,
  bytes           BIGINT        NOT NULL,
  sha256          CHAR(64)      NOT NULL,
  schema_version  INT           NOT NULL,
  KEY ix_backups_created (created_at)
) ENGINE=InnoDB;
