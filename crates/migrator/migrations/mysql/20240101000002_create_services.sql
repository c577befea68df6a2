-- Services installed on a server; fleetsync reads the database service (type 'database').
CREATE TABLE services (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    server_id BIGINT NOT NULL,
    type VARCHAR(32) NOT NULL,
    name VARCHAR(64) NOT NULL,
    version VARCHAR(64) NOT NULL DEFAULT '',
    status VARCHAR(32) NOT NULL DEFAULT 'ready',
    type_data LONGTEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    CONSTRAINT services_server_type_unique UNIQUE (server_id, type),
    CONSTRAINT services_server_fk FOREIGN KEY (server_id) REFERENCES servers (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
