import { idPrefixes, YEAR_10000_MS, type IdKind } from './marketplace-ids.js';
import {
  MAX_IN_LIST,
  type ConsumerBookingRow,
  type ConsumerRequestRow,
  type KeysetPosition,
  type ListedRequestRow,
  type MarketplaceStore,
  type RequestBookingRow,
} from './marketplace-store.js';
import type { Pg } from './pg.js';

/**
 * The PostgreSQL MarketplaceStore (marketplace-store.ts), the same queries as
 * the SQLite one (marketplace-queries.ts) over db/migrations-pg: each page
 * query is one backward index-only walk of a covering index from the cursor,
 * the to-one relations are joined in (their primary keys INCLUDE what is
 * read, so those are index-only too), and a page's bookings are one
 * `= ANY($1)` query. Each row is the JSON text of its wire item, built by
 * PostgreSQL; the members, their order and every id and time are written
 * exactly as the SQLite statements write them.
 */

/** A JSON value as a PostgreSQL text expression. */
type JsonExpr = string;

/** A key as formatId writes it ('r_0000000042'); the schema caps every id at ten digits. */
export const idSql = (kind: IdKind, key: string): JsonExpr => `'"${idPrefixes[kind]}_' || lpad(${key}::text, 10, '0') || '"'`;
/** text: a JSON string, escaped by PostgreSQL (a text value cannot hold U+0000, so nothing else needs care). */
const quotedSql = (value: string): JsonExpr => `to_json(${value})::text`;
/** bigint and double precision: their text is a JSON number (double precision prints the shortest text that reads back exactly). */
const numberSql = (value: string): JsonExpr => `${value}::text`;

/**
 * A stored time (epoch ms) as the wire writes it, exactly isoTime's text. In
 * integer arithmetic (date + days, a sub-day interval), because to_timestamp
 * goes through a double and loses microseconds at large times. From year 10000
 * on, Date#toISOString writes a signed six-digit year.
 */
export function timeSql(ms: string): JsonExpr {
  const day = `(date '1970-01-01' + (${ms} / 86400000)::integer)`;
  const head = `CASE WHEN ${ms} < ${YEAR_10000_MS} THEN to_char(${day}, 'YYYY-MM-DD') ELSE '+' || lpad(extract(year FROM ${day})::text, 6, '0') || to_char(${day}, '-MM-DD') END`;
  return `'"' || ${head} || to_char((${ms} % 86400000) * interval '1 millisecond', '"T"HH24:MI:SS.MS"Z"') || '"'`;
}

/** An object with these members in this order (member names are plain identifiers: nothing to escape). */
function objectSql(members: Record<string, JsonExpr>): JsonExpr {
  const parts = Object.entries(members).map(([name, value], i) => `'${i === 0 ? '{' : ','}"${name}":' || ${value}`);
  return `${parts.join(' || ')} || '}'`;
}

const requestMembers = {
  requestId: idSql('request', 'r.request_id'),
  consumerId: idSql('consumer', 'r.consumer_id'),
  title: quotedSql('r.title'),
  category: quotedSql('r.category'),
  status: quotedSql('r.status'),
  createdAt: timeSql('r.created_at'),
};
const bookingMembers = {
  bookingId: idSql('booking', 'b.booking_id'),
  status: quotedSql('b.status'),
  scheduledAt: timeSql('b.scheduled_at'),
  priceCents: numberSql('b.price_cents'),
};
const providerSql = objectSql({ providerId: idSql('provider', 'b.provider_id'), name: quotedSql('p.name'), rating: numberSql('p.rating') });

/** requests.list: one statement per filter combination, each answered by its own covering index. Parameters: [category], [status], sort key, id, limit. */
export function pgRequestsPageSql(filter: { status: boolean; category: boolean }): string {
  let n = 0;
  const where = [filter.category ? `r.category = $${++n}` : null, filter.status ? `r.status = $${++n}` : null, `(r.created_at, r.request_id) < ($${++n}::bigint, $${++n}::bigint)`]
    .filter((w) => w !== null)
    .join(' AND ');
  const item = objectSql({
    ...requestMembers,
    consumer: objectSql({ consumerId: idSql('consumer', 'r.consumer_id'), name: quotedSql('c.name') }),
    quoteCount: numberSql('(SELECT count(*) FROM quotes q WHERE q.request_id = r.request_id)'),
  });
  return `SELECT ${item}
FROM requests r JOIN consumers c ON c.consumer_id = r.consumer_id
WHERE ${where}
ORDER BY r.created_at DESC, r.request_id DESC
LIMIT $${++n}::integer`;
}

export const pgConsumerRequestsPageSql = `SELECT r.request_id, ${objectSql(requestMembers)}
FROM requests r
WHERE r.consumer_id = $1::bigint AND (r.created_at, r.request_id) < ($2::bigint, $3::bigint)
ORDER BY r.created_at DESC, r.request_id DESC
LIMIT $4::integer`;

export const pgConsumerBookingsPageSql = `SELECT ${objectSql({
  ...bookingMembers,
  request: objectSql({ requestId: idSql('request', 'b.request_id'), title: quotedSql('r.title'), category: quotedSql('r.category') }),
  provider: providerSql,
})}
FROM bookings b
  JOIN requests r ON r.request_id = b.request_id
  JOIN providers p ON p.provider_id = b.provider_id
WHERE b.consumer_id = $1::bigint AND (b.scheduled_at, b.booking_id) < ($2::bigint, $3::bigint)
ORDER BY b.scheduled_at DESC, b.booking_id DESC
LIMIT $4::integer`;

/** The relation queries: one bound array of ids each, whatever its length. */
export const pgRelationSql = {
  // The provider as a correlated subquery, not a join: one index-only probe per booking, whatever the planner
  // thinks of a few hundred ids against a small providers table (a hash join over all of it, then a sort).
  'bookings.by_request': `SELECT b.request_id, ${objectSql({ ...bookingMembers, provider: `(SELECT ${providerSql} FROM providers p WHERE p.provider_id = b.provider_id)` })}
FROM bookings b
WHERE b.request_id = ANY($1::bigint[])
ORDER BY b.request_id DESC, b.scheduled_at DESC, b.booking_id DESC`,
  'consumers.by_id': 'SELECT c.consumer_id FROM consumers c WHERE c.consumer_id = ANY($1::bigint[])',
} as const;

/** Every statement the store runs, by op name: the EXPLAIN test checks each one's plan. */
export function pgMarketplaceStatements(): { op: string; sql: string }[] {
  const pages = [false, true].flatMap((status) => [false, true].map((category) => ({ op: 'requests.page', sql: pgRequestsPageSql({ status, category }) })));
  return [
    ...pages,
    { op: 'consumer_requests.page', sql: pgConsumerRequestsPageSql },
    { op: 'consumer_bookings.page', sql: pgConsumerBookingsPageSql },
    ...Object.entries(pgRelationSql).map(([op, sql]) => ({ op, sql })),
  ];
}

/** The position before the newest row: every real (sort key, id) pair compares below it. */
const FROM_NEWEST = Number.MAX_SAFE_INTEGER;
const position = (after: KeysetPosition | null): [number, number] => (after ? [after.sortKey, after.id] : [FROM_NEWEST, FROM_NEWEST]);

export interface PgMarketplaceStoreOptions {
  /** Called once per query, with its op name (for `chatwire_db_queries_total`). */
  onQuery?: (op: string) => void;
}

export function createPgMarketplaceStore(sql: Pg, options: PgMarketplaceStoreOptions = {}): MarketplaceStore {
  const onQuery = options.onQuery ?? (() => {});
  const pageSql = new Map([false, true].flatMap((status) => [false, true].map((category) => [`${status}/${category}`, pgRequestsPageSql({ status, category })])));

  /** Runs a prepared statement (named and cached per connection by the pool) and returns its rows as arrays. */
  async function run<Row extends unknown[]>(op: string, text: string, params: unknown[]): Promise<Row[]> {
    onQuery(op);
    return (await sql.unsafe(text, params as never[], { prepare: true }).values()) as unknown as Row[];
  }
  const firstColumn = <T>(rows: [T][]): T[] => rows.map((row) => row[0]);
  function relation<Row extends unknown[]>(op: keyof typeof pgRelationSql, ids: readonly number[]): Promise<Row[]> {
    if (ids.length === 0) return Promise.resolve([]);
    if (ids.length > MAX_IN_LIST) return Promise.reject(new RangeError(`${op}: ${ids.length} ids, at most ${MAX_IN_LIST} per query`));
    return run<Row>(op, pgRelationSql[op], [ids.slice()]);
  }

  return {
    async requestsPage(filter, after, take) {
      const params: unknown[] = [];
      if (filter.category !== undefined) params.push(filter.category);
      if (filter.status !== undefined) params.push(filter.status);
      const text = pageSql.get(`${filter.status !== undefined}/${filter.category !== undefined}`)!;
      return firstColumn(await run<[ListedRequestRow]>('requests.page', text, [...params, ...position(after), take]));
    },
    consumerRequestsPage: (consumerId, after, take) => run<ConsumerRequestRow>('consumer_requests.page', pgConsumerRequestsPageSql, [consumerId, ...position(after), take]),
    async consumerBookingsPage(consumerId, after, take) {
      return firstColumn(await run<[ConsumerBookingRow]>('consumer_bookings.page', pgConsumerBookingsPageSql, [consumerId, ...position(after), take]));
    },
    bookingsOfRequests: (ids) => relation<RequestBookingRow>('bookings.by_request', ids),
    existingConsumers: async (ids) => firstColumn(await relation<[number]>('consumers.by_id', ids)),
  };
}
