/**
 * What only the PostgreSQL store has to prove: its plans are index-only,
 * its SQL writes ids and times exactly as the wire does, its cursors are
 * SQLite's, and its seed is SQLite's seed. The behaviour shared with SQLite
 * is in the contract tests (marketplace*.test.ts, run on both engines).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import type { Identity } from '../../src/auth/identity.js';
import { Database } from '../../src/db/database.js';
import { seedMarketplace, SeedTargetNotEmptyError } from '../../src/db/marketplace-seed.js';
import { migrate } from '../../src/db/migrate.js';
import { openPostgres } from '../../src/db/pg.js';
import { MAX_IN_LIST } from '../../src/db/marketplace-store.js';
import { pgMarketplaceStatements } from '../../src/db/pg-marketplace-store.js';
import { MARKETPLACE_TABLES, seedMarketplacePg } from '../../src/db/pg-marketplace-seed.js';
import { migratePg } from '../../src/db/pg-migrate.js';
import { createMarketplaceService } from '../../src/marketplace/marketplace-service.js';
import { createTestDatabase, databaseUrl, dropTestDatabase, pgTestOptions } from '../helpers/postgres.js';
import { openStoreFixture, wireId } from './marketplace-fixture.js';

const options = await pgTestOptions();
const staff: Identity = { userId: 'ops-1', role: 'staff' };
const FROM_NEWEST = Number.MAX_SAFE_INTEGER;

/** A migrated, empty database of its own, and a pool on it. */
async function emptyDatabase(t: { after(fn: () => Promise<void>): void }) {
  const name = await createTestDatabase();
  const sql = openPostgres(databaseUrl(name), { max: 2 });
  t.after(async () => {
    await sql.end({ timeout: 5 });
    await dropTestDatabase(name);
  });
  await migratePg(sql);
  return sql;
}

interface PlanNode {
  'Node Type': string;
  'Index Name'?: string;
  'Heap Fetches'?: number;
  Plans?: PlanNode[];
}
const nodesOf = (node: PlanNode): PlanNode[] => [node, ...(node.Plans ?? []).flatMap(nodesOf)];

/** A SQL literal of a parameter, for EXECUTE. */
const literal = (value: unknown): string =>
  Array.isArray(value) ? `'{${value.join(',')}}'` : typeof value === 'string' ? `'${value.replaceAll("'", "''")}'` : String(value);

/** The index each statement's page walk must use, by op and filters. */
function drivingIndex(op: string, sql: string): string {
  if (op === 'requests.page') {
    const category = sql.includes('r.category = $');
    const status = sql.includes('r.status = $');
    return category ? (status ? 'requests_by_category_status' : 'requests_by_category') : status ? 'requests_by_status' : 'requests_by_created';
  }
  return {
    'consumer_requests.page': 'requests_by_consumer',
    'consumer_bookings.page': 'bookings_by_consumer',
    'bookings.by_request': 'bookings_by_request',
    'consumers.by_id': 'consumers_pkey',
  }[op]!;
}

test(
  'every statement of the PostgreSQL store is served by index-only scans of its covering indexes after VACUUM ANALYZE, as first planned and as the plan cache keeps it',
  options,
  async (t) => {
    // Seeded as `npm run seed` seeds, at a size where the planner's choices are the ones production gets.
    const pg = await emptyDatabase(t);
    await seedMarketplacePg(pg, { consumers: 5000, providers: 1000, requests: 50_000 });
    await pg.unsafe(`VACUUM ANALYZE ${MARKETPLACE_TABLES.join(', ')}`);
    const [heaviest] = await pg<[{ consumer_id: number }]>`SELECT consumer_id FROM requests GROUP BY consumer_id ORDER BY count(*) DESC LIMIT 1`;
    const pageIds = (
      await pg<
        { request_id: number }[]
      >`SELECT request_id FROM requests WHERE consumer_id = ${heaviest.consumer_id} ORDER BY created_at DESC, request_id DESC LIMIT 100`
    ).map((r) => r.request_id);
    assert.equal(pageIds.length, 100);
    const paramsOf = (op: string, sql: string): unknown[] => {
      if (op === 'requests.page')
        return [...(sql.includes('r.category = $') ? ['plumbing'] : []), ...(sql.includes('r.status = $') ? ['open'] : []), FROM_NEWEST, FROM_NEWEST];
      if (op === 'bookings.by_request') return [pageIds];
      if (op === 'consumers.by_id') return [[heaviest.consumer_id, 2, 99_999]];
      return [heaviest.consumer_id, FROM_NEWEST, FROM_NEWEST];
    };
    const conn = await pg.reserve();
    t.after(() => conn.release());
    const used = new Set<string>();
    const statements = pgMarketplaceStatements();
    // Every page statement at every page take (a page and the row past it), and the two relation statements.
    assert.equal(statements.length, 6 * 5 + 2);
    for (const [i, { op, sql }] of statements.entries()) {
      await conn.unsafe(`PREPARE s${i} AS ${sql}`);
      const execute = `EXECUTE s${i}(${paramsOf(op, sql).map(literal).join(', ')})`;
      // The first runs get a plan for their own values; from the sixth on the plan cache may keep a generic one.
      for (let run = 0; run < 7; run++) {
        const [row] = await conn.unsafe(`EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, FORMAT JSON) ${execute}`);
        const nodes = nodesOf((row as unknown as { 'QUERY PLAN': [{ Plan: PlanNode }] })['QUERY PLAN'][0].Plan);
        const where = `${op} (run ${run}): ${nodes.map((n) => `${n['Node Type']}${n['Index Name'] ? ` ${n['Index Name']}` : ''}`).join(' | ')}`;
        const scans = nodes.filter((n) => /Scan/.test(n['Node Type']));
        assert.ok(scans.length >= 1, where);
        for (const scan of scans) {
          assert.equal(scan['Node Type'], 'Index Only Scan', where);
          assert.equal(scan['Heap Fetches'], 0, where);
          used.add(scan['Index Name']!);
        }
        for (const node of nodes) assert.doesNotMatch(node['Node Type'], /Sort|Hash|Materialize|Merge/, where);
        assert.equal(scans[0]!['Index Name'], drivingIndex(op, sql), where);
        await conn.unsafe(execute);
      }
    }
    // The plan cache keeps one generic plan per page statement rather than re-planning each execution (planning a
    // page costs about what running it does). consumers.by_id, run only for an empty page, may keep re-planning.
    const plans = new Map(
      (await conn.unsafe('SELECT name, generic_plans FROM pg_prepared_statements')).map((r) => [r.name as string, r.generic_plans as number]),
    );
    for (const [i, { op, sql }] of statements.entries()) {
      if (op.endsWith('.page')) assert.ok(plans.get(`s${i}`)! > 0, `${op} re-planned at every execution: ${sql}`);
    }
    // No index that no statement uses, but the ones integrity needs (foreign keys point at primary keys; one quote per provider and request).
    const indexes = (
      await pg<{ indexname: string }[]>`SELECT indexname FROM pg_indexes WHERE tablename = ANY(${MARKETPLACE_TABLES as string[]}) ORDER BY indexname`
    ).map((r) => r.indexname);
    assert.deepEqual(
      [...used].sort(),
      indexes.filter((name) => !['bookings_pkey', 'quotes_pkey'].includes(name)),
    );
  },
);

test('the PostgreSQL store writes every item as the SQLite store does, to the character, up to the last millisecond a date holds', options, async (t) => {
  const [lite, pg] = await Promise.all([openStoreFixture(t, 'sqlite'), openStoreFixture(t, 'postgres')]);
  // Times past year 9999 (toISOString's six-digit years) and text that JSON must escape, in both.
  const newest = Math.max(...lite.tables.requests.map((r) => r.created_at));
  const extra = [
    { title: 'tab\tquote" back\\ ✓ \u2028', category: 'plumbing', status: 'open', createdAt: newest + 1 },
    { title: 'Year ten thousand', category: 'plumbing', status: 'open', createdAt: 253_402_300_800_000 },
    { title: 'The last date', category: 'plumbing', status: 'open', createdAt: 8_640_000_000_000_000 },
  ];
  await Promise.all([lite.insertRequests(extra), pg.insertRequests(extra)]);
  // SQLite's json_quote writes a whole REAL with a '.0' (a rating of 5 as 5.0); JSON reads both alike.
  const text = (rows: unknown) => JSON.stringify(rows).replace(/"rating\\":(\d+)\.0\}/g, '"rating\\":$1}');
  const both = async <T>(read: (store: typeof lite.store) => T | Promise<T>) => {
    const [a, b] = await Promise.all([read(lite.store), read(pg.store)]);
    assert.ok(Array.isArray(a) && a.length > 0);
    assert.equal(text(b), text(a));
  };
  await both((s) => s.requestsPage({}, null, 300));
  await both((s) => s.requestsPage({ category: 'plumbing', status: 'open' }, null, 300));
  // PostgreSQL's consumer.requests rows bring their bookings arrays: the text SQLite's bookings query gives for the same requests.
  const withBookings = async (s: typeof lite.store, c: number) => {
    const rows = await s.consumerRequestsPage(c, null, 1000);
    if (rows.every((row) => row[2] !== undefined)) return rows;
    const bookings: [number, string][] = [];
    for (let i = 0; i < rows.length; i += MAX_IN_LIST)
      bookings.push(...(await s.bookingsOfRequests(rows.slice(i, i + MAX_IN_LIST).map(([requestId]) => requestId))));
    return rows.map(([requestId, itemJson]) => [
      requestId,
      itemJson,
      `[${bookings
        .filter(([id]) => id === requestId)
        .map(([, json]) => json)
        .join(',')}]`,
    ]);
  };
  for (let c = 1; c <= 3; c++) {
    await both((s) => withBookings(s, c));
    await both((s) => s.consumerBookingsPage(c, null, 1000));
  }
  assert.ok((await pg.store.consumerRequestsPage(1, null, 1000)).every((row) => row[2] !== undefined));
  const requestIds = lite.tables.requests
    .filter((r) => r.consumer_id <= 2)
    .map((r) => r.request_id)
    .slice(0, 256);
  await both((s) => s.bookingsOfRequests(requestIds));
  await both((s) => s.existingConsumers([1, 2, 99_999]));
});

test('PostgreSQL pages carry the very cursors SQLite gives for the same positions, and the same items', options, async (t) => {
  const [lite, pg] = await Promise.all([openStoreFixture(t, 'sqlite'), openStoreFixture(t, 'postgres')]);
  const services = [lite, pg].map((f) => createMarketplaceService({ store: f.store }));
  t.after(() => {
    for (const s of services) s.close();
  });
  const walks: [string, (s: (typeof services)[number], cursor?: string) => Promise<{ items: unknown[]; nextCursor: string | null }>][] = [
    ['requests.list', (s, cursor) => s.requestsList(staff, { limit: 50, status: 'booked', cursor })],
    ['consumer.requests', (s, cursor) => s.consumerRequests(staff, { consumerId: wireId('c', 2), limit: 7, cursor })],
    ['consumer.bookings', (s, cursor) => s.consumerBookings(staff, { consumerId: wireId('c', 1), limit: 30, cursor })],
  ];
  for (const [name, page] of walks) {
    let cursor: string | undefined;
    for (let n = 0; n < 6; n++) {
      const [a, b] = await Promise.all(services.map((s) => page(s, cursor)));
      assert.deepEqual(b, a, `${name} page ${n}`);
      assert.notEqual(a!.nextCursor, null);
      cursor = a!.nextCursor!;
    }
  }
});

test('seeding PostgreSQL gives the rows seeding SQLite gives, and refuses a database that holds some', options, async (t) => {
  const seed = { consumers: 40, providers: 25, requests: 1500, seed: 5, batchSize: 400 };
  const lite = new Database(':memory:');
  t.after(async () => lite.close());
  migrate(lite);
  const expected = seedMarketplace(lite, seed);
  const sql = await emptyDatabase(t);
  assert.deepEqual(await seedMarketplacePg(sql, seed), expected);
  const orderBy: Record<string, string> = {
    consumers: 'consumer_id',
    providers: 'provider_id',
    requests: 'request_id',
    quotes: 'quote_id',
    bookings: 'booking_id',
  };
  for (const table of MARKETPLACE_TABLES) {
    const want = lite.raw.prepare(`SELECT * FROM ${table} ORDER BY ${orderBy[table]}`).all();
    const got = await sql.unsafe(`SELECT * FROM ${table} ORDER BY ${orderBy[table]}`);
    assert.deepEqual(
      [...got].map((row) => ({ ...row })),
      want,
      table,
    );
  }
  await assert.rejects(seedMarketplacePg(sql, seed), SeedTargetNotEmptyError);
});

test("the PostgreSQL schema holds the SQLite schema's rules: statuses, a booking's consumer, a request's owner, the last date", options, async (t) => {
  const sql = await emptyDatabase(t);
  await sql
    .unsafe(`
    INSERT INTO consumers (consumer_id, name) VALUES (1, 'Ada Adams'), (2, 'Ben Bauer');
    INSERT INTO providers (provider_id, name, rating) VALUES (1, 'Costa Plumbing', 4.5);
    INSERT INTO requests (request_id, consumer_id, title, category, status, created_at) VALUES (1, 1, 'Fix tap', 'plumbing', 'open', 1700000000000);`)
    .simple();
  const fails = (statement: string, pattern: RegExp) => assert.rejects(sql.unsafe(statement), pattern, statement);
  await fails("UPDATE requests SET status = 'pending' WHERE request_id = 1", /requests_status_check/);
  await fails(
    "INSERT INTO bookings (request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (1, 2, 1, 'pending', 1, 100)",
    /bookings\.consumer_id must be the consumer of the booked request/,
  );
  await sql.unsafe("INSERT INTO bookings (request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (1, 1, 1, 'pending', 1, 100)");
  await fails('UPDATE bookings SET consumer_id = 2', /bookings\.consumer_id must be the consumer of the booked request/);
  await fails('UPDATE requests SET consumer_id = 2 WHERE request_id = 1', /requests\.consumer_id cannot change/);
  await fails('UPDATE requests SET created_at = 8640000000000001 WHERE request_id = 1', /requests_created_at_check/);
  await fails("INSERT INTO consumers (consumer_id, name) VALUES (10000000000, 'Eleven Digits')", /consumers_consumer_id_check/);
  await fails("INSERT INTO providers (provider_id, name, rating) VALUES (2, 'Too Good', 5.1)", /providers_rating_check/);
  await fails('INSERT INTO quotes (request_id, provider_id, price_cents) VALUES (1, 99, 100)', /quotes_provider_id_fkey/);
});
