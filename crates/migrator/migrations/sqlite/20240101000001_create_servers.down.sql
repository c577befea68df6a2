-- Reverses create_servers (20240101000001): `migrator migrate --target` below 20240101000001 runs it.
-- Loses every registered server: `migrate` asks for --allow-data-loss when it has rows.
DROP TABLE servers;
