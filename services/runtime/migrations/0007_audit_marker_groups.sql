-- One audit marker per appending transaction instead of one per entry. A signing batch of N certificates appends
-- N entries and one marker that lists them; CLM's recording batch likewise. Every Galera node inserted and later
-- deleted two markers per issuance (8 of the ~55 index entries it changed, docs/PERFORMANCE.md "Session 11").
--   entry_id:  the first entry's id (the key; with created_at, the sealer's order);
--   entry_ids: every entry the marker stands for, comma-separated, entry_id first; NULL: entry_id alone (one
--              entry, and every marker written before this migration).
-- Upgrade CARA (the sealer) no later than CLM: a sealer from before this migration would chain only the first entry
-- of a grouped marker and drop the marker (`hapki audit verify` then reports the others as not chained).
ALTER TABLE audit_unsealed
  ADD COLUMN IF NOT EXISTS entry_ids MEDIUMTEXT NULL
    COMMENT 'all entries of the marker, comma-separated (NULL: entry_id alone)';
