-- What the sync-agent knows about reaching each server, and the host key pinned on first contact.
ALTER TABLE servers ADD COLUMN reachability VARCHAR(16) NOT NULL DEFAULT 'unknown';
ALTER TABLE servers ADD COLUMN last_seen_at BIGINT NULL;
ALTER TABLE servers ADD COLUMN consecutive_failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE servers ADD COLUMN next_probe_at BIGINT NULL;
ALTER TABLE servers ADD COLUMN host_key_algorithm VARCHAR(64) NULL;
ALTER TABLE servers ADD COLUMN host_key_fingerprint VARCHAR(128) NULL;
ALTER TABLE servers ADD COLUMN host_key_pinned_at BIGINT NULL;
