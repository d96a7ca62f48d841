-- The marketplace: consumers post service requests, providers quote on them,
-- and a consumer books a provider for a request.
--
-- Ids are INTEGER PRIMARY KEYs: the table's own b-tree is then the clustered
-- index, so a point lookup by id reads one leaf that holds the whole row (the
-- same cost as a covering index, without a second copy of the row). The wire
-- renders them as zero-padded strings ('r_0000000042'), which is why every id
-- is capped at ten digits: the padded strings then sort like the numbers
-- (docs/marketplace.md). Times are integer milliseconds since the epoch (UTC).

CREATE TABLE consumers (
  consumer_id INTEGER PRIMARY KEY CHECK (consumer_id BETWEEN 1 AND 9999999999),
  name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200)
) STRICT;

CREATE TABLE providers (
  provider_id INTEGER PRIMARY KEY CHECK (provider_id BETWEEN 1 AND 9999999999),
  name        TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
  rating      REAL NOT NULL CHECK (rating BETWEEN 0 AND 5)
) STRICT;

CREATE TABLE requests (
  request_id  INTEGER PRIMARY KEY CHECK (request_id BETWEEN 1 AND 9999999999),
  consumer_id INTEGER NOT NULL REFERENCES consumers (consumer_id),
  title       TEXT NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
  category    TEXT NOT NULL CHECK (length(category) BETWEEN 1 AND 64),
  status      TEXT NOT NULL CHECK (status IN ('open', 'booked', 'closed')),
  created_at  INTEGER NOT NULL CHECK (created_at >= 0)
) STRICT;

-- One quote per provider and request. The UNIQUE index (request_id, provider_id)
-- also answers the quote counts of a page of requests (IN on its prefix), covering.
CREATE TABLE quotes (
  quote_id    INTEGER PRIMARY KEY,
  request_id  INTEGER NOT NULL REFERENCES requests (request_id),
  provider_id INTEGER NOT NULL REFERENCES providers (provider_id),
  price_cents INTEGER NOT NULL CHECK (price_cents > 0),
  UNIQUE (request_id, provider_id)
) STRICT;

-- consumer_id repeats the request's consumer so that a consumer's bookings page
-- comes from one index; the triggers below keep the copy true.
CREATE TABLE bookings (
  booking_id   INTEGER PRIMARY KEY CHECK (booking_id BETWEEN 1 AND 9999999999),
  request_id   INTEGER NOT NULL REFERENCES requests (request_id),
  consumer_id  INTEGER NOT NULL REFERENCES consumers (consumer_id),
  provider_id  INTEGER NOT NULL REFERENCES providers (provider_id),
  status       TEXT NOT NULL CHECK (status IN ('pending', 'confirmed', 'completed', 'cancelled')),
  scheduled_at INTEGER NOT NULL CHECK (scheduled_at >= 0),
  price_cents  INTEGER NOT NULL CHECK (price_cents > 0)
) STRICT;

CREATE TRIGGER bookings_consumer_is_request_consumer_on_insert
BEFORE INSERT ON bookings
WHEN EXISTS (SELECT 1 FROM requests WHERE request_id = NEW.request_id AND consumer_id IS NOT NEW.consumer_id)
BEGIN
  SELECT RAISE(ABORT, 'bookings.consumer_id must be the consumer of the booked request');
END;

CREATE TRIGGER bookings_consumer_is_request_consumer_on_update
BEFORE UPDATE OF request_id, consumer_id ON bookings
WHEN EXISTS (SELECT 1 FROM requests WHERE request_id = NEW.request_id AND consumer_id IS NOT NEW.consumer_id)
BEGIN
  SELECT RAISE(ABORT, 'bookings.consumer_id must be the consumer of the booked request');
END;

-- A request never changes hands; allowing it would orphan the bookings' copy of consumer_id.
CREATE TRIGGER requests_consumer_is_fixed
BEFORE UPDATE OF consumer_id ON requests
WHEN NEW.consumer_id IS NOT OLD.consumer_id
BEGIN
  SELECT RAISE(ABORT, 'requests.consumer_id cannot change');
END;

-- Indexes: one per hot query, each holding every column its query reads, in
-- the query's order, so that a page is one backward walk of
-- limit + 1 index entries (EXPLAIN QUERY PLAN: USING COVERING INDEX, no temp
-- b-tree). The trailing columns are the selected ones, not search keys.
-- Foreign-key child columns are deliberately not indexed beyond these: nothing
-- deletes consumers, providers or requests; a delete path would need them.

-- requests.list, no filter.
CREATE INDEX requests_by_created ON requests (created_at, request_id, consumer_id, title, category, status);
-- requests.list, status filter.
CREATE INDEX requests_by_status ON requests (status, created_at, request_id, consumer_id, title, category);
-- requests.list, category filter.
CREATE INDEX requests_by_category ON requests (category, created_at, request_id, consumer_id, title, status);
-- requests.list, category and status filters.
CREATE INDEX requests_by_category_status ON requests (category, status, created_at, request_id, consumer_id, title);
-- consumer.requests page.
CREATE INDEX requests_by_consumer ON requests (consumer_id, created_at, request_id, title, category, status);
-- consumer.requests: the bookings of a page of requests.
CREATE INDEX bookings_by_request ON bookings (request_id, scheduled_at, booking_id, status, price_cents, provider_id);
-- consumer.bookings page.
CREATE INDEX bookings_by_consumer ON bookings (consumer_id, scheduled_at, booking_id, status, price_cents, request_id, provider_id);
