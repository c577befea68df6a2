-- Managed servers, as registered in the control plane (modeled on Vito's `servers`).
-- Times are milliseconds since the Unix epoch (UTC) in every fleetsync table. Text compares
-- byte for byte (utf8mb4_bin): names read from servers must round-trip exactly.
CREATE TABLE servers (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    ip VARCHAR(255) NOT NULL,
    port BIGINT NOT NULL DEFAULT 22,
    ssh_user VARCHAR(255) NOT NULL DEFAULT 'vito',
    status VARCHAR(32) NOT NULL DEFAULT 'ready',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    CONSTRAINT servers_name_unique UNIQUE (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
