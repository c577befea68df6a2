-- Reverses agent_schema_ranges (20261209000001): `migrator migrate --target` below 20261209000001 runs it.
-- Agents of this release need this column: they stand down (`incompatible`) once it is gone,
-- and agents of the previous release may serve again.
ALTER TABLE sync_agents DROP COLUMN schema_max;
