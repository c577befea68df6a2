-- Several agents that govern themselves. A server may carry a zone (the network its agents
-- live in); its lease row carries a copy, so that an agent claims only its zone's servers
-- from the queue alone. A failure that may be the agent's own (authentication refused,
-- unreachable, handshake failed) is not recorded at once when another live agent of the zone
-- exists: the lease is handed back with the name of the agent that failed
-- (`second_opinion_of`), which does not take it again before `second_opinion_until`, and the
-- agent that tries next decides the outcome. Each agent's row counts how often peers overruled
-- (succeeded where it failed) or confirmed (failed too) its failures: the input of its
-- quarantine. An operator's request that a quarantined agent serve again is `resume_requested_at`.
ALTER TABLE servers ADD COLUMN zone TEXT NOT NULL DEFAULT '';
ALTER TABLE server_leases ADD COLUMN zone TEXT NOT NULL DEFAULT '';
ALTER TABLE server_leases ADD COLUMN second_opinion_of TEXT;
ALTER TABLE server_leases ADD COLUMN second_opinion_until INTEGER;
ALTER TABLE server_leases ADD COLUMN second_opinion_note TEXT;
ALTER TABLE sync_agents ADD COLUMN asked INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sync_agents ADD COLUMN overruled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sync_agents ADD COLUMN confirmed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sync_agents ADD COLUMN resume_requested_at INTEGER;
