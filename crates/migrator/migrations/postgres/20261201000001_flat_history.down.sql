-- Reverses flat_history (20261201000001): `migrator migrate --target` below 20261201000001 runs it.
-- Jobs forget their kept outcome counts; an agent of the previous release counts rows.
DROP INDEX sync_runs_last;
DROP INDEX database_users_gone;
DROP INDEX databases_gone;
DROP INDEX sync_job_servers_server;
DROP INDEX sync_job_servers_run;
ALTER TABLE sync_jobs DROP COLUMN outcome_counts;
