-- Databases on managed servers, as last read by the sync-agent.
CREATE TABLE `databases` (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    server_id BIGINT NOT NULL,
    name VARCHAR(255) NOT NULL,
    status VARCHAR(32) NOT NULL DEFAULT 'creating',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    CONSTRAINT databases_server_name_unique UNIQUE (server_id, name),
    CONSTRAINT databases_server_fk FOREIGN KEY (server_id) REFERENCES servers (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
