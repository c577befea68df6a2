-- The sync-agents that run or ran on this control plane, each row written only by its own
-- agent: at start, on every heartbeat (leases held, runs in flight, outcomes since start) and
-- when it stops. `sync-agent agents` lists them; an agent whose heartbeat stopped is shown as
-- gone (no heartbeat for two lease TTLs), and its row is deleted after the retention. `id` is
-- the holder its leases carry.
CREATE TABLE sync_agents (
    id VARCHAR(128) NOT NULL PRIMARY KEY,
    host VARCHAR(255) NOT NULL,
    version VARCHAR(64) NOT NULL,
    schema_version BIGINT NOT NULL,
    key_fingerprints TEXT NOT NULL,
    zone VARCHAR(64) NOT NULL DEFAULT '',
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    lease_ttl_ms BIGINT NOT NULL,
    state VARCHAR(16) NOT NULL,
    reason TEXT NOT NULL,
    leases BIGINT NOT NULL DEFAULT 0,
    in_flight BIGINT NOT NULL DEFAULT 0,
    outcomes TEXT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
