-- Managed servers, as registered in the control plane (modeled on Vito's `servers`).
-- Times are milliseconds since the Unix epoch (UTC) in every fleetsync table.
CREATE TABLE servers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    ip TEXT NOT NULL,
    port INTEGER NOT NULL DEFAULT 22,
    ssh_user TEXT NOT NULL DEFAULT 'vito',
    status TEXT NOT NULL DEFAULT 'ready',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    CONSTRAINT servers_name_unique UNIQUE (name)
);
