-- Reverses create_database_users (20240101000004): `migrator migrate --target` below 20240101000004 runs it.
DROP TABLE database_users;
