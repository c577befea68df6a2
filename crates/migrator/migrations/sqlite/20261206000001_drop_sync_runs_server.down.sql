-- Reverses drop_sync_runs_server (20261206000001): `migrator migrate --target` below 20261206000001 runs it.
CREATE INDEX sync_runs_server ON sync_runs (server_id, started_at);
