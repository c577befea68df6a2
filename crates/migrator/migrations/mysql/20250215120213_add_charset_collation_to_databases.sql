-- fleetsync: resync=databases,charsets
-- The migration from Vito's incident: the new columns are filled by the sync-agent, never here.
-- MySQL/MariaDB commit DDL implicitly: the engine journals each statement and, on a retry,
-- checks the catalog before re-running a statement whose journal entry may be missing.
ALTER TABLE `databases` ADD COLUMN charset VARCHAR(64) NULL;
ALTER TABLE `databases` ADD COLUMN `collation` VARCHAR(64) NULL;
