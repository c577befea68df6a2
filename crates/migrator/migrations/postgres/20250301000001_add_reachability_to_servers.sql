-- What the sync-agent knows about reaching each server, and the host key pinned on first contact.
ALTER TABLE servers ADD COLUMN reachability TEXT NOT NULL DEFAULT 'unknown';
ALTER TABLE servers ADD COLUMN last_seen_at BIGINT;
ALTER TABLE servers ADD COLUMN consecutive_failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE servers ADD COLUMN next_probe_at BIGINT;
ALTER TABLE servers ADD COLUMN host_key_algorithm TEXT;
ALTER TABLE servers ADD COLUMN host_key_fingerprint TEXT;
ALTER TABLE servers ADD COLUMN host_key_pinned_at BIGINT;
