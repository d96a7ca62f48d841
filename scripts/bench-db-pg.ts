/**
 * bench:db against PostgreSQL (`npm run bench:db -- --database-url postgres://...`, or
 * CHATWIRE_DATABASE_URL): the batched service on the PostgreSQL store next to a naive N+1
 * implementation (one query per row per relation, each awaited in turn, the way an
 * ORM-naive service does it) and the service with batching off, over the loopback
 * connection, measured side by side in one run at page sizes 20 and 100.
 *
 * The database is created when it does not exist, migrated, and seeded with --requests
 * when its marketplace tables are empty; a seeded database is reused as it is.
 * Before timing, every implementation's frames are checked to parse to the same value.
 * Prints a table, then one JSON line.
 */
import assert from 'node:assert/strict';
import os from 'node:os';
import type { Identity } from '../src/auth/identity.js';
import { formatId, isoTime, parseId } from '../src/db/marketplace-ids.js';
import type { KeysetPosition } from '../src/db/marketplace-store.js';
import { openPostgres, type Pg } from '../src/db/pg.js';
import { createPgMarketplaceStore } from '../src/db/pg-marketplace-store.js';
import { seedMarketplacePg } from '../src/db/pg-marketplace-seed.js';
import { migratePg } from '../src/db/pg-migrate.js';
import { decodeCursor, encodeCursor } from '../src/marketplace/cursor.js';
import { createMarketplaceService, DEFAULT_PAGE_LIMIT, type MarketplaceService } from '../src/marketplace/marketplace-service.js';
import { AppError, serializePage, type ConsumerPageQuery, type RequestsListQuery } from '../src/protocol/index.js';
import { lookupTable, type LookupResult } from './bench-support.js';
import { redactUrl } from './command-line.js';

export interface PgBenchOptions {
  url: string;
  requests: number;
  callsPerCase: number;
  rounds: number;
}

const log = (line: string) => process.stderr.write(`${line}\n`);
const staff: Identity = { userId: 'bench', role: 'staff' };
const FROM_NEWEST = Number.MAX_SAFE_INTEGER;
const round = (n: number, digits: number) => Math.round(n * 10 ** digits) / 10 ** digits;

/** A pool on the database, created first (through the server's `postgres` database) when it does not exist. */
async function openDatabase(url: string): Promise<Pg> {
  const sql = openPostgres(url, { applicationName: 'chatwire-bench-db' });
  try {
    await sql`SELECT 1`;
    return sql;
  } catch (err) {
    if ((err as { code?: string }).code !== '3D000') throw err;
  }
  await sql.end();
  const name = decodeURIComponent(new URL(url).pathname.slice(1));
  const adminUrl = new URL(url);
  adminUrl.pathname = '/postgres';
  const admin = openPostgres(adminUrl.toString(), { max: 1 });
  await admin.unsafe(`CREATE DATABASE "${name.replaceAll('"', '""')}"`);
  await admin.end();
  log(`created database ${name}`);
  return openPostgres(url, { applicationName: 'chatwire-bench-db' });
}

/** The three lookups, each to the JSON text of its reply frame. */
interface FrameLookups {
  requestsList(q: RequestsListQuery): Promise<string>;
  consumerRequests(q: ConsumerPageQuery): Promise<string>;
  consumerBookings(q: ConsumerPageQuery): Promise<string>;
}

type RequestRow = { request_id: number; consumer_id: number; title: string; category: string; status: string; created_at: number };
type BookingRow = { booking_id: number; request_id: number; provider_id: number; status: string; scheduled_at: number; price_cents: number };

/**
 * The N+1 baseline: the page, then one query per row for each relation (and one
 * per booking for its provider), each awaited before the next, as an ORM-naive
 * service does. Same indexes, cursors and wire format as the service.
 */
function naiveFrames(sql: Pg, count: () => void): FrameLookups {
  const q = async <Row>(text: string, params: unknown[]): Promise<Row[]> => {
    count();
    return (await sql.unsafe(text, params as never[], { prepare: true })) as unknown as Row[];
  };
  const from = (after: KeysetPosition | null) => (after ? [after.sortKey, after.id] : [FROM_NEWEST, FROM_NEWEST]);
  const provider = async (id: number) => {
    const [p] = await q<{ provider_id: number; name: string; rating: number }>('SELECT provider_id, name, rating FROM providers WHERE provider_id = $1', [id]);
    return { providerId: formatId('provider', p!.provider_id), name: p!.name, rating: p!.rating };
  };
  const request = (r: RequestRow) => ({
    requestId: formatId('request', r.request_id),
    consumerId: formatId('consumer', r.consumer_id),
    title: r.title,
    category: r.category,
    status: r.status,
    createdAt: isoTime(r.created_at),
  });
  const booking = async (b: BookingRow) => ({
    bookingId: formatId('booking', b.booking_id),
    status: b.status,
    scheduledAt: isoTime(b.scheduled_at),
    priceCents: b.price_cents,
  });
  /** The caller's check, the cursor, and limit + 1 rows of one consumer's page. */
  async function consumerPage<Row extends { [k: string]: unknown }>(
    query: ConsumerPageQuery,
    kind: string,
    text: string,
    position: (row: Row) => KeysetPosition,
  ) {
    const key = parseId('consumer', query.consumerId);
    if (key === null || (await q('SELECT consumer_id FROM consumers WHERE consumer_id = $1', [key])).length === 0)
      throw new AppError('not_found', 'no such consumer');
    const limit = query.limit ?? DEFAULT_PAGE_LIMIT;
    const after = query.cursor ? decodeCursor(query.cursor, kind, query.consumerId) : null;
    const rows = await q<Row>(text, [key, ...from(after), limit + 1]);
    const page = rows.slice(0, limit);
    return { page, nextCursor: rows.length > limit ? encodeCursor(kind, query.consumerId, position(page.at(-1)!)) : null };
  }
  return {
    async requestsList(query) {
      const limit = query.limit ?? DEFAULT_PAGE_LIMIT;
      const scope = JSON.stringify([query.status ?? null, query.category ?? null]);
      const after = query.cursor ? decodeCursor(query.cursor, 'requests.list', scope) : null;
      const filters = [
        ...(query.category !== undefined ? [['category', query.category]] : []),
        ...(query.status !== undefined ? [['status', query.status]] : []),
      ];
      const where = [
        ...filters.map(([column], i) => `${column} = $${i + 1}`),
        `(created_at, request_id) < ($${filters.length + 1}, $${filters.length + 2})`,
      ].join(' AND ');
      const rows = await q<RequestRow>(
        `SELECT request_id, consumer_id, title, category, status, created_at FROM requests WHERE ${where} ORDER BY created_at DESC, request_id DESC LIMIT $${filters.length + 3}`,
        [...filters.map(([, value]) => value), ...from(after), limit + 1],
      );
      const page = rows.slice(0, limit);
      const items = [];
      for (const r of page) {
        const [c] = await q<{ consumer_id: number; name: string }>('SELECT consumer_id, name FROM consumers WHERE consumer_id = $1', [r.consumer_id]);
        const [n] = await q<{ n: number }>('SELECT count(*)::integer AS n FROM quotes WHERE request_id = $1', [r.request_id]);
        items.push({ ...request(r), consumer: { consumerId: formatId('consumer', c!.consumer_id), name: c!.name }, quoteCount: n!.n });
      }
      const last = page.at(-1);
      const nextCursor = rows.length > limit && last ? encodeCursor('requests.list', scope, { sortKey: last.created_at, id: last.request_id }) : null;
      return JSON.stringify({ type: 'requests.list', items, nextCursor });
    },
    async consumerRequests(query) {
      const { page, nextCursor } = await consumerPage<RequestRow>(
        query,
        'consumer.requests',
        'SELECT request_id, consumer_id, title, category, status, created_at FROM requests WHERE consumer_id = $1 AND (created_at, request_id) < ($2, $3) ORDER BY created_at DESC, request_id DESC LIMIT $4',
        (r) => ({ sortKey: r.created_at, id: r.request_id }),
      );
      const items = [];
      for (const r of page) {
        const bookings = [];
        for (const b of await q<BookingRow>(
          'SELECT booking_id, request_id, provider_id, status, scheduled_at, price_cents FROM bookings WHERE request_id = $1 ORDER BY scheduled_at DESC, booking_id DESC',
          [r.request_id],
        )) {
          bookings.push({ ...(await booking(b)), provider: await provider(b.provider_id) });
        }
        items.push({ ...request(r), bookings });
      }
      return JSON.stringify({ type: 'consumer.requests', items, nextCursor });
    },
    async consumerBookings(query) {
      const { page, nextCursor } = await consumerPage<BookingRow>(
        query,
        'consumer.bookings',
        'SELECT booking_id, request_id, provider_id, status, scheduled_at, price_cents FROM bookings WHERE consumer_id = $1 AND (scheduled_at, booking_id) < ($2, $3) ORDER BY scheduled_at DESC, booking_id DESC LIMIT $4',
        (b) => ({ sortKey: b.scheduled_at, id: b.booking_id }),
      );
      const items = [];
      for (const b of page) {
        const [r] = await q<RequestRow>('SELECT request_id, title, category FROM requests WHERE request_id = $1', [b.request_id]);
        items.push({
          ...(await booking(b)),
          request: { requestId: formatId('request', r!.request_id), title: r!.title, category: r!.category },
          provider: await provider(b.provider_id),
        });
      }
      return JSON.stringify({ type: 'consumer.bookings', items, nextCursor });
    },
  };
}

/** The service's frames, as the transports build them: its items JSON spliced into the frame. */
function serviceFrames(service: MarketplaceService): FrameLookups {
  return {
    requestsList: async (q) => serializePage(await service.requestsListJson(staff, q), 'requests.list'),
    consumerRequests: async (q) => serializePage(await service.consumerRequestsJson(staff, q), 'consumer.requests'),
    consumerBookings: async (q) => serializePage(await service.consumerBookingsJson(staff, q), 'consumer.bookings'),
  };
}

interface Case {
  lookup: string;
  limit: number;
  run: (s: FrameLookups, i: number) => Promise<string>;
}

/** Every lookup at page sizes 20 and 100: each filter combination (first pages and one page deeper), and the consumers with more than 100 rows. */
async function casesOf(sql: Pg, service: MarketplaceService): Promise<Case[]> {
  const heavy = async (table: 'requests' | 'bookings') =>
    (await sql.unsafe(`SELECT consumer_id FROM ${table} GROUP BY consumer_id HAVING count(*) > 100 ORDER BY consumer_id LIMIT 64`)).map((r) =>
      formatId('consumer', r.consumer_id as number),
    );
  const [requestConsumers, bookingConsumers] = [await heavy('requests'), await heavy('bookings')];
  assert.ok(requestConsumers.length > 0 && bookingConsumers.length > 0, 'the data set has no consumer with more than 100 rows; seed more requests');
  const categories = (await sql`SELECT DISTINCT category FROM requests ORDER BY category`).map((r) => r.category as string);
  const filters: RequestsListQuery[] = [{}, { status: 'open' }, { status: 'booked' }, { status: 'closed' }];
  for (const category of categories) filters.push({ category }, { category, status: 'booked' }, { category, status: 'closed' });
  const cases: Case[] = [];
  for (const limit of [20, 100]) {
    const list: RequestsListQuery[] = [];
    for (const filter of filters) {
      list.push({ ...filter, limit });
      const deeper = await service.requestsList(staff, { ...filter, limit: 100 });
      if (deeper.nextCursor) list.push({ ...filter, limit, cursor: deeper.nextCursor });
    }
    cases.push(
      { lookup: 'requests.list', limit, run: (s, i) => s.requestsList(list[i % list.length]!) },
      { lookup: 'consumer.requests', limit, run: (s, i) => s.consumerRequests({ consumerId: requestConsumers[i % requestConsumers.length]!, limit }) },
      { lookup: 'consumer.bookings', limit, run: (s, i) => s.consumerBookings({ consumerId: bookingConsumers[i % bookingConsumers.length]!, limit }) },
    );
  }
  return cases;
}

type Result = LookupResult;

/** Calls per case spread over interleaved rounds, so that the noise of a shared machine hits every implementation alike. */
async function measure(c: Case, implementations: { name: string; service: FrameLookups }[], options: PgBenchOptions, queries: () => number): Promise<Result[]> {
  const quantile = (sorted: number[], q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
  const samples = new Map(implementations.map((impl) => [impl.name, { latencies: [] as number[], queries: 0, elapsedMs: 0 }]));
  for (const impl of implementations) for (let i = 0; i < 30; i++) await c.run(impl.service, i); // warm-up
  const perRound = Math.ceil(options.callsPerCase / options.rounds);
  for (let r = 0; r < options.rounds; r++) {
    for (const impl of implementations) {
      const s = samples.get(impl.name)!;
      const queriesBefore = queries();
      const roundStart = performance.now();
      for (let i = 0; i < perRound; i++) {
        const t0 = performance.now();
        await c.run(impl.service, r * perRound + i);
        s.latencies.push(performance.now() - t0);
      }
      s.elapsedMs += performance.now() - roundStart;
      s.queries += queries() - queriesBefore;
    }
  }
  return implementations.map((impl) => {
    const s = samples.get(impl.name)!;
    const sorted = s.latencies.sort((a, b) => a - b);
    return {
      lookup: c.lookup,
      limit: c.limit,
      impl: impl.name,
      queriesPerCall: round(s.queries / sorted.length, 2),
      p50Ms: round(quantile(sorted, 0.5), 3),
      p99Ms: round(quantile(sorted, 0.99), 3),
      callsPerSec: Math.round((sorted.length / s.elapsedMs) * 1000),
    };
  });
}

function report(results: Result[], header: string): void {
  const find = (r: Result, impl: string) => results.find((x) => x.lookup === r.lookup && x.limit === r.limit && x.impl === impl)!;
  const speedup = (r: Result) => ({ p50: round(find(r, 'n+1').p50Ms / r.p50Ms, 2), throughput: round(r.callsPerSec / find(r, 'n+1').callsPerSec, 2) });
  const batchedAt100 = results.filter((r) => r.impl === 'batched' && r.limit === 100);
  const targets = {
    batchedAtLeast20xFasterAt100: batchedAt100.every((r) => speedup(r).p50 >= 20),
    batchedP99Under5msAt100: batchedAt100.every((r) => r.p99Ms < 5),
  };
  process.stdout.write(`${header}\n\n${lookupTable(results, speedup)}`);
  process.stdout.write(
    `targets at page size 100: batched >= 20x n+1 (median latency): ${targets.batchedAtLeast20xFasterAt100 ? 'met' : 'MISSED'}; batched p99 < 5 ms: ${targets.batchedP99Under5msAt100 ? 'met' : 'MISSED'}\n`,
  );
  process.stdout.write(
    `${JSON.stringify({ bench: 'db', engine: 'postgres', results, speedups: batchedAt100.map((r) => ({ lookup: r.lookup, limit: 100, batchedVsNPlusOne: speedup(r) })), targets })}\n`,
  );
}

export async function benchDbPostgres(options: PgBenchOptions): Promise<void> {
  const sql = await openDatabase(options.url);
  await migratePg(sql);
  const [{ n: existing }] = await sql<[{ n: number }]>`SELECT count(*)::bigint AS n FROM requests`;
  let seedMs: number | null = null;
  if (existing === 0) {
    log(`seeding ${options.requests.toLocaleString('en-US')} requests into ${redactUrl(options.url)} ...`);
    const started = performance.now();
    await seedMarketplacePg(sql, {
      consumers: Math.max(1, Math.ceil(options.requests / 10)),
      providers: Math.max(1, Math.ceil(options.requests / 50)),
      requests: options.requests,
    });
    seedMs = Math.round(performance.now() - started);
    log(`seeded in ${(seedMs / 1000).toFixed(1)} s`);
  } else log(`using ${existing.toLocaleString('en-US')} requests already in ${redactUrl(options.url)}`);

  let queries = 0;
  const store = createPgMarketplaceStore(sql, { onQuery: () => queries++ });
  const batched = createMarketplaceService({ store });
  const unbatched = createMarketplaceService({ store, batching: false });
  const implementations = [
    { name: 'n+1', service: naiveFrames(sql, () => queries++) },
    { name: 'batched', service: serviceFrames(batched) },
    { name: 'unbatched', service: serviceFrames(unbatched) },
  ];
  const cases = await casesOf(sql, batched);
  // The baseline must return exactly what the service returns, or the comparison means nothing.
  for (const c of cases) {
    for (let i = 0; i < 8; i++) {
      const expected: unknown = JSON.parse(await c.run(implementations[0]!.service, i));
      for (const impl of implementations) assert.deepEqual(JSON.parse(await c.run(impl.service, i)), expected, `${impl.name} ${c.lookup} ${c.limit}`);
    }
  }
  const results: Result[] = [];
  for (const c of cases) {
    results.push(...(await measure(c, implementations, options, () => queries)));
    log(`measured ${c.lookup} limit ${c.limit}`);
  }
  const [{ version }] = await sql<[{ version: string }]>`SELECT current_setting('server_version') AS version`;
  const loadAverage = os.loadavg().map((l) => round(l, 2));
  report(
    results,
    `chatwire bench:db on PostgreSQL ${version} over loopback, ${(existing || options.requests).toLocaleString('en-US')} requests${seedMs === null ? '' : ` (seeded in ${(seedMs / 1000).toFixed(1)} s)`}, node ${process.version}, ${os.cpus().length} cpus, load average ${loadAverage.join(' ')}, ${options.callsPerCase} calls per case`,
  );
  batched.close();
  unbatched.close();
  await sql.end({ timeout: 5 });
}
