-- Idempotency keys past their 24-hour window are deleted in batches, oldest first (pruneIdempotencyKeys): this index
-- finds them without reading the table.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
