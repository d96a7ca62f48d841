-- A stored time must be one the wire can write. Times are written as
-- ISO-8601 text, exactly as JavaScript's Date writes them, and a Date ends at
-- 8,640,000,000,000,000 ms (year 275760): a later created_at or scheduled_at
-- passed 002's CHECK (>= 0) yet made every page that held the row fail.
-- A CHECK cannot be added to an existing table, so triggers hold the bound;
-- the no-op updates at the end run them over rows stored before this
-- migration, so a database that already holds such a row stops here, with the
-- message, instead of failing one page at a time.

CREATE TRIGGER requests_created_at_is_a_date_on_insert
BEFORE INSERT ON requests
WHEN NEW.created_at > 8640000000000000
BEGIN
  SELECT RAISE(ABORT, 'requests.created_at must be at most 8640000000000000 (the last millisecond a date can hold)');
END;

CREATE TRIGGER requests_created_at_is_a_date_on_update
BEFORE UPDATE OF created_at ON requests
WHEN NEW.created_at > 8640000000000000
BEGIN
  SELECT RAISE(ABORT, 'requests.created_at must be at most 8640000000000000 (the last millisecond a date can hold)');
END;

CREATE TRIGGER bookings_scheduled_at_is_a_date_on_insert
BEFORE INSERT ON bookings
WHEN NEW.scheduled_at > 8640000000000000
BEGIN
  SELECT RAISE(ABORT, 'bookings.scheduled_at must be at most 8640000000000000 (the last millisecond a date can hold)');
END;

CREATE TRIGGER bookings_scheduled_at_is_a_date_on_update
BEFORE UPDATE OF scheduled_at ON bookings
WHEN NEW.scheduled_at > 8640000000000000
BEGIN
  SELECT RAISE(ABORT, 'bookings.scheduled_at must be at most 8640000000000000 (the last millisecond a date can hold)');
END;

UPDATE requests SET created_at = created_at WHERE created_at > 8640000000000000;
UPDATE bookings SET scheduled_at = scheduled_at WHERE scheduled_at > 8640000000000000;
