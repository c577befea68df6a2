-- Flat as history grows. A job keeps its outcome counts on its own row (a JSON object of stored
-- outcome name to servers, updated under the job row's lock by whoever fills its rows), so that
-- ListJobs and summaries never count rows per call. NULL: a job made before this version, whose
-- rows the agent counts once, under the same lock, the first time it fills one.
-- (InnoDB already indexes run_id for its foreign key, and ListJobs' server filter is a range of
-- sync_job_servers_waiting (server_id, outcome), which holds every row here.)
ALTER TABLE sync_jobs ADD COLUMN outcome_counts TEXT NULL;
