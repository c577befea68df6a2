-- Reverses create_sync_work_queue (20250401000001): `migrator migrate --target` below 20250401000001 runs it.
DROP INDEX servers_next_probe ON servers;
DROP INDEX sync_runs_finished ON sync_runs;
DROP INDEX sync_jobs_created ON sync_jobs;
DROP INDEX sync_jobs_finished ON sync_jobs;
DROP INDEX sync_job_servers_waiting ON sync_job_servers;
DROP INDEX server_leases_pending ON server_leases;
ALTER TABLE sync_jobs DROP COLUMN selection;
ALTER TABLE server_leases DROP COLUMN claimed_at;
ALTER TABLE server_leases DROP COLUMN pending_since;
