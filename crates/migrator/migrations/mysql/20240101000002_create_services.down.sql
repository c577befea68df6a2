-- Reverses create_services (20240101000002): `migrator migrate --target` below 20240101000002 runs it.
DROP TABLE services;
