-- The sync-agent's bookkeeping (agent-owned data, migrator-owned schema): one lease per server
-- with a fencing token, jobs, the servers of each job with their outcomes, and SSH runs.
CREATE TABLE server_leases (
    server_id BIGINT NOT NULL PRIMARY KEY,
    token BIGINT NOT NULL DEFAULT 0,
    holder VARCHAR(128) NULL,
    expires_at BIGINT NULL,
    heartbeat_at BIGINT NULL,
    CONSTRAINT server_leases_server_fk FOREIGN KEY (server_id) REFERENCES servers (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE sync_jobs (
    id VARCHAR(64) NOT NULL PRIMARY KEY,
    request_id VARCHAR(128) NOT NULL,
    origin VARCHAR(16) NOT NULL,
    state VARCHAR(16) NOT NULL DEFAULT 'pending',
    scopes VARCHAR(64) NOT NULL,
    force_offline BIGINT NOT NULL DEFAULT 0,
    reason TEXT NOT NULL,
    total BIGINT NOT NULL,
    finished BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    finished_at BIGINT NULL,
    CONSTRAINT sync_jobs_request_unique UNIQUE (request_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE TABLE sync_runs (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    server_id BIGINT NOT NULL,
    lease_token BIGINT NOT NULL,
    holder VARCHAR(128) NOT NULL,
    scopes VARCHAR(64) NOT NULL,
    started_at BIGINT NOT NULL,
    finished_at BIGINT NULL,
    outcome VARCHAR(32) NULL,
    cause VARCHAR(16) NULL,
    message TEXT NULL,
    exit_status BIGINT NULL,
    duration_ms BIGINT NULL,
    counts TEXT NULL,
    CONSTRAINT sync_runs_server_fk FOREIGN KEY (server_id) REFERENCES servers (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX sync_runs_server ON sync_runs (server_id, started_at);
CREATE TABLE sync_job_servers (
    job_id VARCHAR(64) NOT NULL,
    server_id BIGINT NOT NULL,
    server_name VARCHAR(255) NOT NULL,
    run_id BIGINT NULL,
    seq BIGINT NULL,
    outcome VARCHAR(32) NULL,
    cause VARCHAR(16) NULL,
    message TEXT NULL,
    exit_status BIGINT NULL,
    duration_ms BIGINT NULL,
    finished_at BIGINT NULL,
    next_probe_at BIGINT NULL,
    counts TEXT NULL,
    PRIMARY KEY (job_id, server_id),
    CONSTRAINT sync_job_servers_job_fk FOREIGN KEY (job_id) REFERENCES sync_jobs (id) ON DELETE CASCADE,
    CONSTRAINT sync_job_servers_run_fk FOREIGN KEY (run_id) REFERENCES sync_runs (id) ON DELETE SET NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
CREATE INDEX sync_job_servers_seq ON sync_job_servers (job_id, seq);
