-- Reverses flat_history (20261201000001): `migrator migrate --target` below 20261201000001 runs it.
-- InnoDB dropped the index it had made for the foreign key sync_job_servers_run_fk when
-- sync_job_servers_run took its place: it is made again (by the name InnoDB gave it) before
-- sync_job_servers_run goes, or the drop would be refused. sync_runs_last can go because the
-- reverse of 20261206000001 made sync_runs_server, which serves sync_runs_server_fk, again.
DROP INDEX sync_runs_last ON sync_runs;
DROP INDEX database_users_gone ON database_users;
DROP INDEX databases_gone ON `databases`;
DROP INDEX sync_job_servers_open ON sync_job_servers;
CREATE INDEX sync_job_servers_run_fk ON sync_job_servers (run_id);
DROP INDEX sync_job_servers_run ON sync_job_servers;
ALTER TABLE sync_jobs DROP COLUMN outcome_counts;
