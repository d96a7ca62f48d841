/**
 * A seeded marketplace database on a temp dir for the marketplace tests, and
 * the naive reference implementation the lookups are checked against.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Database, type OpenDatabaseOptions } from '../../src/db/database.js';
import { createSqliteMarketplaceStore, type InListStrategy } from '../../src/db/marketplace-queries.js';
import { SEED_COLUMNS, seedMarketplace } from '../../src/db/marketplace-seed.js';
import type { MarketplaceStore } from '../../src/db/marketplace-store.js';
import { migrate } from '../../src/db/migrate.js';
import { openPostgres, type Pg } from '../../src/db/pg.js';
import { createPgMarketplaceStore } from '../../src/db/pg-marketplace-store.js';
import { MARKETPLACE_TABLES, pgBulkInsert, pgSyncIdentities } from '../../src/db/pg-marketplace-seed.js';
import { migratePg } from '../../src/db/pg-migrate.js';
import type { ConsumerBookingItem, ConsumerRequestItem, RequestItem } from '../../src/protocol/index.js';
import { createTestDatabase, databaseUrl, dropTestDatabase, pgTestOptions } from '../helpers/postgres.js';

export interface Fixture {
  dir: string;
  db: Database;
  /** Every operation the database ran since the last reset, in order. */
  ops: string[];
  close(): void;
}

/** Test seed: few consumers (so some own hundreds of rows) and a block of deliberate ties. */
export const FIXTURE = {
  consumers: 6,
  providers: 1000,
  requests: 3000,
  seed: 7,
  /** The first of 1000 consumers with no requests and no bookings. */
  emptyConsumerId: 7,
  /** Requests 3001..3040 (consumers 1 and 2) share created_at, their bookings share scheduled_at; request 3002 has three bookings in one slot. */
  tieRequests: 40,
} as const;

export function openFixture(t: { after(fn: () => void): void }, options: { DatabaseClass?: typeof Database } & OpenDatabaseOptions = {}): Fixture {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-marketplace-'));
  const ops: string[] = [];
  const DatabaseClass = options.DatabaseClass ?? Database;
  const db = new DatabaseClass(path.join(dir, 'chatwire.sqlite'), { onQuery: (op) => ops.push(op) });
  migrate(db);
  seedMarketplace(db, { consumers: FIXTURE.consumers, providers: FIXTURE.providers, requests: FIXTURE.requests, seed: FIXTURE.seed });
  addTies(db);
  // Registered consumers who never posted: the empty-page path, and table sizes with production-like
  // proportions, so that the query planner's choices after ANALYZE are the ones production gets.
  const insertConsumer = db.raw.prepare('INSERT INTO consumers (consumer_id, name) VALUES (?, ?)');
  db.transaction(() => {
    for (let id = FIXTURE.emptyConsumerId; id < FIXTURE.emptyConsumerId + 1000; id++) insertConsumer.run(id, `Newcomer ${id}`);
  });
  ops.length = 0;
  const fixture: Fixture = {
    dir,
    db,
    ops,
    close() {
      db.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  t.after(() => fixture.close());
  return fixture;
}

function addTies(db: Database): void {
  const createdAt = (db.raw.prepare('SELECT created_at FROM requests WHERE request_id = 1500').pluck().get() as number) ?? 0;
  const scheduledAt = createdAt + 3 * 86_400_000;
  const insertRequest = db.raw.prepare(
    "INSERT INTO requests (request_id, consumer_id, title, category, status, created_at) VALUES (?, ?, ?, 'plumbing', ?, ?)",
  );
  const insertBooking = db.raw.prepare(
    'INSERT INTO bookings (request_id, consumer_id, provider_id, status, scheduled_at, price_cents) VALUES (?, ?, ?, ?, ?, ?)',
  );
  const statuses = ['open', 'booked', 'closed'] as const;
  db.transaction(() => {
    for (let i = 0; i < FIXTURE.tieRequests; i++) {
      const requestId = FIXTURE.requests + 1 + i;
      const consumerId = 1 + (i % 2);
      const status = statuses[i % 3]!;
      insertRequest.run(requestId, consumerId, `Tied request ${i}`, status, createdAt);
      if (status === 'booked') insertBooking.run(requestId, consumerId, 1 + (i % FIXTURE.providers), 'confirmed', scheduledAt, 10_000 + i);
    }
    // Nested ties too: one request booked three times in the same slot (two cancelled).
    const tied = FIXTURE.requests + 2;
    insertBooking.run(tied, 2, 5, 'cancelled', scheduledAt, 9_000);
    insertBooking.run(tied, 2, 6, 'cancelled', scheduledAt, 9_500);
  });
}

// ---------- the naive reference: read every table whole, filter and sort in JS ----------

const wireId = (prefix: string, n: number) => `${prefix}_${String(n).padStart(10, '0')}`;
const iso = (ms: number) => new Date(ms).toISOString();

export interface Tables {
  consumers: { consumer_id: number; name: string }[];
  providers: { provider_id: number; name: string; rating: number }[];
  requests: { request_id: number; consumer_id: number; title: string; category: string; status: RequestItem['status']; created_at: number }[];
  quotes: { request_id: number; provider_id: number }[];
  bookings: {
    booking_id: number;
    request_id: number;
    consumer_id: number;
    provider_id: number;
    status: ConsumerBookingItem['status'];
    scheduled_at: number;
    price_cents: number;
  }[];
}

export function readTables(db: Database): Tables {
  const all = (table: string) => db.raw.prepare(`SELECT * FROM ${table}`).all();
  return {
    consumers: all('consumers') as Tables['consumers'],
    providers: all('providers') as Tables['providers'],
    requests: all('requests') as Tables['requests'],
    quotes: all('quotes') as Tables['quotes'],
    bookings: all('bookings') as Tables['bookings'],
  };
}

const newestRequestFirst = (a: Tables['requests'][number], b: Tables['requests'][number]) => b.created_at - a.created_at || b.request_id - a.request_id;
const newestBookingFirst = (a: Tables['bookings'][number], b: Tables['bookings'][number]) => b.scheduled_at - a.scheduled_at || b.booking_id - a.booking_id;

function providerRef(tables: Tables, providerId: number) {
  const p = tables.providers.find((x) => x.provider_id === providerId)!;
  return { providerId: wireId('p', p.provider_id), name: p.name, rating: p.rating };
}

/** What every request item carries, in whichever lookup. */
const requestFields = (r: Tables['requests'][number]) => ({
  requestId: wireId('r', r.request_id),
  consumerId: wireId('c', r.consumer_id),
  title: r.title,
  category: r.category,
  status: r.status,
  createdAt: iso(r.created_at),
});

/** What every booking item carries, in whichever lookup. */
const bookingFields = (tables: Tables, b: Tables['bookings'][number]) => ({
  bookingId: wireId('b', b.booking_id),
  status: b.status,
  scheduledAt: iso(b.scheduled_at),
  priceCents: b.price_cents,
  provider: providerRef(tables, b.provider_id),
});

export function referenceRequestsList(tables: Tables, filter: { status?: string; category?: string }): RequestItem[] {
  return tables.requests
    .filter((r) => (filter.status === undefined || r.status === filter.status) && (filter.category === undefined || r.category === filter.category))
    .sort(newestRequestFirst)
    .map((r) => ({
      ...requestFields(r),
      consumer: { consumerId: wireId('c', r.consumer_id), name: tables.consumers.find((c) => c.consumer_id === r.consumer_id)!.name },
      quoteCount: tables.quotes.filter((q) => q.request_id === r.request_id).length,
    }));
}

export function referenceConsumerRequests(tables: Tables, consumerId: number): ConsumerRequestItem[] {
  return tables.requests
    .filter((r) => r.consumer_id === consumerId)
    .sort(newestRequestFirst)
    .map((r) => ({
      ...requestFields(r),
      bookings: tables.bookings
        .filter((b) => b.request_id === r.request_id)
        .sort(newestBookingFirst)
        .map((b) => bookingFields(tables, b)),
    }));
}

export function referenceConsumerBookings(tables: Tables, consumerId: number): ConsumerBookingItem[] {
  return tables.bookings
    .filter((b) => b.consumer_id === consumerId)
    .sort(newestBookingFirst)
    .map((b) => {
      const r = tables.requests.find((x) => x.request_id === b.request_id)!;
      return { ...bookingFields(tables, b), request: { requestId: wireId('r', r.request_id), title: r.title, category: r.category } };
    });
}

export { wireId };

// ---------- the same fixture behind either store ----------

export type Engine = 'sqlite' | 'postgres';
export const ENGINES: readonly Engine[] = ['sqlite', 'postgres'];

/**
 * The queries a non-empty consumer.requests page runs after its page query: SQLite reads the page's bookings
 * with a second query (merged across the lookups of a turn), PostgreSQL's page query brings them along.
 */
export const PAGE_BOOKINGS_OPS: Readonly<Record<Engine, readonly string[]>> = { sqlite: ['bookings.by_request'], postgres: [] };

/** Test options per engine: PostgreSQL's tests skip with a message where no server answers (and CI is not set). */
export async function engineOptions(engine: Engine): Promise<{ skip?: string }> {
  return engine === 'postgres' ? pgTestOptions() : {};
}

export interface StoreFixture {
  engine: Engine;
  store: MarketplaceStore;
  /** Every query the store ran since the last reset, by op name, in order. */
  ops: string[];
  /** The fixture's rows, for the reference implementation. */
  tables: Tables;
  /** Adds requests of consumer 1 (id chosen by the database). */
  insertRequests(rows: { title: string; category: string; status: string; createdAt: number }[]): Promise<void>;
  /** The PostgreSQL pool of a postgres fixture. */
  pg?: Pg;
}

interface Closable {
  after(fn: () => void | Promise<void>): void;
}

/** The fixture's rows are the SQLite fixture's, copied once per process into a template database. */
let pgTemplate: Promise<{ name: string; tables: Tables }> | null = null;

function buildPgTemplate(): Promise<{ name: string; tables: Tables }> {
  pgTemplate ??= (async () => {
    const closers: (() => void)[] = [];
    const source = openFixture({ after: (fn) => void closers.push(fn) });
    const tables = readTables(source.db);
    const name = await createTestDatabase();
    const sql = openPostgres(databaseUrl(name), { max: 1 });
    try {
      await migratePg(sql);
      for (const table of MARKETPLACE_TABLES) {
        const columns = table === 'quotes' ? ['quote_id', ...SEED_COLUMNS.quotes] : [...SEED_COLUMNS[table]];
        const rows = (tables[table] as Record<string, unknown>[]).map((row) => columns.map((c) => row[c]));
        await pgBulkInsert(sql, table, columns, rows);
      }
      await pgSyncIdentities(sql);
      await sql.unsafe(`VACUUM ANALYZE ${MARKETPLACE_TABLES.join(', ')}`);
    } finally {
      await sql.end({ timeout: 5 });
      for (const close of closers) close();
    }
    return { name, tables };
  })();
  return pgTemplate;
}

/** The seeded marketplace (openFixture's rows) behind the given engine's store, in a database of its own. */
export async function openStoreFixture(t: Closable, engine: Engine, options: { inList?: InListStrategy } = {}): Promise<StoreFixture> {
  if (engine === 'sqlite') {
    const fixture = openFixture(t);
    const insert = fixture.db.raw.prepare('INSERT INTO requests (consumer_id, title, category, status, created_at) VALUES (1, ?, ?, ?, ?)');
    return {
      engine,
      store: createSqliteMarketplaceStore(fixture.db, { inList: options.inList ?? 'params' }),
      ops: fixture.ops,
      tables: readTables(fixture.db),
      insertRequests: async (rows) => {
        for (const r of rows) insert.run(r.title, r.category, r.status, r.createdAt);
      },
    };
  }
  const template = await buildPgTemplate();
  const name = await createTestDatabase(template.name);
  const pg = openPostgres(databaseUrl(name), { max: 4 });
  t.after(async () => {
    await pg.end({ timeout: 5 });
    await dropTestDatabase(name);
  });
  const ops: string[] = [];
  return {
    engine,
    store: createPgMarketplaceStore(pg, { onQuery: (op) => ops.push(op) }),
    ops,
    tables: template.tables,
    pg,
    insertRequests: async (rows) => {
      for (const r of rows)
        await pg`INSERT INTO requests (request_id, consumer_id, title, category, status, created_at) VALUES ((SELECT max(request_id) + 1 FROM requests), 1, ${r.title}, ${r.category}, ${r.status}, ${r.createdAt})`;
    },
  };
}
