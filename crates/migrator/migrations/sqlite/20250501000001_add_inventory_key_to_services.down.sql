-- Reverses add_inventory_key_to_services (20250501000001): `migrator migrate --target` below 20250501000001 runs it.
-- The agent then reads every server's charset list again.
ALTER TABLE services DROP COLUMN inventory_key;
