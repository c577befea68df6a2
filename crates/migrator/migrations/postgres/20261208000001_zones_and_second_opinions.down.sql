-- Reverses zones_and_second_opinions (20261208000001): `migrator migrate --target` below 20261208000001 runs it.
-- Servers lose their zones: every agent may then take every server.
ALTER TABLE sync_agents DROP COLUMN resume_requested_at;
ALTER TABLE sync_agents DROP COLUMN confirmed;
ALTER TABLE sync_agents DROP COLUMN overruled;
ALTER TABLE sync_agents DROP COLUMN asked;
ALTER TABLE server_leases DROP COLUMN second_opinion_note;
ALTER TABLE server_leases DROP COLUMN second_opinion_until;
ALTER TABLE server_leases DROP COLUMN second_opinion_of;
ALTER TABLE server_leases DROP COLUMN zone;
ALTER TABLE servers DROP COLUMN zone;
