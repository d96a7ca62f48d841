/**
 * Marketplace lookups in-process: the batched service next to a naive N+1
 * implementation (one query per row per relation, the way an ORM-naive
 * service does it), measured side by side in one run.
 *
 * Every implementation is measured to the same end point: the reply frame a
 * transport sends (its JSON text). The N+1 baseline builds the page's objects
 * and JSON.stringify's the frame, as a service written naturally does; the
 * service's items come out of SQLite as JSON text already and are spliced into
 * the frame (serializePage, as the transports do). Before timing, every
 * implementation's frames are checked to parse to the same value.
 *
 * Usage: npm run bench:db -- [--requests N] [--data-dir <dir> | --database-url <postgres://...>] [--calls N] [--rounds N]
 *   --requests   size of the data set (default 1,000,000; consumers N/10, providers N/50)
 *   --data-dir   use this data dir (seeded with --requests if it holds no marketplace rows);
 *                default: a temp dir per size, kept between runs so the seed is paid once
 *   --database-url  PostgreSQL instead (else CHATWIRE_DATABASE_URL when set): see bench-db-pg.ts
 *   --calls      calls per case (default 2000), spread over --rounds interleaved rounds (default 5)
 *
 * Prints a table, then one JSON line. The concurrent-WebSocket half of this
 * benchmark (batching on/off under 1000 clients) needs the server and lives with it.
 */
import assert from 'node:assert/strict';
import os from 'node:os';
import path from 'node:path';
import type { Identity } from '../src/auth/identity.js';
import { decodeCursor, encodeCursor } from '../src/marketplace/cursor.js';
import type { KeysetPosition } from '../src/db/marketplace-store.js';
import { createSqliteMarketplaceStore } from '../src/db/marketplace-queries.js';
import WebSocket from 'ws';
import { connect, type ChatwireClient } from '../src/client/client.js';
import { databaseFile } from '../src/db/data-file.js';
import { Database, type CountedStatement } from '../src/db/database.js';
import { createMarketplaceService, DEFAULT_PAGE_LIMIT, type MarketplaceService } from '../src/marketplace/marketplace-service.js';
import { formatId, isoTime, parseId } from '../src/db/marketplace-ids.js';
import { seedMarketplace } from '../src/db/marketplace-seed.js';
import { migrate } from '../src/db/migrate.js';
import { DIST, lookupTable, sleep, startChild, summarize } from './bench-support.js';
import { benchDbPostgres } from './bench-db-pg.js';
import { databaseUrlOf, fail, parseCommandLine } from './command-line.js';
import {
  AppError,
  type ConsumerBookingItem,
  type ConsumerPageQuery,
  type ConsumerRequestItem,
  type Page,
  type RequestItem,
  type RequestsListQuery,
  serializePage,
} from '../src/protocol/index.js';

const usage =
  'usage: npm run bench:db -- [--requests N] [--data-dir <dir> | --database-url <postgres://...>] [--calls N] [--rounds N] [--ws-clients N (0 skips)] [--ws-seconds N]';
const values = parseCommandLine(usage, {
  requests: { type: 'string', default: '1000000' },
  'data-dir': { type: 'string' },
  calls: { type: 'string', default: '2000' },
  rounds: { type: 'string', default: '5' },
  'ws-clients': { type: 'string', default: '1000' },
  'ws-seconds': { type: 'string', default: '8' },
  'database-url': { type: 'string' },
});
const positive = (name: string, raw: string): number => {
  const n = Number(raw.replaceAll('_', ''));
  if (!Number.isSafeInteger(n) || n < 1) fail(`--${name} must be a positive integer\n${usage}`);
  return n;
};
const requestCount = positive('requests', values.requests);
const callsPerCase = positive('calls', values.calls);
const rounds = positive('rounds', values.rounds);
const wsClients = Number(values['ws-clients']);
const wsSeconds = positive('ws-seconds', values['ws-seconds']);
const log = (line: string) => process.stderr.write(`${line}\n`);

const databaseUrl = values['data-dir'] === undefined ? databaseUrlOf(values['database-url']) : undefined;
if (databaseUrl !== undefined) {
  // The WebSocket half needs a server in cluster mode, which this bench does not start.
  await benchDbPostgres({ url: databaseUrl, requests: requestCount, callsPerCase, rounds });
  process.exit(0);
}

// ---------- data ----------

const dataDir = values['data-dir'] ?? path.join(os.tmpdir(), `chatwire-bench-db-${requestCount}`);
let queries = 0;
const db = new Database(databaseFile(dataDir), { onQuery: () => queries++ });
migrate(db);
const existing = db.raw.prepare('SELECT count(*) FROM requests').pluck().get() as number;
let seedMs: number | null = null;
if (existing === 0) {
  log(`seeding ${requestCount.toLocaleString('en-US')} requests into ${dataDir} ...`);
  const started = performance.now();
  seedMarketplace(db, {
    consumers: Math.max(1, Math.ceil(requestCount / 10)),
    providers: Math.max(1, Math.ceil(requestCount / 50)),
    requests: requestCount,
  });
  seedMs = Math.round(performance.now() - started);
  db.raw.pragma('wal_checkpoint(TRUNCATE)');
  log(`seeded in ${(seedMs / 1000).toFixed(1)} s`);
} else {
  log(`using ${existing.toLocaleString('en-US')} requests already in ${dataDir}`);
}
const datasetRequests = existing || requestCount;

// ---------- the naive N+1 baseline ----------

/**
 * What an ORM-naive service does: the page, then one query per row for each
 * relation (and one per booking for its provider). Same SQL shapes, indexes,
 * cursors and wire format as the real service, so only the query pattern
 * differs; the statements run synchronously, which is the kindest case for it.
 */
function createNaiveService(database: Database) {
  const consumerById = database.prepare<{ consumer_id: number; name: string }>(
    'naive.consumer',
    'SELECT consumer_id, name FROM consumers WHERE consumer_id = ?',
  );
  const quoteCount = database.prepare<{ n: number }>('naive.quote_count', 'SELECT count(*) AS n FROM quotes WHERE request_id = ?');
  const providerById = database.prepare<{ provider_id: number; name: string; rating: number }>(
    'naive.provider',
    'SELECT provider_id, name, rating FROM providers WHERE provider_id = ?',
  );
  const requestById = database.prepare<{ request_id: number; title: string; category: string }>(
    'naive.request',
    'SELECT request_id, title, category FROM requests WHERE request_id = ?',
  );
  const bookingsOfRequest = database.prepare<BookingRow>(
    'naive.bookings_of_request',
    'SELECT booking_id, provider_id, status, scheduled_at, price_cents FROM bookings WHERE request_id = ? ORDER BY scheduled_at DESC, booking_id DESC',
  );
  type RequestRow = { request_id: number; consumer_id: number; title: string; category: string; status: RequestItem['status']; created_at: number };
  type BookingRow = {
    booking_id: number;
    request_id: number;
    provider_id: number;
    status: ConsumerBookingItem['status'];
    scheduled_at: number;
    price_cents: number;
  };
  const requestPages = new Map<string, ReturnType<typeof database.prepare<RequestRow>>>();
  const requestPage = (status: boolean, category: boolean) => {
    const key = `${status}/${category}`;
    let stmt = requestPages.get(key);
    if (!stmt) {
      const where = [category ? 'category = ?' : null, status ? 'status = ?' : null, '(created_at, request_id) < (?, ?)'].filter(Boolean).join(' AND ');
      stmt = database.prepare<RequestRow>(
        'naive.requests_page',
        `SELECT request_id, consumer_id, title, category, status, created_at FROM requests WHERE ${where} ORDER BY created_at DESC, request_id DESC LIMIT ?`,
      );
      requestPages.set(key, stmt);
    }
    return stmt;
  };
  const consumerRequestsPage = database.prepare<RequestRow>(
    'naive.consumer_requests_page',
    'SELECT request_id, consumer_id, title, category, status, created_at FROM requests WHERE consumer_id = ? AND (created_at, request_id) < (?, ?) ORDER BY created_at DESC, request_id DESC LIMIT ?',
  );
  const consumerBookingsPage = database.prepare<BookingRow>(
    'naive.consumer_bookings_page',
    'SELECT booking_id, request_id, provider_id, status, scheduled_at, price_cents FROM bookings WHERE consumer_id = ? AND (scheduled_at, booking_id) < (?, ?) ORDER BY scheduled_at DESC, booking_id DESC LIMIT ?',
  );
  /** The fields every request item has, in both request lookups. */
  const requestFields = (r: RequestRow) => ({
    requestId: formatId('request', r.request_id),
    consumerId: formatId('consumer', r.consumer_id),
    title: r.title,
    category: r.category,
    status: r.status,
    createdAt: isoTime(r.created_at),
  });
  const from = (after: KeysetPosition | null) => (after ? [after.sortKey, after.id] : [Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER]);
  const provider = (id: number) => {
    const p = providerById.get(id)!;
    return { providerId: formatId('provider', p.provider_id), name: p.name, rating: p.rating };
  };
  const consumerKey = (caller: Identity, consumerId: string) => {
    if (caller.role !== 'staff' && caller.userId !== consumerId) throw new AppError('forbidden', 'forbidden');
    const key = parseId('consumer', consumerId);
    if (key === null || !consumerById.get(key)) throw new AppError('not_found', 'no such consumer');
    return key;
  };
  /** The first `limit` of `limit + 1` rows, and the cursor after them if the extra row came back. */
  const paged = <Row>(rows: Row[], limit: number, cursorAfter: (last: Row) => string) => {
    const page = rows.slice(0, limit);
    const last = page.at(-1);
    return { page, nextCursor: rows.length > limit && last ? cursorAfter(last) : null };
  };
  /** One page of a consumer's rows, after the caller's check. */
  const consumerPage = <Row>(
    caller: Identity,
    q: ConsumerPageQuery,
    kind: 'consumer.requests' | 'consumer.bookings',
    stmt: CountedStatement<Row>,
    position: (last: Row) => KeysetPosition,
  ) => {
    const consumerId = consumerKey(caller, q.consumerId);
    const limit = q.limit ?? DEFAULT_PAGE_LIMIT;
    const after = q.cursor ? decodeCursor(q.cursor, kind, q.consumerId) : null;
    return paged(stmt.all(consumerId, ...from(after), limit + 1), limit, (last) => encodeCursor(kind, q.consumerId, position(last)));
  };

  return {
    async requestsList(_caller: Identity, q: RequestsListQuery): Promise<Page<RequestItem>> {
      const limit = q.limit ?? DEFAULT_PAGE_LIMIT;
      const scope = JSON.stringify([q.status ?? null, q.category ?? null]);
      const after = q.cursor ? decodeCursor(q.cursor, 'requests.list', scope) : null;
      const params = [...(q.category !== undefined ? [q.category] : []), ...(q.status !== undefined ? [q.status] : [])];
      const { page, nextCursor } = paged(
        requestPage(q.status !== undefined, q.category !== undefined).all(...params, ...from(after), limit + 1),
        limit,
        (last) => encodeCursor('requests.list', scope, { sortKey: last.created_at, id: last.request_id }),
      );
      return {
        items: page.map((r) => {
          const c = consumerById.get(r.consumer_id)!;
          return {
            ...requestFields(r),
            consumer: { consumerId: formatId('consumer', c.consumer_id), name: c.name },
            quoteCount: quoteCount.get(r.request_id)!.n,
          };
        }),
        nextCursor,
      };
    },
    async consumerRequests(caller: Identity, q: ConsumerPageQuery): Promise<Page<ConsumerRequestItem>> {
      const { page, nextCursor } = consumerPage(caller, q, 'consumer.requests', consumerRequestsPage, (last) => ({
        sortKey: last.created_at,
        id: last.request_id,
      }));
      return {
        items: page.map((r) => ({
          ...requestFields(r),
          bookings: bookingsOfRequest.all(r.request_id).map((b) => ({
            bookingId: formatId('booking', b.booking_id),
            status: b.status,
            scheduledAt: isoTime(b.scheduled_at),
            priceCents: b.price_cents,
            provider: provider(b.provider_id),
          })),
        })),
        nextCursor,
      };
    },
    async consumerBookings(caller: Identity, q: ConsumerPageQuery): Promise<Page<ConsumerBookingItem>> {
      const { page, nextCursor } = consumerPage(caller, q, 'consumer.bookings', consumerBookingsPage, (last) => ({
        sortKey: last.scheduled_at,
        id: last.booking_id,
      }));
      return {
        items: page.map((b) => {
          const r = requestById.get(b.request_id)!;
          return {
            bookingId: formatId('booking', b.booking_id),
            status: b.status,
            scheduledAt: isoTime(b.scheduled_at),
            priceCents: b.price_cents,
            request: { requestId: formatId('request', r.request_id), title: r.title, category: r.category },
            provider: provider(b.provider_id),
          };
        }),
        nextCursor,
      };
    },
  };
}

// ---------- workload ----------

const staff: Identity = { userId: 'bench', role: 'staff' };
type LookupName = 'requests.list' | 'consumer.requests' | 'consumer.bookings';

/** The three lookups, each to the JSON text of its reply frame. */
interface FrameLookups {
  requestsList(q: RequestsListQuery): Promise<string>;
  consumerRequests(q: ConsumerPageQuery): Promise<string>;
  consumerBookings(q: ConsumerPageQuery): Promise<string>;
}

/** The N+1 baseline's frames: its page objects, then JSON.stringify. */
function naiveFrames(naive: ReturnType<typeof createNaiveService>): FrameLookups {
  return {
    requestsList: async (q) => JSON.stringify({ type: 'requests.list', ...(await naive.requestsList(staff, q)) }),
    consumerRequests: async (q) => JSON.stringify({ type: 'consumer.requests', ...(await naive.consumerRequests(staff, q)) }),
    consumerBookings: async (q) => JSON.stringify({ type: 'consumer.bookings', ...(await naive.consumerBookings(staff, q)) }),
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

// Consumers with at least 100 rows, so that page size 100 means 100 items.
const heavyConsumers = (table: 'requests' | 'bookings') =>
  (db.raw.prepare(`SELECT consumer_id FROM ${table} GROUP BY consumer_id HAVING count(*) > 100 ORDER BY consumer_id LIMIT 64`).pluck().all() as number[]).map(
    (id) => formatId('consumer', id),
  );
const requestConsumers = heavyConsumers('requests');
const bookingConsumers = heavyConsumers('bookings');
assert.ok(requestConsumers.length > 0 && bookingConsumers.length > 0, 'the data set has no consumer with more than 100 rows; seed more requests');
const categories = db.raw.prepare('SELECT DISTINCT category FROM requests ORDER BY category').pluck().all() as string[];

const realService = createMarketplaceService({ store: createSqliteMarketplaceStore(db) });
/** First pages and pages a few steps deep, for every filter combination. */
async function listQueries(limit: number): Promise<RequestsListQuery[]> {
  const filters: RequestsListQuery[] = [{}, { status: 'open' }, { status: 'booked' }, { status: 'closed' }];
  for (const category of categories) filters.push({ category }, { category, status: 'booked' }, { category, status: 'closed' });
  const out: RequestsListQuery[] = [];
  for (const filter of filters) {
    out.push({ ...filter, limit });
    const deeper = await realService.requestsList(staff, { ...filter, limit: 100 });
    if (deeper.nextCursor) out.push({ ...filter, limit, cursor: deeper.nextCursor });
  }
  return out;
}
function consumerQueries(consumers: string[], limit: number): ConsumerPageQuery[] {
  return consumers.map((consumerId) => ({ consumerId, limit }));
}

interface Case {
  lookup: LookupName;
  limit: number;
  run: (s: FrameLookups, i: number) => Promise<string>;
}
const cases: Case[] = [];
for (const limit of [20, 100]) {
  const list = await listQueries(limit);
  const cr = consumerQueries(requestConsumers, limit);
  const cb = consumerQueries(bookingConsumers, limit);
  cases.push(
    { lookup: 'requests.list', limit, run: (s, i) => s.requestsList(list[i % list.length]!) },
    { lookup: 'consumer.requests', limit, run: (s, i) => s.consumerRequests(cr[i % cr.length]!) },
    { lookup: 'consumer.bookings', limit, run: (s, i) => s.consumerBookings(cb[i % cb.length]!) },
  );
}

const services = [
  realService,
  createMarketplaceService({ store: createSqliteMarketplaceStore(db, { inList: 'json' }) }),
  createMarketplaceService({ store: createSqliteMarketplaceStore(db), batching: false }),
] as const;
const implementations: { name: string; service: FrameLookups }[] = [
  { name: 'n+1', service: naiveFrames(createNaiveService(db)) },
  { name: 'batched', service: serviceFrames(services[0]) },
  { name: 'batched json-ids', service: serviceFrames(services[1]) },
  { name: 'unbatched', service: serviceFrames(services[2]) },
];

// The baseline must return exactly what the service returns, or the comparison means nothing:
// every frame parses to the same value (the text may differ, e.g. SQLite writes a rating of 5 as 5.0).
for (const c of cases) {
  for (let i = 0; i < 8; i++) {
    const expected: unknown = JSON.parse(await c.run(implementations[0]!.service, i));
    for (const impl of implementations) assert.deepEqual(JSON.parse(await c.run(impl.service, i)), expected, `${impl.name} ${c.lookup} ${c.limit}`);
  }
}

// ---------- measurement ----------

interface Result {
  lookup: LookupName;
  limit: number;
  impl: string;
  queriesPerCall: number;
  p50Ms: number;
  p99Ms: number;
  callsPerSec: number;
}
const quantile = (sorted: number[], q: number) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]!;
const round = (n: number, digits: number) => Math.round(n * 10 ** digits) / 10 ** digits;

const results: Result[] = [];
for (const c of cases) {
  const samples = new Map(implementations.map((impl) => [impl.name, { latencies: [] as number[], queries: 0, elapsedMs: 0 }]));
  for (const impl of implementations) for (let i = 0; i < 50; i++) await c.run(impl.service, i); // warm-up
  // Rounds interleave the implementations so that noise from a shared machine hits them alike.
  const perRound = Math.ceil(callsPerCase / rounds);
  for (let r = 0; r < rounds; r++) {
    for (const impl of implementations) {
      const s = samples.get(impl.name)!;
      const queriesBefore = queries;
      const roundStart = performance.now();
      for (let i = 0; i < perRound; i++) {
        const t0 = performance.now();
        await c.run(impl.service, r * perRound + i);
        s.latencies.push(performance.now() - t0);
      }
      s.elapsedMs += performance.now() - roundStart;
      s.queries += queries - queriesBefore;
    }
  }
  for (const impl of implementations) {
    const s = samples.get(impl.name)!;
    const sorted = s.latencies.sort((a, b) => a - b);
    results.push({
      lookup: c.lookup,
      limit: c.limit,
      impl: impl.name,
      queriesPerCall: round(s.queries / sorted.length, 2),
      p50Ms: round(quantile(sorted, 0.5), 3),
      p99Ms: round(quantile(sorted, 0.99), 3),
      callsPerSec: Math.round((sorted.length / s.elapsedMs) * 1000),
    });
  }
  log(`measured ${c.lookup} limit ${c.limit}`);
}

// ---------- report ----------

const find = (lookup: string, limit: number, impl: string) => results.find((r) => r.lookup === lookup && r.limit === limit && r.impl === impl)!;
// Speed-up by median latency (robust to the stalls of a shared machine) and by throughput (which includes them).
const speedup = (r: Result) => {
  const base = find(r.lookup, r.limit, 'n+1');
  return { p50: round(base.p50Ms / r.p50Ms, 2), throughput: round(r.callsPerSec / base.callsPerSec, 2) };
};
const speedups = cases.map((c) => ({
  lookup: c.lookup,
  limit: c.limit,
  batchedVsNPlusOne: speedup(find(c.lookup, c.limit, 'batched')),
  jsonIdsVsParams: round(find(c.lookup, c.limit, 'batched').p50Ms / find(c.lookup, c.limit, 'batched json-ids').p50Ms, 2),
}));
const at100 = speedups.filter((s) => s.limit === 100);
const targets = {
  batchedAtLeast5xFasterAt100: at100.every((s) => s.batchedVsNPlusOne.p50 >= 5),
  batchedP99Under2msAt100: at100.every((s) => find(s.lookup, 100, 'batched').p99Ms < 2),
};

// The load average says how much of the machine the run had: the p99 column is mostly other processes' doing when it is high.
const loadAverage = os.loadavg().map((l) => round(l, 2));
process.stdout.write(
  `chatwire bench:db, ${datasetRequests.toLocaleString('en-US')} requests, node ${process.version}, ${os.cpus().length} cpus, load average ${loadAverage.join(' ')}, ${callsPerCase} calls per case\n\n`,
);
process.stdout.write(lookupTable(results, speedup));
process.stdout.write(
  `targets at page size 100: batched >= 5x n+1 (median latency): ${targets.batchedAtLeast5xFasterAt100 ? 'met' : 'MISSED'}; batched p99 < 2 ms: ${targets.batchedP99Under2msAt100 ? 'met' : 'MISSED'}\n`,
);
for (const service of services) service.close();
db.close();

// ---------- over WebSocket: 1000 concurrent clients, cross-connection batcher on and off ----------

interface WsResult {
  batching: boolean;
  clients: number;
  lookupsPerSec: number;
  p50Ms: number;
  p99Ms: number;
  queriesPerLookup: number;
  errors: number;
}

async function runOverWebSocket(batching: boolean): Promise<WsResult> {
  const server = await startChild(path.join(DIST, 'src', 'main.js'), {
    PORT: '0',
    HOST: '127.0.0.1',
    CHATWIRE_DATA_DIR: dataDir,
    CHATWIRE_DB_BATCHING: String(batching),
    CHATWIRE_MESSAGES_PER_SECOND: '1000000',
    CHATWIRE_MAX_CONNECTIONS_PER_USER: '100000',
    LOG_LEVEL: 'info',
  });
  try {
    const clients: ChatwireClient[] = [];
    const latencies: number[] = [];
    let measuring = false;
    let running = true;
    let done = 0;
    let errors = 0;
    const loops: Promise<void>[] = [];
    // Each client is a consumer reading its own requests, or anyone reading the open list, one lookup after another.
    const lookUp = async (client: ChatwireClient, n: number, consumerId: string): Promise<void> => {
      while (running && client.state !== 'closed') {
        const sentAt = performance.now();
        try {
          await (n % 2 === 0
            ? client.request({ type: 'requests.list', status: 'open', limit: 20 })
            : client.request({ type: 'consumer.requests', consumerId, limit: 20 }));
        } catch {
          if (!running) return;
          errors++;
        }
        if (measuring) {
          latencies.push(performance.now() - sentAt);
          done++;
        }
      }
    };
    for (let i = 0; i < wsClients; i += 100) {
      await Promise.all(
        Array.from({ length: Math.min(100, wsClients - i) }, async (_, k) => {
          const n = i + k;
          const consumerId = requestConsumers[n % requestConsumers.length] as string;
          const client = connect(`ws://127.0.0.1:${server.port}/ws`, { user: consumerId, WebSocket, reconnect: false, heartbeatMs: 0 });
          await client.ready();
          clients.push(client);
          loops.push(lookUp(client, n, consumerId));
        }),
      );
    }
    await sleep(2000);
    const q0 = await scrapeSum(server.port, 'chatwire_db_queries_total', (l) => !l.includes('op="chat.'));
    measuring = true;
    const t0 = performance.now();
    await sleep(wsSeconds * 1000);
    measuring = false;
    const seconds = (performance.now() - t0) / 1000;
    const q1 = await scrapeSum(server.port, 'chatwire_db_queries_total', (l) => !l.includes('op="chat.'));
    running = false;
    for (const client of clients) client.close();
    await Promise.all(loops);
    const s = summarize(latencies);
    return {
      batching,
      clients: wsClients,
      lookupsPerSec: Math.round(done / seconds),
      p50Ms: round(s.p50, 3),
      p99Ms: round(s.p99, 3),
      queriesPerLookup: round((q1 - q0) / Math.max(1, done), 3),
      errors,
    };
  } finally {
    await server.stop();
  }
}

/** Sums every sample of a counter whose line passes `keep` (e.g. all `op` labels but the chat ones). */
async function scrapeSum(port: number, metric: string, keep: (line: string) => boolean): Promise<number> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  return text
    .split('\n')
    .filter((l) => l.startsWith(metric + '{') && keep(l))
    .reduce((sum, l) => sum + Number(l.split(' ').at(-1)), 0);
}

const websocket: WsResult[] = [];
if (wsClients > 0) {
  for (const batching of [true, false]) {
    log(`over WebSocket: ${wsClients} clients, batching ${batching ? 'on' : 'off'} ...`);
    websocket.push(await runOverWebSocket(batching));
  }
  process.stdout.write(
    `\nlookups over ${wsClients} concurrent WebSocket clients (half requests.list, half consumer.requests, page size 20), ${wsSeconds} s each\n`,
  );
  for (const r of websocket) {
    process.stdout.write(
      `  batching ${r.batching ? 'on ' : 'off'}: ${r.lookupsPerSec} lookups/s, p50 ${r.p50Ms.toFixed(2)} ms, p99 ${r.p99Ms.toFixed(2)} ms, ${r.queriesPerLookup.toFixed(3)} queries/lookup, ${r.errors} errors\n`,
    );
  }
}
process.stdout.write(
  `${JSON.stringify({ bench: 'db', requests: datasetRequests, seedMs, node: process.version, cpus: os.cpus().length, loadAverage, callsPerCase, results, speedups, targets, websocket })}\n`,
);
process.exit(0);
