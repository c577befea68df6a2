-- fleetsync: stops-agents
-- Version skew has rules. Each sync-agent declares the range of schema versions it works with
-- (`schema_version` is its lower end, `schema_max` the newest migration it was built with), and
-- checks the schema against it on every heartbeat: below the range, or past a migration
-- declared `stops-agents` newer than the range, it stops claiming. The migrator lists the live
-- agents and refuses a `stops-agents` migration while agents it would stop serve, unless told
-- to stop them. This migration is the first such: an agent built before it does not check the
-- schema while it runs, so it would go on working through later migrations that change what it
-- reads and writes; every agent must be one that follows the rules before it is applied.
ALTER TABLE sync_agents ADD COLUMN schema_max INTEGER;
