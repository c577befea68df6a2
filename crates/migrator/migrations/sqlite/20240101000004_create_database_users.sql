-- Database users on managed servers, identified by (username, host).
CREATE TABLE database_users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id INTEGER NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    username TEXT NOT NULL,
    host TEXT NOT NULL DEFAULT 'localhost',
    databases TEXT NOT NULL DEFAULT '[]',
    status TEXT NOT NULL DEFAULT 'creating',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    CONSTRAINT database_users_identity_unique UNIQUE (server_id, username, host)
);
