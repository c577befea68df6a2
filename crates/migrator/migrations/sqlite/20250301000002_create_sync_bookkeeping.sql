-- The sync-agent's bookkeeping (agent-owned data, migrator-owned schema): one lease per server
-- with a fencing token, jobs, the servers of each job with their outcomes, and SSH runs.
CREATE TABLE server_leases (
    server_id INTEGER PRIMARY KEY REFERENCES servers (id) ON DELETE CASCADE,
    token INTEGER NOT NULL DEFAULT 0,
    holder TEXT,
    expires_at INTEGER,
    heartbeat_at INTEGER
);
CREATE TABLE sync_jobs (
    id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    origin TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    scopes TEXT NOT NULL,
    force_offline INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    total INTEGER NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    finished_at INTEGER,
    CONSTRAINT sync_jobs_request_unique UNIQUE (request_id)
);
CREATE TABLE sync_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id INTEGER NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    lease_token INTEGER NOT NULL,
    holder TEXT NOT NULL,
    scopes TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    outcome TEXT,
    cause TEXT,
    message TEXT,
    exit_status INTEGER,
    duration_ms INTEGER,
    counts TEXT
);
CREATE INDEX sync_runs_server ON sync_runs (server_id, started_at);
CREATE TABLE sync_job_servers (
    job_id TEXT NOT NULL REFERENCES sync_jobs (id) ON DELETE CASCADE,
    server_id INTEGER NOT NULL,
    server_name TEXT NOT NULL,
    run_id INTEGER REFERENCES sync_runs (id) ON DELETE SET NULL,
    seq INTEGER,
    outcome TEXT,
    cause TEXT,
    message TEXT,
    exit_status INTEGER,
    duration_ms INTEGER,
    finished_at INTEGER,
    next_probe_at INTEGER,
    counts TEXT,
    PRIMARY KEY (job_id, server_id)
);
CREATE INDEX sync_job_servers_seq ON sync_job_servers (job_id, seq);
