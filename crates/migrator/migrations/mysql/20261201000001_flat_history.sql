-- Flat as history grows. A job keeps its outcome counts on its own row (a JSON object of stored
-- outcome name to servers, updated under the job row's lock by whoever fills its rows), so that
-- ListJobs and summaries never count rows per call. NULL: a job made before this version, whose
-- rows the agent counts once, under the same lock, the first time it fills one.
ALTER TABLE sync_jobs ADD COLUMN outcome_counts TEXT NULL;
-- Deleting a run sets the job rows that reference it to NULL: they are found by run_id (InnoDB
-- made an index for the foreign key already; this one has a name the three dialects share).
CREATE INDEX sync_job_servers_run ON sync_job_servers (run_id);
-- Retention looks for rows still waiting whose server is gone: the waiting rows, found by
-- their outcome first (sync_job_servers_waiting, (server_id, outcome), holds every row here and
-- would be scanned whole). ListJobs' server filter is a range of sync_job_servers_waiting.
CREATE INDEX sync_job_servers_open ON sync_job_servers (outcome, server_id);
-- Retention deletes inventory rows marked gone longer ago than the retention: it finds them
-- by status and age.
CREATE INDEX databases_gone ON `databases` (status, updated_at);
CREATE INDEX database_users_gone ON database_users (status, updated_at);
-- GetServer and ListServers show each server's last run: the newest id of the server's runs,
-- one index probe per server however many runs it has (was a scan of all of them).
CREATE INDEX sync_runs_last ON sync_runs (server_id, id);
