-- Reverses create_databases (20240101000003): `migrator migrate --target` below 20240101000003 runs it.
DROP TABLE `databases`;
