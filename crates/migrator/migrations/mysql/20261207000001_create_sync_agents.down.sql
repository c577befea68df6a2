-- Reverses create_sync_agents (20261207000001): `migrator migrate --target` below 20261207000001 runs it.
-- The registry is rebuilt by the agents' heartbeats once it exists again.
DROP TABLE sync_agents;
