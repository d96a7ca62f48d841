import { z } from 'zod';
import { canReadConsumer, type Identity } from '../auth/identity.js';
import {
  AppError,
  badRequestFromZod,
  ConsumerPageFields,
  RequestsListFields,
  type ConsumerBookingItem,
  type ConsumerPageQuery,
  type ConsumerRequestItem,
  type Page,
  type RequestItem,
  type RequestsListQuery,
} from '../protocol/index.js';
import { createBatchLoader, type BatchLoader } from './batch-loader.js';
import { decodeCursor, encodeCursor, type KeysetPosition } from './cursor.js';
import type { Database } from './database.js';
import { formatId, isoTime, parseId } from './marketplace-ids.js';
import {
  createMarketplaceQueries,
  MAX_IN_LIST,
  type ConsumerBookingRow,
  type ConsumerRequestRow,
  type InListStrategy,
  type ListedRequestRow,
  type RequestBookingRow,
  type RequestsFilter,
} from './marketplace-queries.js';

/** Page size when a query names none (the protocol caps `limit` at 100). */
export const DEFAULT_PAGE_LIMIT = 20;

export interface MarketplaceServiceOptions {
  db: Database;
  /**
   * Merge the lookups that arrive in one event-loop turn, from any number of
   * connections: identical page queries run once, and the bookings of every
   * consumer.requests page (and every existence check) go out as one IN query.
   * Default true; false makes every lookup run its own queries.
   */
  batching?: boolean;
  /** How id lists are bound (see InListStrategy); default `params`, the faster in `npm run bench:db`. */
  inList?: InListStrategy;
}

export interface MarketplaceService {
  /** The open marketplace listing: any caller may read it. */
  requestsList(caller: Identity, q: RequestsListQuery): Promise<Page<RequestItem>>;
  /** One consumer's requests with their bookings: the consumer itself or staff. */
  consumerRequests(caller: Identity, q: ConsumerPageQuery): Promise<Page<ConsumerRequestItem>>;
  /** One consumer's bookings with their request and provider: the consumer itself or staff. */
  consumerBookings(caller: Identity, q: ConsumerPageQuery): Promise<Page<ConsumerBookingItem>>;
  close(): void;
}

// The service is also called from HTTP query strings and scripts, so it checks
// its input itself (zod strips unknown keys such as a message's `type`/`id`).
const RequestsListQuerySchema = z.object(RequestsListFields);
const ConsumerPageQuerySchema = z.object(ConsumerPageFields);

function parseQuery<S extends z.ZodType>(schema: S, q: unknown): z.output<S> {
  const parsed = schema.safeParse(q);
  if (!parsed.success) throw badRequestFromZod(parsed.error, 'query');
  return parsed.data;
}

/** Key of one page query; identical keys in one turn share one query. */
interface PageKey<Scope> {
  scope: Scope;
  after: KeysetPosition | null;
  take: number;
}
const pageKeyOf = (key: PageKey<unknown>): string => JSON.stringify([key.scope, key.after?.sortKey, key.after?.id, key.take]);

/** What tells the two consumer lookups apart: their cursor kind, page loader, row sort key, the relations of each row, and the items they make. */
interface ConsumerLookup<Row extends [number, ...unknown[]], Related, Item> {
  kind: 'consumer.requests' | 'consumer.bookings';
  pages: BatchLoader<PageKey<number>, Row[]>;
  sortKeyOf: (row: Row) => number;
  /** Loaded for the page's rows by their first column, in one batched query; none when absent. */
  related?: BatchLoader<number, Related>;
  toItems: (rows: Row[], consumerKey: number, related: Related[]) => Item[];
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

export function createMarketplaceService(options: MarketplaceServiceOptions): MarketplaceService {
  const queries = createMarketplaceQueries(options.db, { inList: options.inList ?? 'params' });
  const batching = options.batching ?? true;

  /** One page query per distinct key of the turn; a failing key fails alone. */
  function pageLoader<Scope, Row>(run: (key: PageKey<Scope>) => Row[]): BatchLoader<PageKey<Scope>, Row[]> {
    return createBatchLoader<PageKey<Scope>, Row[]>({
      batching,
      keyOf: pageKeyOf,
      batch: (keys) =>
        keys.map((key) => {
          try {
            return run(key);
          } catch (err) {
            return asError(err);
          }
        }),
    });
  }

  const requestsPages = pageLoader<RequestsFilter, ListedRequestRow>((k) => queries.requestsPage(k.scope, k.after, k.take));
  const consumerRequestPages = pageLoader<number, ConsumerRequestRow>((k) => queries.consumerRequestsPage(k.scope, k.after, k.take));
  const consumerBookingPages = pageLoader<number, ConsumerBookingRow>((k) => queries.consumerBookingsPage(k.scope, k.after, k.take));

  /** The bookings of every request asked for in the turn, in one IN query. */
  const bookingsOfRequest = createBatchLoader<number, RequestBookingRow[]>({
    batching,
    maxBatchSize: MAX_IN_LIST,
    batch: (requestIds) => {
      const byRequest = new Map<number, RequestBookingRow[]>();
      for (const row of queries.bookingsOfRequests(requestIds)) {
        const group = byRequest.get(row[0]);
        if (group) group.push(row);
        else byRequest.set(row[0], [row]);
      }
      return requestIds.map((id) => byRequest.get(id) ?? []);
    },
  });
  const consumerExists = createBatchLoader<number, boolean>({
    batching,
    maxBatchSize: MAX_IN_LIST,
    batch: (consumerIds) => {
      const found = new Set(queries.existingConsumers(consumerIds));
      return consumerIds.map((id) => found.has(id));
    },
  });
  const loaders: { close(): void }[] = [requestsPages, consumerRequestPages, consumerBookingPages, bookingsOfRequest, consumerExists];

  /**
   * Authorization before any query: a caller that may not read the consumer
   * gets `forbidden` whether or not that consumer exists (and no query runs,
   * so not even the timing differs), so the answer never tells it which
   * consumer ids are taken. Only callers allowed to read the record (itself,
   * staff) can see `not_found`.
   */
  function authorizedConsumer(caller: Identity, consumerId: string): number {
    if (!canReadConsumer(caller, consumerId)) throw new AppError('forbidden', "not allowed to read this consumer's records");
    const key = parseId('consumer', consumerId);
    if (key === null) throw new AppError('not_found', 'no such consumer');
    return key;
  }

  /**
   * A non-empty page proves the consumer exists (foreign key), so the
   * existence query runs only for an empty page, which needs no relation
   * query: the check never adds to a lookup's query budget.
   */
  async function ensureConsumerExists(consumerId: number, rows: number): Promise<void> {
    if (rows > 0) return;
    if (!(await consumerExists.load(consumerId))) throw new AppError('not_found', 'no such consumer');
  }

  /** The first `limit` of `limit + 1` rows, and the cursor after them if the extra row came back. */
  function pageOf<Row>(rows: Row[], limit: number, cursorAfter: (last: Row) => string): { rows: Row[]; nextCursor: string | null } {
    if (rows.length <= limit) return { rows, nextCursor: null };
    const page = rows.slice(0, limit);
    return { rows: page, nextCursor: cursorAfter(page[limit - 1] as Row) };
  }

  const consumerRequestsLookup: ConsumerLookup<ConsumerRequestRow, RequestBookingRow[], ConsumerRequestItem> = {
    kind: 'consumer.requests',
    pages: consumerRequestPages,
    sortKeyOf: (row) => row[4],
    related: bookingsOfRequest,
    toItems: (rows, consumerKey, bookings) => {
      const consumerId = formatId('consumer', consumerKey);
      return rows.map(([requestId, title, category, status, createdAt], i) => ({
        requestId: formatId('request', requestId),
        consumerId,
        title,
        category,
        status,
        createdAt: isoTime(createdAt),
        bookings: (bookings[i] as RequestBookingRow[]).map(([, bookingId, bookingStatus, scheduledAt, priceCents, providerId, name, rating]) => ({
          bookingId: formatId('booking', bookingId),
          status: bookingStatus,
          scheduledAt: isoTime(scheduledAt),
          priceCents,
          provider: { providerId: formatId('provider', providerId), name, rating },
        })),
      }));
    },
  };
  const consumerBookingsLookup: ConsumerLookup<ConsumerBookingRow, never, ConsumerBookingItem> = {
    kind: 'consumer.bookings',
    pages: consumerBookingPages,
    sortKeyOf: (row) => row[2],
    toItems: (rows) =>
      rows.map(([bookingId, status, scheduledAt, priceCents, requestId, title, category, providerId, name, rating]) => ({
        bookingId: formatId('booking', bookingId),
        status,
        scheduledAt: isoTime(scheduledAt),
        priceCents,
        request: { requestId: formatId('request', requestId), title, category },
        provider: { providerId: formatId('provider', providerId), name, rating },
      })),
  };

  /** One page of a consumer's records: authorization, the cursor, the page query, the existence check an empty page needs, the rows' relations. */
  async function consumerPage<Row extends [number, ...unknown[]], Related, Item>(caller: Identity, q: ConsumerPageQuery, lookup: ConsumerLookup<Row, Related, Item>): Promise<Page<Item>> {
    const query = parseQuery(ConsumerPageQuerySchema, q);
    const consumerKey = authorizedConsumer(caller, query.consumerId);
    const limit = query.limit ?? DEFAULT_PAGE_LIMIT;
    const after = query.cursor === undefined ? null : decodeCursor(query.cursor, lookup.kind, query.consumerId);
    const rows = await lookup.pages.load({ scope: consumerKey, after, take: limit + 1 });
    await ensureConsumerExists(consumerKey, rows.length);
    const page = pageOf(rows, limit, (last) => encodeCursor(lookup.kind, query.consumerId, { sortKey: lookup.sortKeyOf(last), id: last[0] }));
    const related = lookup.related !== undefined && page.rows.length > 0 ? await lookup.related.loadMany(page.rows.map((r) => r[0])) : [];
    return { items: lookup.toItems(page.rows, consumerKey, related), nextCursor: page.nextCursor };
  }

  return {
    async requestsList(_caller, q) {
      const query = parseQuery(RequestsListQuerySchema, q);
      const limit = query.limit ?? DEFAULT_PAGE_LIMIT;
      const scope = JSON.stringify([query.status ?? null, query.category ?? null]);
      const after = query.cursor === undefined ? null : decodeCursor(query.cursor, 'requests.list', scope);
      const rows = await requestsPages.load({ scope: { status: query.status, category: query.category }, after, take: limit + 1 });
      const page = pageOf(rows, limit, (last) => encodeCursor('requests.list', scope, { sortKey: last[3], id: last[0] }));
      // What the filter fixes was not read back (ListedRequestRow).
      const { category, status } = query;
      const statusAt = category === undefined ? 7 : 6;
      return {
        items: page.rows.map((row) => {
          const consumerId = formatId('consumer', row[1]);
          return {
            requestId: formatId('request', row[0]),
            consumerId,
            title: row[2],
            category: category ?? (row[6] as string),
            status: status ?? (row[statusAt] as RequestItem['status']),
            createdAt: isoTime(row[3]),
            consumer: { consumerId, name: row[4] },
            quoteCount: row[5],
          };
        }),
        nextCursor: page.nextCursor,
      };
    },

    consumerRequests: (caller, q) => consumerPage(caller, q, consumerRequestsLookup),
    consumerBookings: (caller, q) => consumerPage(caller, q, consumerBookingsLookup),

    close() {
      for (const loader of loaders) loader.close();
    },
  };
}
