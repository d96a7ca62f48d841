import { formatId, isoTime } from './marketplace-ids.js';
import { MAX_IN_LIST, type ConsumerRequestRow, type KeysetPosition, type MarketplaceStore, type RequestBookingRow } from './marketplace-store.js';
import type { Pg } from './pg.js';

/**
 * The PostgreSQL MarketplaceStore (marketplace-store.ts), the same queries as
 * the SQLite one (marketplace-queries.ts) over db/migrations-pg: each page
 * query is one backward index-only walk of a covering index from the cursor,
 * the to-one relations are joined in (their primary keys INCLUDE what is
 * read, so those are index-only too). One difference: a consumer.requests
 * page comes with its bookings in the same statement, where SQLite reads them
 * with a second one (pgConsumerRequestsPageSql says why). So the query counts
 * are SQLite's, or one fewer.
 *
 * PostgreSQL returns the columns and the store writes each row's JSON text
 * (formatId, isoTime, JSON.stringify: the very text SQLite's printf writes).
 * Built by PostgreSQL's string functions instead, a 100-item page took
 * about 0.3 ms longer on the server than the columns alone, and several times
 * that on a busy machine, where the server's CPU is the scarce part; the
 * same text costs Node about a microsecond per item.
 */

const quoted = (value: unknown): string => JSON.stringify(value);

type RequestColumns = [requestId: number, consumerId: number, title: string, category: string, status: string, createdAt: number];
const REQUEST_COLUMNS = 'r.request_id, r.consumer_id, r.title, r.category, r.status, r.created_at';
/** The members every request item starts with, without the closing brace. */
const requestJsonHead = ([requestId, consumerId, title, category, status, createdAt]: RequestColumns): string =>
  `{"requestId":"${formatId('request', requestId)}","consumerId":"${formatId('consumer', consumerId)}","title":${quoted(title)},"category":${quoted(category)},"status":${quoted(status)},"createdAt":"${isoTime(createdAt)}"`;

type BookingColumns = [bookingId: number, status: string, scheduledAt: number, priceCents: number];
const BOOKING_COLUMNS = 'b.booking_id, b.status, b.scheduled_at, b.price_cents';
const bookingJsonHead = (bookingId: number, status: string, scheduledAt: number, priceCents: number): string =>
  `{"bookingId":"${formatId('booking', bookingId)}","status":${quoted(status)},"scheduledAt":"${isoTime(scheduledAt)}","priceCents":${priceCents}`;
const providerJson = (providerId: number, name: string, rating: number): string =>
  `{"providerId":"${formatId('provider', providerId)}","name":${quoted(name)},"rating":${rating}}`;

/**
 * The page size is written into a page statement's text, not bound: with
 * `LIMIT $n` PostgreSQL's generic plan cannot tell 21 rows from a million, so
 * the plan cache keeps re-planning each execution (a third of a requests.list
 * page's time). A page asks for one of a few sizes (PAGE_TAKES: the protocol's
 * default and largest pages and a few between, plus the row that says whether
 * a next page exists); a take between two is read with the next size and cut.
 * So each connection prepares a bounded number of page statements.
 */
export const PAGE_TAKES = [2, 11, 21, 51, 101] as const;
const pageTakeFor = (take: number): number => {
  if (!Number.isSafeInteger(take) || take < 1) throw new RangeError(`page take must be a positive integer, got ${take}`);
  return PAGE_TAKES.find((t) => t >= take) ?? take;
};

/** requests.list: one statement per filter combination (and page take), each answered by its own covering index. Parameters: [category], [status], sort key, id. */
export function pgRequestsPageSql(filter: { status: boolean; category: boolean }, take: number): string {
  let n = 0;
  const where = [
    filter.category ? `r.category = $${++n}` : null,
    filter.status ? `r.status = $${++n}` : null,
    `(r.created_at, r.request_id) < ($${++n}::bigint, $${++n}::bigint)`,
  ]
    .filter((w) => w !== null)
    .join(' AND ');
  // The consumer's name as a correlated subquery, not a join: the join got a Memoize node whose generic-plan
  // cost came out above the custom plans' with a category filter, so the plan cache re-planned every such page.
  return `SELECT ${REQUEST_COLUMNS}, (SELECT c.name FROM consumers c WHERE c.consumer_id = r.consumer_id),
  (SELECT count(*) FROM quotes q WHERE q.request_id = r.request_id)
FROM requests r
WHERE ${where}
ORDER BY r.created_at DESC, r.request_id DESC
LIMIT ${take}`;
}
type ListedRequestColumns = [...RequestColumns, consumerName: string, quoteCount: number];
const listedRequestJson = (row: ListedRequestColumns): string =>
  `${requestJsonHead(row as unknown as RequestColumns)},"consumer":{"consumerId":"${formatId('consumer', row[1])}","name":${quoted(row[6])}},"quoteCount":${row[7]}}`;

/**
 * consumer.requests: the page and its requests' bookings (with their provider) in one statement, one row per
 * booking, or one with NULL booking columns for a request without any. Over a network a second round trip
 * costs more than the probes of the bookings, which are the same in either form; so the page is one query,
 * not the page and then one `= ANY($1)` query (bookings.by_request, which the SQLite store keeps: there the
 * service merges the bookings of every page of a turn into one query). Rows come in page order; a request's
 * bookings are put in order by the store (consumerRequestRows), not by an ORDER BY, which would cost a sort.
 */
export const pgConsumerRequestsPageSql = (take: number): string => `SELECT ${REQUEST_COLUMNS}, ${BOOKING_COLUMNS}, b.provider_id, p.name, p.rating
FROM (
  SELECT ${REQUEST_COLUMNS}
  FROM requests r
  WHERE r.consumer_id = $1::bigint AND (r.created_at, r.request_id) < ($2::bigint, $3::bigint)
  ORDER BY r.created_at DESC, r.request_id DESC
  LIMIT ${take}
) r
  LEFT JOIN bookings b ON b.request_id = r.request_id
  LEFT JOIN providers p ON p.provider_id = b.provider_id
ORDER BY r.created_at DESC, r.request_id DESC`;
type PagedRequestColumns = [...RequestColumns, ...Nullable<BookingColumns>, providerId: number | null, providerName: string | null, rating: number | null];
type Nullable<T extends unknown[]> = { [K in keyof T]: T[K] | null };

/** A booking's JSON text with its provider (consumer.requests and bookings.by_request). */
const requestBookingJson = (
  bookingId: number,
  status: string,
  scheduledAt: number,
  priceCents: number,
  providerId: number,
  providerName: string,
  rating: number,
): string => `${bookingJsonHead(bookingId, status, scheduledAt, priceCents)},"provider":${providerJson(providerId, providerName, rating)}}`;
const pagedBookingJson = (row: PagedRequestColumns): string => requestBookingJson(row[6]!, row[7]!, row[8]!, row[9]!, row[10]!, row[11]!, row[12]!);
/** Bookings of one request as the SQLite store orders them: newest scheduled_at first, the id breaking ties. */
const byScheduleDescending = (a: PagedRequestColumns, b: PagedRequestColumns): number => b[8]! - a[8]! || b[6]! - a[6]!;

/** The first `take` requests of consumer.requests rows, each with the JSON text of its bookings array. */
function consumerRequestRows(rows: PagedRequestColumns[], take: number): ConsumerRequestRow[] {
  const page: ConsumerRequestRow[] = [];
  for (let start = 0; start < rows.length && page.length < take; ) {
    const first = rows[start]!;
    let end = start + 1;
    while (end < rows.length && rows[end]![0] === first[0]) end++;
    // Most requests have no booking or one: nothing to sort.
    const bookings =
      first[6] === null ? '' : end - start === 1 ? pagedBookingJson(first) : rows.slice(start, end).sort(byScheduleDescending).map(pagedBookingJson).join(',');
    page.push([first[0], `${requestJsonHead(first as unknown as RequestColumns)}}`, `[${bookings}]`]);
    start = end;
  }
  return page;
}

export const pgConsumerBookingsPageSql = (
  take: number,
): string => `SELECT ${BOOKING_COLUMNS}, b.request_id, r.title, r.category, b.provider_id, p.name, p.rating
FROM bookings b
  JOIN requests r ON r.request_id = b.request_id
  JOIN providers p ON p.provider_id = b.provider_id
WHERE b.consumer_id = $1::bigint AND (b.scheduled_at, b.booking_id) < ($2::bigint, $3::bigint)
ORDER BY b.scheduled_at DESC, b.booking_id DESC
LIMIT ${take}`;
type ConsumerBookingColumns = [...BookingColumns, requestId: number, title: string, category: string, providerId: number, providerName: string, rating: number];
const consumerBookingJson = (row: ConsumerBookingColumns): string =>
  `${bookingJsonHead(row[0], row[1], row[2], row[3])},"request":{"requestId":"${formatId('request', row[4])}","title":${quoted(row[5])},"category":${quoted(row[6])}},"provider":${providerJson(row[7], row[8], row[9])}}`;

/** The relation queries: one bound array of ids each, whatever its length. */
export const pgRelationSql = {
  // The provider by correlated subqueries, not a join: index-only probes per booking, whatever the planner
  // thinks of a few hundred ids against a small providers table (a hash join over all of it, then a sort).
  'bookings.by_request': `SELECT b.request_id, ${BOOKING_COLUMNS}, b.provider_id,
  (SELECT p.name FROM providers p WHERE p.provider_id = b.provider_id),
  (SELECT p.rating FROM providers p WHERE p.provider_id = b.provider_id)
FROM bookings b
WHERE b.request_id = ANY($1::bigint[])
ORDER BY b.request_id DESC, b.scheduled_at DESC, b.booking_id DESC`,
  'consumers.by_id': 'SELECT c.consumer_id FROM consumers c WHERE c.consumer_id = ANY($1::bigint[])',
} as const;
type RequestBookingColumns = [requestId: number, ...BookingColumns, providerId: number, providerName: string, rating: number];
const requestBookingRow = (row: RequestBookingColumns): RequestBookingRow => [
  row[0],
  requestBookingJson(row[1], row[2], row[3], row[4], row[5], row[6], row[7]),
];

/** Every statement the store runs at these page takes, by op name: the EXPLAIN test checks each one's plan. */
export function pgMarketplaceStatements(takes: readonly number[] = PAGE_TAKES): { op: string; sql: string }[] {
  const pages = takes.flatMap((take) => [
    ...[false, true].flatMap((status) => [false, true].map((category) => ({ op: 'requests.page', sql: pgRequestsPageSql({ status, category }, take) }))),
    { op: 'consumer_requests.page', sql: pgConsumerRequestsPageSql(take) },
    { op: 'consumer_bookings.page', sql: pgConsumerBookingsPageSql(take) },
  ]);
  return [...pages, ...Object.entries(pgRelationSql).map(([op, sql]) => ({ op, sql }))];
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
  const pageStatements = new Map<string, string>();
  /** A page statement's text at the take it reads, made once. */
  function pageSql(key: string, take: number, make: (take: number) => string): string {
    let text = pageStatements.get(`${key}/${take}`);
    if (text === undefined) {
      text = make(take);
      pageStatements.set(`${key}/${take}`, text);
    }
    return text;
  }

  /** Runs a prepared statement (named and cached per connection by the pool) and returns its rows as arrays. */
  async function run<Row extends unknown[]>(op: string, text: string, params: unknown[]): Promise<Row[]> {
    onQuery(op);
    return (await sql.unsafe(text, params as never[], { prepare: true }).values()) as unknown as Row[];
  }
  /** `take` rows of a page statement read at its page take. */
  async function page<Row extends unknown[]>(op: string, key: string, make: (take: number) => string, params: unknown[], take: number): Promise<Row[]> {
    const readTake = pageTakeFor(take);
    const rows = await run<Row>(op, pageSql(key, readTake, make), params);
    return rows.length > take ? rows.slice(0, take) : rows;
  }
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
      const shape = { status: filter.status !== undefined, category: filter.category !== undefined };
      const rows = await page<ListedRequestColumns>(
        'requests.page',
        `requests/${shape.status}/${shape.category}`,
        (t) => pgRequestsPageSql(shape, t),
        [...params, ...position(after)],
        take,
      );
      return rows.map(listedRequestJson);
    },
    async consumerRequestsPage(consumerId, after, take) {
      // Several rows per request: the page is cut by requests (consumerRequestRows), not by rows.
      const rows = await run<PagedRequestColumns>('consumer_requests.page', pageSql('consumer_requests', pageTakeFor(take), pgConsumerRequestsPageSql), [
        consumerId,
        ...position(after),
      ]);
      return consumerRequestRows(rows, take);
    },
    async consumerBookingsPage(consumerId, after, take) {
      const rows = await page<ConsumerBookingColumns>(
        'consumer_bookings.page',
        'consumer_bookings',
        pgConsumerBookingsPageSql,
        [consumerId, ...position(after)],
        take,
      );
      return rows.map(consumerBookingJson);
    },
    bookingsOfRequests: async (ids) => (await relation<RequestBookingColumns>('bookings.by_request', ids)).map(requestBookingRow),
    existingConsumers: async (ids) => (await relation<[number]>('consumers.by_id', ids)).map((row) => row[0]),
  };
}
