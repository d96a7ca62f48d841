import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Database } from '../../src/db/database.js';
import { createRandom, seedMarketplace, SEED_CATEGORIES, SeedTargetNotEmptyError } from '../../src/db/marketplace-seed.js';
import { defaultMigrationsDir, migrate } from '../../src/db/migrate.js';
import { BookingStatusSchema, RequestStatusSchema } from '../../src/protocol/index.js';

function migrated(t: { after(fn: () => void): void }): Database {
  const db = new Database(':memory:');
  t.after(() => db.close());
  migrate(db);
  return db;
}

/** One consumer, one provider, one request, ready for constraint checks. */
function base(t: { after(fn: () => void): void }): Database {
  const db = migrated(t);
  db.raw.exec(`
    INSERT INTO consumers (consumer_id, name) VALUES (1, 'Ada Adams'), (2, 'Ben Bauer');
    INSERT INTO providers (provider_id, name, rating) VALUES (1, 'Costa Plumbing', 4.5);
    INSERT INTO requests (request_id, consumer_id, title, category, status, created_at) VALUES (1, 1, 'Fix tap', 'plumbing', 'open', 1700000000000);
  `);
  return db;
}

const fails = (db: Database, sql: string, pattern: RegExp) => assert.throws(() => db.raw.exec(sql), pattern, sql);

test('the marketplace tables are STRICT', (t) => {
  const db = migrated(t);
  const tables = db.raw
    .prepare("SELECT name, strict FROM pragma_table_list WHERE name IN ('consumers', 'providers', 'requests', 'quotes', 'bookings') ORDER BY name")
    .all();
  assert.deepEqual(tables, [
    { name: 'bookings', strict: 1 },
    { name: 'consumers', strict: 1 },
    { name: 'providers', strict: 1 },
    { name: 'quotes', strict: 1 },
    { name: 'requests', strict: 1 },
  ]);
  const db2 = base(t);
  fails(
    db2,
    "INSERT INTO requests (request_id, consumer_id, title, category, status, created_at) VALUES (2, 1, 'x', 'plumbing', 'open', 'yesterday')",
    /cannot store TEXT value in INTEGER column requests\.created_at/,
  );
});

test('status CHECK constraints hold exactly the protocol enums', (t) => {
  const db = base(t);
  for (const status of RequestStatusSchema.options) db.raw.prepare('UPDATE requests SET status = ? WHERE request_id = 1').run(status);
  fails(db, "UPDATE requests SET status = 'pending' WHERE request_id = 1", /CHECK constraint failed: status IN/);
  for (const [i, status] of BookingStatusSchema.options.entries()) {
    db.raw
      .prepare(
        'INSERT INTO bookings (booking_id, request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (?, 1, 1, 1, ?, 1700100000000, 5000)',
      )
      .run(i + 1, status);
  }
  fails(
    db,
    "INSERT INTO bookings (request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (1, 1, 1, 'open', 1700100000000, 5000)",
    /CHECK constraint failed: status IN/,
  );
});

test('prices, ratings, ids and text lengths are checked', (t) => {
  const db = base(t);
  fails(db, 'INSERT INTO quotes (request_id, provider_id, price_cents) VALUES (1, 1, 0)', /CHECK constraint failed: price_cents > 0/);
  fails(
    db,
    "INSERT INTO bookings (request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (1, 1, 1, 'pending', 1, -100)",
    /CHECK constraint failed: price_cents > 0/,
  );
  fails(db, "INSERT INTO providers (provider_id, name, rating) VALUES (2, 'Too Good', 5.1)", /CHECK constraint failed: rating BETWEEN 0 AND 5/);
  fails(db, "INSERT INTO consumers (consumer_id, name) VALUES (10000000000, 'Eleven Digits')", /CHECK constraint failed: consumer_id BETWEEN 1 AND 9999999999/);
  fails(db, "INSERT INTO consumers (consumer_id, name) VALUES (3, '')", /CHECK constraint failed: length\(name\)/);
  fails(
    db,
    "INSERT INTO requests (request_id, consumer_id, title, category, status, created_at) VALUES (2, 1, 'x', '', 'open', 1)",
    /CHECK constraint failed: length\(category\)/,
  );
});

test('foreign keys are enforced', (t) => {
  const db = base(t);
  fails(
    db,
    "INSERT INTO requests (request_id, consumer_id, title, category, status, created_at) VALUES (2, 99, 'x', 'plumbing', 'open', 1)",
    /FOREIGN KEY constraint failed/,
  );
  fails(db, 'INSERT INTO quotes (request_id, provider_id, price_cents) VALUES (1, 99, 100)', /FOREIGN KEY constraint failed/);
  fails(
    db,
    "INSERT INTO bookings (request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (99, 1, 1, 'pending', 1, 100)",
    /FOREIGN KEY constraint failed/,
  );
  fails(db, 'DELETE FROM consumers WHERE consumer_id = 1', /FOREIGN KEY constraint failed/);
});

test('a provider quotes a request once', (t) => {
  const db = base(t);
  db.raw.exec('INSERT INTO quotes (request_id, provider_id, price_cents) VALUES (1, 1, 100)');
  fails(
    db,
    'INSERT INTO quotes (request_id, provider_id, price_cents) VALUES (1, 1, 200)',
    /UNIQUE constraint failed: quotes\.request_id, quotes\.provider_id/,
  );
});

test("a booking's consumer is always its request's consumer", (t) => {
  const db = base(t);
  fails(
    db,
    "INSERT INTO bookings (request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (1, 2, 1, 'pending', 1, 100)",
    /bookings\.consumer_id must be the consumer of the booked request/,
  );
  db.raw.exec(
    "INSERT INTO bookings (booking_id, request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (1, 1, 1, 1, 'pending', 1, 100)",
  );
  fails(db, 'UPDATE bookings SET consumer_id = 2 WHERE booking_id = 1', /bookings\.consumer_id must be the consumer of the booked request/);
  fails(db, 'UPDATE requests SET consumer_id = 2 WHERE request_id = 1', /requests\.consumer_id cannot change/);
  db.raw.exec("UPDATE bookings SET status = 'confirmed' WHERE booking_id = 1");
});

test('stored times stop at the last millisecond a date can hold, and a database already past it stops at the migration', (t) => {
  const db = base(t);
  const LAST = 8_640_000_000_000_000;
  db.raw.prepare('UPDATE requests SET created_at = ? WHERE request_id = 1').run(LAST);
  fails(db, `UPDATE requests SET created_at = ${LAST + 1024} WHERE request_id = 1`, /requests\.created_at must be at most 8640000000000000/);
  fails(
    db,
    `INSERT INTO requests (request_id, consumer_id, title, category, status, created_at) VALUES (2, 1, 'x', 'plumbing', 'open', ${LAST + 1024})`,
    /requests\.created_at must be at most/,
  );
  db.raw
    .prepare(
      "INSERT INTO bookings (booking_id, request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (1, 1, 1, 1, 'pending', ?, 100)",
    )
    .run(LAST);
  fails(db, `UPDATE bookings SET scheduled_at = ${LAST + 1024} WHERE booking_id = 1`, /bookings\.scheduled_at must be at most 8640000000000000/);
  fails(
    db,
    `INSERT INTO bookings (booking_id, request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (2, 1, 1, 1, 'pending', ${LAST + 1024}, 100)`,
    /bookings\.scheduled_at must be at most/,
  );

  // A database migrated to 002 only, holding a later time (as an import could leave it).
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-migrations-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  for (const file of fs.readdirSync(defaultMigrationsDir())) {
    if (/^00[12]_/.test(file)) fs.copyFileSync(path.join(defaultMigrationsDir(), file), path.join(dir, file));
  }
  const old = new Database(':memory:');
  t.after(() => old.close());
  migrate(old, dir);
  old.raw.exec(`INSERT INTO consumers (consumer_id, name) VALUES (1, 'Ada Adams');
    INSERT INTO requests (request_id, consumer_id, title, category, status, created_at) VALUES (1, 1, 'Fix tap', 'plumbing', 'open', ${LAST + 1024})`);
  assert.throws(() => migrate(old), /requests\.created_at must be at most 8640000000000000/);
  assert.deepEqual(old.raw.prepare('SELECT name FROM schema_migrations ORDER BY version').pluck().all(), ['001_chat.sql', '002_marketplace.sql']);
  old.raw.exec('UPDATE requests SET created_at = 1700000000000');
  // 003 applies once the time is back in range, and every migration after it with it.
  const later = fs
    .readdirSync(defaultMigrationsDir())
    .filter((f) => f.endsWith('.sql') && !/^00[12]_/.test(f))
    .sort();
  assert.equal(later[0], '003_marketplace_time_bound.sql');
  assert.deepEqual(migrate(old), later);
});

function contentHash(db: Database): string {
  const hash = crypto.createHash('sha256');
  for (const table of ['consumers', 'providers', 'requests', 'quotes', 'bookings']) {
    for (const row of db.raw.prepare(`SELECT * FROM ${table} ORDER BY rowid`).raw().iterate()) hash.update(JSON.stringify(row));
  }
  return hash.digest('hex');
}

test('the seed is deterministic: same options, same rows; another seed, other rows', (t) => {
  const options = { consumers: 50, providers: 30, requests: 2000, batchSize: 300 };
  const [a, b, c] = [migrated(t), migrated(t), migrated(t)];
  const resultA = seedMarketplace(a, { ...options, seed: 3 });
  assert.deepEqual(seedMarketplace(b, { ...options, seed: 3 }), resultA);
  seedMarketplace(c, { ...options, seed: 4 });
  assert.equal(contentHash(a), contentHash(b));
  assert.notEqual(contentHash(a), contentHash(c));
  assert.deepEqual([resultA.consumers, resultA.providers, resultA.requests], [50, 30, 2000]);
  const counts = a.raw.prepare('SELECT (SELECT count(*) FROM quotes) AS quotes, (SELECT count(*) FROM bookings) AS bookings').get();
  assert.deepEqual(counts, { quotes: resultA.quotes, bookings: resultA.bookings });
});

test('the seed is realistic: every category, every status, several quotes per request, bookings consistent with requests', (t) => {
  const db = migrated(t);
  const pluck = (sql: string) => db.raw.prepare(sql).pluck().all();
  const indexSql = "SELECT sql FROM sqlite_master WHERE type = 'index' ORDER BY name";
  const indexesBefore = pluck(indexSql);
  seedMarketplace(db, { consumers: 200, providers: 100, requests: 5000 });
  assert.deepEqual(pluck('SELECT DISTINCT category FROM requests ORDER BY 1'), [...SEED_CATEGORIES].sort());
  assert.deepEqual(pluck('SELECT DISTINCT status FROM requests ORDER BY 1'), [...RequestStatusSchema.options].sort());
  assert.deepEqual(pluck('SELECT DISTINCT status FROM bookings ORDER BY 1'), [...BookingStatusSchema.options].sort());
  const avgQuotes = db.raw.prepare('SELECT avg(n) FROM (SELECT count(*) AS n FROM quotes GROUP BY request_id)').pluck().get() as number;
  assert.ok(avgQuotes > 2 && avgQuotes < 5, `average quotes per quoted request ${avgQuotes}`);
  // booked <=> a booking that is not cancelled; every booking is at a quoted provider and price.
  assert.equal(
    db.raw
      .prepare(
        "SELECT count(*) FROM requests r WHERE (r.status = 'booked') <> EXISTS (SELECT 1 FROM bookings b WHERE b.request_id = r.request_id AND b.status <> 'cancelled')",
      )
      .pluck()
      .get(),
    0,
  );
  assert.equal(
    db.raw
      .prepare(
        'SELECT count(*) FROM bookings b WHERE NOT EXISTS (SELECT 1 FROM quotes q WHERE q.request_id = b.request_id AND q.provider_id = b.provider_id AND q.price_cents = b.price_cents)',
      )
      .pluck()
      .get(),
    0,
  );
  assert.equal(db.raw.prepare('SELECT count(*) FROM bookings b JOIN requests r USING (request_id) WHERE b.scheduled_at <= r.created_at').pluck().get(), 0);
  // The indexes dropped for the bulk load are all back.
  assert.deepEqual(pluck(indexSql), indexesBefore);
});

test('the seed refuses a database that already holds marketplace rows, and changes nothing', (t) => {
  const db = migrated(t);
  seedMarketplace(db, { consumers: 5, providers: 5, requests: 10 });
  const before = contentHash(db);
  assert.throws(() => seedMarketplace(db, { consumers: 5, providers: 5, requests: 10 }), SeedTargetNotEmptyError);
  assert.equal(contentHash(db), before);
});

test('a seed that fails half way leaves the database as it was, indexes included', (t) => {
  const db = migrated(t);
  const indexes = () => db.raw.prepare("SELECT name FROM sqlite_master WHERE type = 'index' ORDER BY name").pluck().all();
  const before = indexes();
  assert.throws(
    () =>
      seedMarketplace(db, {
        consumers: 5,
        providers: 5,
        requests: 100,
        batchSize: 10,
        onProgress: (done) => {
          if (done >= 50) throw new Error('disk full');
        },
      }),
    /disk full/,
  );
  assert.deepEqual(indexes(), before);
  assert.equal(db.raw.prepare('SELECT count(*) FROM requests').pluck().get(), 0);
});

test('the PRNG is seeded and spreads evenly', () => {
  const a = createRandom(42);
  const b = createRandom(42);
  const buckets = new Array<number>(10).fill(0);
  for (let i = 0; i < 100_000; i++) {
    const x = a.next();
    assert.equal(x, b.next());
    assert.ok(x >= 0 && x < 1);
    buckets[Math.floor(x * 10)]!++;
  }
  for (const n of buckets) assert.ok(n > 9_500 && n < 10_500, `bucket ${n}`);
  assert.notEqual(createRandom(43).next(), createRandom(42).next());
});
