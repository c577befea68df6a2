-- Database users on managed servers, identified by (username, host).
CREATE TABLE database_users (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    server_id BIGINT NOT NULL,
    username VARCHAR(255) NOT NULL,
    host VARCHAR(255) NOT NULL DEFAULT 'localhost',
    `databases` LONGTEXT NOT NULL,
    status VARCHAR(32) NOT NULL DEFAULT 'creating',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    CONSTRAINT database_users_identity_unique UNIQUE (server_id, username, host),
    CONSTRAINT database_users_server_fk FOREIGN KEY (server_id) REFERENCES servers (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
