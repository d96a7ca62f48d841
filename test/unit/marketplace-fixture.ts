/**
 * A seeded marketplace database on a temp dir for the marketplace tests, and
 * the naive reference implementation the lookups are checked against.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Database, type OpenDatabaseOptions } from '../../src/db/database.js';
import { seedMarketplace } from '../../src/db/marketplace-seed.js';
import { migrate } from '../../src/db/migrate.js';
import type { ConsumerBookingItem, ConsumerRequestItem, RequestItem } from '../../src/protocol/index.js';

export interface Fixture {
  dir: string;
  db: Database;
  /** Every operation the database ran since the last reset, in order. */
  ops: string[];
  close(): void;
}

interface Closable {
  after(fn: () => void): void;
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

export function openFixture(t: Closable, options: { DatabaseClass?: typeof Database } & OpenDatabaseOptions = {}): Fixture {
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

interface Tables {
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
const newestBookingFirst = (a: Tables['bookings'][number], b: Tables['bookings'][number]) =>
  b.scheduled_at - a.scheduled_at || b.booking_id - a.booking_id;

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
