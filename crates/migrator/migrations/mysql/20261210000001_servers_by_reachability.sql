-- ListServers filtered by reachability pages by id through the servers of that reachability
-- alone: without this index a filter few servers match (the servers online, in a fleet mostly
-- offline; those never reached) read the whole fleet in id order to fill a page (83 ms for an
-- empty page with 1,000,000 servers stored, PostgreSQL). An update that leaves a server's
-- reachability as it was (a healthy server synced again) writes no entry of it.
CREATE INDEX servers_reachability ON servers (reachability, id);
