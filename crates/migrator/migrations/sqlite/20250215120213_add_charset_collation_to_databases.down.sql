-- Reverses add_charset_collation_to_databases (20250215120213): `migrator migrate --target` below 20250215120213 runs it.
-- The columns hold only what the sync-agent read from servers: a re-sync after applying the
-- migration again fills them anew.
ALTER TABLE "databases" DROP COLUMN "collation";
ALTER TABLE "databases" DROP COLUMN charset;
