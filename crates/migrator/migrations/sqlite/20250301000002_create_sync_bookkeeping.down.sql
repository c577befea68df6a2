-- Reverses create_sync_bookkeeping (20250301000002): `migrator migrate --target` below 20250301000002 runs it.
-- Children first: the job rows reference runs and jobs.
DROP TABLE sync_job_servers;
DROP TABLE sync_runs;
DROP TABLE sync_jobs;
DROP TABLE server_leases;
