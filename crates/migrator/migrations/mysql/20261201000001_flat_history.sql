-- Flat as history grows. A job keeps its outcome counts on its own row (a JSON object of stored
-- outcome name to servers, updated under the job row's lock by whoever fills its rows), so that
-- ListJobs and summaries never count rows per call. NULL: a job made before this version, whose
-- rows the agent counts once, under the same lock, the first time it fills one.
ALTER TABLE sync_jobs ADD COLUMN outcome_counts TEXT NULL;
-- Deleting a run sets the job rows that reference it to NULL: they are found by run_id (InnoDB
-- made an index for the foreign key already; this one has a name the three dialects share).
CREATE INDEX sync_job_servers_run ON sync_job_servers (run_id);
-- ListJobs filtered by server reads every row of that server, finished or not.
CREATE INDEX sync_job_servers_server ON sync_job_servers (server_id, job_id);
-- Retention deletes inventory rows marked gone longer ago than the retention: it finds them
-- by status and age.
CREATE INDEX databases_gone ON `databases` (status, updated_at);
CREATE INDEX database_users_gone ON database_users (status, updated_at);
