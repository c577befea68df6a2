-- Scale: the servers waiting for a sync are marked on the narrow lease table (one row per
-- server, indexed by when the oldest request arrived), so that agents claim them in batches
-- without scanning job history; a claim records when it was made (by the database's clock), so
-- that only runs started after a request may satisfy it; finished jobs and runs are pruned by age.
-- (The agent marks servers already waiting when it starts: data is the agent's, schema ours.)
ALTER TABLE server_leases ADD COLUMN pending_since BIGINT NULL;
ALTER TABLE server_leases ADD COLUMN claimed_at BIGINT NULL;
-- How a job chose its servers ('all' or 'ids'), so that a repeated request id can be checked.
ALTER TABLE sync_jobs ADD COLUMN selection VARCHAR(8) NULL;
CREATE INDEX server_leases_pending ON server_leases (pending_since);
CREATE INDEX sync_job_servers_waiting ON sync_job_servers (server_id, outcome);
CREATE INDEX sync_jobs_finished ON sync_jobs (finished_at);
CREATE INDEX sync_jobs_created ON sync_jobs (created_at, id);
CREATE INDEX sync_runs_finished ON sync_runs (finished_at);
CREATE INDEX servers_next_probe ON servers (next_probe_at);
