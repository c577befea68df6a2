-- fleetsync: resync=databases,charsets
-- The migration from Vito's incident: the new columns are filled by the sync-agent, never here.
ALTER TABLE databases ADD COLUMN charset TEXT;
ALTER TABLE databases ADD COLUMN "collation" TEXT;
