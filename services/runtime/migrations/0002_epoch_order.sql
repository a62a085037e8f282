-- Commit order under the epoch fence, so that "only the current epoch commits" can be checked after the fact.
-- Every fenced commit increments epochs.fence_seq (one global counter per tier, serialised by the row);
-- a certificate records the value its commit produced, and every epoch change records the value at the change.
-- A certificate of epoch e whose fence_seq is above the change to e+1 was committed by a stale member.

ALTER TABLE certificates ADD COLUMN IF NOT EXISTS fence_seq BIGINT NULL COMMENT 'epochs.fence_seq after its commit';

CREATE TABLE IF NOT EXISTS epoch_changes (
  tier        VARCHAR(16)  NOT NULL,
  epoch       BIGINT       NOT NULL,
  holder      VARCHAR(64)  NOT NULL,
  fence_seq   BIGINT       NOT NULL COMMENT 'epochs.fence_seq right after the change',
  changed_at  DATETIME(6)  NOT NULL,
  PRIMARY KEY (tier, epoch)
) ENGINE=InnoDB;
