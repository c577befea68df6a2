-- Reverses create_sync_work_queue (20250401000001): `migrator migrate --target` below 20250401000001 runs it.
DROP INDEX servers_next_probe;
DROP INDEX sync_runs_finished;
DROP INDEX sync_jobs_created;
DROP INDEX sync_jobs_finished;
DROP INDEX sync_job_servers_waiting;
DROP INDEX server_leases_pending;
ALTER TABLE sync_jobs DROP COLUMN selection;
ALTER TABLE server_leases DROP COLUMN claimed_at;
ALTER TABLE server_leases DROP COLUMN pending_since;
