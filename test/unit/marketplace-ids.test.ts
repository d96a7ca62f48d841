import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { Database } from '../../src/db/database.js';
import { formatId, isoTime, parseId } from '../../src/db/marketplace-ids.js';
import { createSqliteMarketplaceStore, idJson, printfSql, timeJson } from '../../src/db/marketplace-queries.js';
import { migrate } from '../../src/db/migrate.js';

test('isoTime writes exactly what Date#toISOString writes', () => {
  for (const ms of [0, 1, 999, 86_399_999, 86_400_000, 951_782_400_000, 1_748_736_000_000, 4_107_542_400_000, 253_402_300_799_999]) {
    assert.equal(isoTime(ms), new Date(ms).toISOString(), String(ms));
  }
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 253_402_300_799_999 }), (ms) => isoTime(ms) === new Date(ms).toISOString()),
    { numRuns: 20_000 },
  );
  // Outside the fast path it is toISOString itself.
  assert.equal(isoTime(253_402_300_800_000), '+010000-01-01T00:00:00.000Z');
  assert.equal(isoTime(-1), '1969-12-31T23:59:59.999Z');
});

test('wire ids are the kind prefix and ten digits, and sort like the keys they stand for', () => {
  assert.equal(formatId('consumer', 42), 'c_0000000042');
  assert.equal(formatId('provider', 7), 'p_0000000007');
  assert.equal(formatId('request', 9_999_999_999), 'r_9999999999');
  assert.equal(formatId('booking', 1), 'b_0000000001');
  assert.throws(() => formatId('request', 0), RangeError);
  assert.throws(() => formatId('request', 10_000_000_000), RangeError);
  fc.assert(
    fc.property(fc.integer({ min: 1, max: 9_999_999_999 }), fc.integer({ min: 1, max: 9_999_999_999 }), (a, b) => {
      const [x, y] = [formatId('request', a), formatId('request', b)];
      return Math.sign(a - b) === (x < y ? -1 : x > y ? 1 : 0) && parseId('request', x) === a;
    }),
  );
});

test('parseId accepts only the canonical id of its kind', () => {
  assert.equal(parseId('consumer', 'c_0000000042'), 42);
  for (const bad of ['c_42', 'c_00000000042', 'p_0000000042', 'c_0000000000', 'C_0000000042', ' c_0000000042', 'c_000000004x', '']) {
    assert.equal(parseId('consumer', bad), null, bad);
  }
});

test('the times and ids the SQL statements write are exactly isoTime and formatId', () => {
  const db = new Database(':memory:');
  try {
    migrate(db);
    createSqliteMarketplaceStore(db);
    const time = db.raw.prepare(`SELECT ${printfSql(timeJson('t.ms'))} FROM (SELECT ? AS ms) t`).pluck();
    const id = db.raw.prepare(`SELECT ${printfSql(idJson('request', 't.key'))} FROM (SELECT ? AS key) t`).pluck();
    // The last two are past year 9999, where SQLite's dates end: written by isoTime through chatwire_iso_time.
    for (const ms of [0, 1, 999, 86_399_999, 951_782_400_000, 1_748_725_857_123, 253_402_300_799_999, 253_402_300_800_000, 8_640_000_000_000_000]) {
      assert.equal(time.get(ms), JSON.stringify(isoTime(ms)), String(ms));
    }
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 253_402_300_799_999 }), (ms) => time.get(ms) === JSON.stringify(isoTime(ms))),
      { numRuns: 20_000 },
    );
    for (const key of [1, 42, 123_456_789, 9_999_999_999]) assert.equal(id.get(key), JSON.stringify(formatId('request', key)));
  } finally {
    db.close();
  }
});
