import type { CountedStatement, Database } from './database.js';
import { idPrefixes, isoTime, YEAR_10000_MS, type IdKind } from './marketplace-ids.js';
import {
  MAX_IN_LIST,
  type ConsumerBookingRow,
  type ConsumerRequestRow,
  type KeysetPosition,
  type ListedRequestRow,
  type MarketplaceStore,
  type RequestBookingRow,
} from './marketplace-store.js';

/**
 * The SQLite MarketplaceStore (marketplace-store.ts): every SQL statement of
 * the marketplace lookups (docs/marketplace.md lists
 * their plans). Each page query walks one covering index of
 * 002_marketplace.sql backwards from the cursor. To-one relations (a
 * request's consumer, a booking's request and provider, a request's quote
 * count) are joined into the page query: one b-tree descent per row inside
 * SQLite costs less than a second statement. The one to-many relation (a
 * request's bookings) is one IN query over the whole page. So no lookup's
 * query count depends on its page size.
 *
 * Every row comes back as the JSON text of its wire item, built by SQLite in
 * one printf per row (objectJson below): what a lookup produces is
 * the frame the client gets, and one string per row costs far less than
 * handing SQLite's values to V8 one by one, building objects from them, and
 * serializing those again (docs/marketplace.md, "Serialized in SQLite").
 */

/**
 * How a list of ids reaches SQLite: `params` binds `IN (?, ?, ...)`, with one
 * statement per power-of-two arity (the tail padded with NULL, which matches
 * nothing) so at most log2(MAX_IN_LIST) + 1 statements per relation are ever
 * prepared; `json` binds one JSON array and reads it with json_each.
 * `npm run bench:db` measures both.
 */
export type InListStrategy = 'params' | 'json';

/** The position before the newest row: every real (sort key, id) pair compares below it. */
const FROM_NEWEST = Number.MAX_SAFE_INTEGER;

/** The SQL function the time expression falls back to from year 10000 on (registered by createSqliteMarketplaceStore). */
const ISO_TIME_FUNCTION = 'chatwire_iso_time';

/**
 * A stored time (epoch ms) as the wire writes it, exactly isoTime's text:
 * datetime's 'subsec' form with a T and a Z. Years from 10000 on are written
 * by isoTime itself (SQLite's dates end at 9999); no stored time is that late,
 * so that branch costs nothing.
 */
const isoTimeSql = (ms: string): string =>
  `CASE WHEN ${ms} < ${YEAR_10000_MS} THEN replace(datetime(${ms} / 1000.0, 'unixepoch', 'subsec'), ' ', 'T') || 'Z' ELSE ${ISO_TIME_FUNCTION}(${ms}) END`;

/**
 * A value's JSON text as SQL writes it: a printf format and its arguments.
 * An item is one printf per row (objectJson), which measured faster than
 * json_object with a printf per id.
 */
export interface JsonSql {
  format: string;
  args: string[];
}
/** A key as formatId writes it ('r_0000000042'); the schema caps every id at ten digits. */
export const idJson = (kind: IdKind, key: string): JsonSql => ({ format: `"${idPrefixes[kind]}_%010d"`, args: [key] });
/** TEXT, or a REAL: json_quote writes a JSON string, or a number that parses back to the same double. */
const quotedJson = (value: string): JsonSql => ({ format: '%s', args: [`json_quote(${value})`] });
const intJson = (value: string): JsonSql => ({ format: '%d', args: [value] });
export const timeJson = (ms: string): JsonSql => ({ format: '"%s"', args: [isoTimeSql(ms)] });
/** An object with these members in this order (member names are plain identifiers: nothing to escape). */
function objectJson(members: Record<string, JsonSql>): JsonSql {
  const entries = Object.entries(members);
  return { format: `{${entries.map(([name, value]) => `"${name}":${value.format}`).join(',')}}`, args: entries.flatMap(([, value]) => value.args) };
}
export const printfSql = (json: JsonSql): string => `printf('${json.format}', ${json.args.join(', ')})`;

const requestMembers = {
  requestId: idJson('request', 'r.request_id'),
  consumerId: idJson('consumer', 'r.consumer_id'),
  title: quotedJson('r.title'),
  category: quotedJson('r.category'),
  status: quotedJson('r.status'),
  createdAt: timeJson('r.created_at'),
};
const bookingMembers = {
  bookingId: idJson('booking', 'b.booking_id'),
  status: quotedJson('b.status'),
  scheduledAt: timeJson('b.scheduled_at'),
  priceCents: intJson('b.price_cents'),
};
const providerJson = objectJson({ providerId: idJson('provider', 'b.provider_id'), name: quotedJson('p.name'), rating: quotedJson('p.rating') });

/** requests.list: one statement per filter combination, each answered by its own covering index. */
export function requestsPageSql(filter: { status: boolean; category: boolean }): string {
  const where = [filter.category ? 'r.category = ?' : null, filter.status ? 'r.status = ?' : null, '(r.created_at, r.request_id) < (?, ?)']
    .filter((w) => w !== null)
    .join(' AND ');
  const item = objectJson({
    ...requestMembers,
    consumer: objectJson({ consumerId: idJson('consumer', 'r.consumer_id'), name: quotedJson('c.name') }),
    quoteCount: intJson('(SELECT count(*) FROM quotes q WHERE q.request_id = r.request_id)'),
  });
  return `SELECT ${printfSql(item)}
FROM requests r JOIN consumers c ON c.consumer_id = r.consumer_id
WHERE ${where}
ORDER BY r.created_at DESC, r.request_id DESC
LIMIT ?`;
}

export const consumerRequestsPageSql = `SELECT r.request_id, ${printfSql(objectJson(requestMembers))}
FROM requests r
WHERE r.consumer_id = ? AND (r.created_at, r.request_id) < (?, ?)
ORDER BY r.created_at DESC, r.request_id DESC
LIMIT ?`;

const consumerBookingJson = objectJson({
  ...bookingMembers,
  request: objectJson({ requestId: idJson('request', 'b.request_id'), title: quotedJson('r.title'), category: quotedJson('r.category') }),
  provider: providerJson,
});
export const consumerBookingsPageSql = `SELECT ${printfSql(consumerBookingJson)}
FROM bookings b
  JOIN requests r ON r.request_id = b.request_id
  JOIN providers p ON p.provider_id = b.provider_id
WHERE b.consumer_id = ? AND (b.scheduled_at, b.booking_id) < (?, ?)
ORDER BY b.scheduled_at DESC, b.booking_id DESC
LIMIT ?`;

/** Relation queries; `%IN%` is replaced by the id list of the chosen strategy. */
export const relationSql = {
  'bookings.by_request': `SELECT b.request_id, ${printfSql(objectJson({ ...bookingMembers, provider: providerJson }))}
FROM bookings b JOIN providers p ON p.provider_id = b.provider_id
WHERE b.request_id IN %IN%
ORDER BY b.request_id DESC, b.scheduled_at DESC, b.booking_id DESC`,
  'consumers.by_id': 'SELECT consumer_id FROM consumers WHERE consumer_id IN %IN%',
} as const;
export type RelationOp = keyof typeof relationSql;

function arityFor(n: number): number {
  let arity = 1;
  while (arity < n) arity *= 2;
  return arity;
}

export function inListSql(op: RelationOp, strategy: InListStrategy, arity: number): string {
  const list = strategy === 'json' ? '(SELECT value FROM json_each(?))' : `(${new Array<string>(arity).fill('?').join(', ')})`;
  return relationSql[op].replace('%IN%', list);
}

export function createSqliteMarketplaceStore(db: Database, options: { inList?: InListStrategy } = {}): MarketplaceStore {
  const strategy = options.inList ?? 'params';
  const asArrays = { rowsAsArrays: true };
  const asStrings = { pluck: true };
  db.raw.function(ISO_TIME_FUNCTION, { deterministic: true }, (ms) => isoTime(Number(ms)));

  const requestsPages = new Map<string, CountedStatement<ListedRequestRow>>();
  for (const status of [false, true]) {
    for (const category of [false, true]) {
      requestsPages.set(`${status}/${category}`, db.prepare<ListedRequestRow>('requests.page', requestsPageSql({ status, category }), asStrings));
    }
  }
  const consumerRequests = db.prepare<ConsumerRequestRow>('consumer_requests.page', consumerRequestsPageSql, asArrays);
  const consumerBookings = db.prepare<ConsumerBookingRow>('consumer_bookings.page', consumerBookingsPageSql, asStrings);

  // Prepared lazily: most processes only ever see a few arities.
  const inStatements = new Map<string, CountedStatement<unknown[]>>();
  function relation<Row extends unknown[]>(op: RelationOp, ids: readonly number[]): Row[] {
    if (ids.length === 0) return [];
    if (ids.length > MAX_IN_LIST) throw new RangeError(`${op}: ${ids.length} ids, at most ${MAX_IN_LIST} per query`);
    if (strategy === 'json') {
      let stmt = inStatements.get(op);
      if (!stmt) {
        stmt = db.prepare(op, inListSql(op, 'json', 1), asArrays);
        inStatements.set(op, stmt);
      }
      return stmt.all(JSON.stringify(ids)) as Row[];
    }
    const arity = arityFor(ids.length);
    const cacheKey = `${op}/${arity}`;
    let stmt = inStatements.get(cacheKey);
    if (!stmt) {
      stmt = db.prepare(op, inListSql(op, 'params', arity), asArrays);
      inStatements.set(cacheKey, stmt);
    }
    const params: (number | null)[] = ids.slice();
    while (params.length < arity) params.push(null);
    return stmt.all(...params) as Row[];
  }

  function position(after: KeysetPosition | null): [number, number] {
    return after ? [after.sortKey, after.id] : [FROM_NEWEST, FROM_NEWEST];
  }

  return {
    requestsPage(filter, after, take) {
      const params: unknown[] = [];
      if (filter.category !== undefined) params.push(filter.category);
      if (filter.status !== undefined) params.push(filter.status);
      const stmt = requestsPages.get(`${filter.status !== undefined}/${filter.category !== undefined}`)!;
      return stmt.all(...params, ...position(after), take);
    },
    consumerRequestsPage(consumerId, after, take) {
      return consumerRequests.all(consumerId, ...position(after), take);
    },
    consumerBookingsPage(consumerId, after, take) {
      return consumerBookings.all(consumerId, ...position(after), take);
    },
    bookingsOfRequests: (ids) => relation<RequestBookingRow>('bookings.by_request', ids),
    existingConsumers: (ids) => relation<[number]>('consumers.by_id', ids).map((row) => row[0]),
  };
}
