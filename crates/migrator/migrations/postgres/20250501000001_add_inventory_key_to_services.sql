-- What the charset list stored in type_data was read under: the service's version and default
-- charset, as the server reported them. The agent reads the charset list (hundreds of
-- collations) again only when the server reports another version or default charset; a
-- registration that changes the service clears it.
ALTER TABLE services ADD COLUMN inventory_key TEXT;
