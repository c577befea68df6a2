-- Reverses add_reachability_to_servers (20250301000001): `migrator migrate --target` below 20250301000001 runs it.
-- Drops the pinned host keys: after applying it again, each server's key is pinned anew on
-- first contact.
ALTER TABLE servers DROP COLUMN host_key_pinned_at;
ALTER TABLE servers DROP COLUMN host_key_fingerprint;
ALTER TABLE servers DROP COLUMN host_key_algorithm;
ALTER TABLE servers DROP COLUMN next_probe_at;
ALTER TABLE servers DROP COLUMN consecutive_failures;
ALTER TABLE servers DROP COLUMN last_seen_at;
ALTER TABLE servers DROP COLUMN reachability;
