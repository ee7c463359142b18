-- Masks the demo database (deploy/masking/demo-source.sql): every personal field is replaced by a
-- value derived from the row id, so joins and counts still work and nothing personal is left.
-- secure_delete and VACUUM rewrite the file, so the old values do not survive in free pages either.
.output /dev/null
PRAGMA secure_delete = ON;
.output stdout
BEGIN;
UPDATE customers SET
    name = 'Customer ' || id,
    email = 'customer' || id || '@masked.invalid',
    phone = '+00 000 000 ' || printf('%04d', id),
    card = '0000 0000 0000 ' || printf('%04d', id);
COMMIT;
VACUUM;
SELECT 'masked ' || count(*) || ' customers' FROM customers;
