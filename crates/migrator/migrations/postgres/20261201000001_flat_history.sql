-- Flat as history grows. A job keeps its outcome counts on its own row (a JSON object of stored
-- outcome name to servers, updated under the job row's lock by whoever fills its rows), so that
-- ListJobs and summaries never count rows per call. NULL: a job made before this version, whose
-- rows the agent counts once, under the same lock, the first time it fills one.
ALTER TABLE sync_jobs ADD COLUMN outcome_counts TEXT;
-- Deleting a run sets the job rows that reference it to NULL: without an index on run_id each
-- deleted run scanned every job row (retention, DeleteServer). The agent never writes run_id,
-- so the partial index holds no rows and costs the job's inserts nothing.
CREATE INDEX sync_job_servers_run ON sync_job_servers (run_id) WHERE run_id IS NOT NULL;
-- ListJobs filtered by server reads every row of that server, finished or not (the waiting
-- index holds only rows without an outcome).
CREATE INDEX sync_job_servers_server ON sync_job_servers (server_id, job_id);
-- Retention deletes inventory rows marked gone longer ago than the retention: it finds them
-- by status and age.
CREATE INDEX databases_gone ON "databases" (updated_at) WHERE status = 'gone';
CREATE INDEX database_users_gone ON database_users (updated_at) WHERE status = 'gone';
-- GetServer and ListServers show each server's last run: the newest id of the server's runs,
-- one index probe per server however many runs it has (was a scan of all of them).
CREATE INDEX sync_runs_last ON sync_runs (server_id, id);
