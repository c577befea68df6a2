-- Reverses servers_by_reachability (20261210000001): `migrator migrate --target` below 20261210000001 runs it.
DROP INDEX servers_reachability;
