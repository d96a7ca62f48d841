import { z } from 'zod';
import { canReadConsumer, type Identity } from '../auth/identity.js';
import {
  AppError,
  badRequestFromZod,
  ConsumerPageFields,
  RequestsListFields,
  parsePage,
  type ConsumerBookingItem,
  type ConsumerPageQuery,
  type ConsumerRequestItem,
  type Page,
  type RequestItem,
  type RequestsListQuery,
  type SerializedPage,
} from '../protocol/index.js';
import { parseId, type IdKind } from '../db/marketplace-ids.js';
import {
  MAX_IN_LIST,
  type ConsumerBookingRow,
  type ConsumerRequestRow,
  type KeysetPosition,
  type ListedRequestRow,
  type MarketplaceStore,
  type MaybePromise,
  type RequestsFilter,
} from '../db/marketplace-store.js';
import { createBatchLoader, type BatchLoader } from './batch-loader.js';
import { decodeCursor, encodeCursor } from './cursor.js';

/** Page size when a query names none (the protocol caps `limit` at 100). */
export const DEFAULT_PAGE_LIMIT = 20;

/**
 * The marketplace lookups: who may read what, input validation, keyset
 * cursors, and the merging of lookups across connections. Storage is the
 * store's (src/db/marketplace-store.ts): SQLite embedded, PostgreSQL in
 * cluster mode, the same service on either.
 */
export interface MarketplaceServiceOptions {
  store: MarketplaceStore;
  /**
   * Merge the lookups that arrive in one event-loop turn, from any number of
   * connections: identical page queries run once, and the bookings of every
   * consumer.requests page (and every existence check) go out as one IN query.
   * Default true; false makes every lookup run its own queries.
   */
  batching?: boolean;
}

/**
 * The lookups as the transports send them: each page's items are the JSON
 * text the database built (src/db/marketplace-store.ts), spliced into the reply
 * frame or HTTP body as they are.
 */
export interface MarketplaceJsonLookups {
  /** The open marketplace listing: any caller may read it. */
  requestsListJson(caller: Identity, q: RequestsListQuery): Promise<SerializedPage>;
  /** One consumer's requests with their bookings: the consumer itself or staff. */
  consumerRequestsJson(caller: Identity, q: ConsumerPageQuery): Promise<SerializedPage>;
  /** One consumer's bookings with their request and provider: the consumer itself or staff. */
  consumerBookingsJson(caller: Identity, q: ConsumerPageQuery): Promise<SerializedPage>;
}

export interface MarketplaceService extends MarketplaceJsonLookups {
  /** The same lookups with the items parsed, for in-process callers. */
  requestsList(caller: Identity, q: RequestsListQuery): Promise<Page<RequestItem>>;
  consumerRequests(caller: Identity, q: ConsumerPageQuery): Promise<Page<ConsumerRequestItem>>;
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

/** What tells the two consumer lookups apart: their cursor kind, page loader, the position of a row, and the items JSON a page of rows makes (loading the rows' relations, batched). */
interface ConsumerLookup<Row> {
  kind: 'consumer.requests' | 'consumer.bookings';
  pages: BatchLoader<PageKey<number>, Row[]>;
  positionOf: (row: Row) => KeysetPosition;
  itemsJson: (rows: Row[]) => string | Promise<string>;
}

/**
 * The keyset position of an item, read back from its JSON text: its key from
 * the id member, its sort key from the time member (Date.parse gives back
 * exactly the milliseconds isoTime wrote). One parse per page, of its last item.
 */
function positionOfItem(itemJson: string, kind: IdKind, idMember: string, timeMember: string): KeysetPosition {
  const item = JSON.parse(itemJson) as Record<string, string>;
  const id = parseId(kind, item[idMember] as string);
  const sortKey = Date.parse(item[timeMember] as string);
  if (id === null || !Number.isSafeInteger(sortKey)) throw new Error(`${kind} item without a keyset position: ${itemJson}`);
  return { sortKey, id };
}

const arrayJson = (elements: readonly string[]): string => `[${elements.join(',')}]`;

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

export function createMarketplaceService(options: MarketplaceServiceOptions): MarketplaceService {
  const store = options.store;
  const batching = options.batching ?? true;

  /**
   * One page query per distinct key of the turn; a failing key fails alone.
   * The queries of one turn go out together: an asynchronous store (PostgreSQL)
   * pipelines them on its connections.
   */
  function pageLoader<Scope, Row>(run: (key: PageKey<Scope>) => MaybePromise<Row[]>): BatchLoader<PageKey<Scope>, Row[]> {
    return createBatchLoader<PageKey<Scope>, Row[]>({
      batching,
      keyOf: pageKeyOf,
      batch: (keys) =>
        Promise.all(
          keys.map(async (key) => {
            try {
              return await run(key);
            } catch (err) {
              return asError(err);
            }
          }),
        ),
    });
  }

  const requestsPages = pageLoader<RequestsFilter, ListedRequestRow>((k) => store.requestsPage(k.scope, k.after, k.take));
  const consumerRequestPages = pageLoader<number, ConsumerRequestRow>((k) => store.consumerRequestsPage(k.scope, k.after, k.take));
  const consumerBookingPages = pageLoader<number, ConsumerBookingRow>((k) => store.consumerBookingsPage(k.scope, k.after, k.take));

  /** The bookings of every request asked for in the turn, in one IN query: per request, the JSON text of its bookings array. */
  const bookingsOfRequest = createBatchLoader<number, string>({
    batching,
    maxBatchSize: MAX_IN_LIST,
    batch: async (requestIds) => {
      const byRequest = new Map<number, string[]>();
      for (const [requestId, bookingJson] of await store.bookingsOfRequests(requestIds)) {
        const group = byRequest.get(requestId);
        if (group) group.push(bookingJson);
        else byRequest.set(requestId, [bookingJson]);
      }
      return requestIds.map((id) => arrayJson(byRequest.get(id) ?? []));
    },
  });
  const consumerExists = createBatchLoader<number, boolean>({
    batching,
    maxBatchSize: MAX_IN_LIST,
    batch: async (consumerIds) => {
      const found = new Set(await store.existingConsumers(consumerIds));
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

  const consumerRequestsLookup: ConsumerLookup<ConsumerRequestRow> = {
    kind: 'consumer.requests',
    pages: consumerRequestPages,
    positionOf: (row) => positionOfItem(row[1], 'request', 'requestId', 'createdAt'),
    // `bookings` is the item's last member: it goes in before the closing brace of the row's JSON object.
    // A store that read them with the page (one round trip, not two) gave them in the rows.
    itemsJson: async (rows) => {
      const bookings = rows.every((row) => row[2] !== undefined) ? rows.map((row) => row[2]) : await bookingsOfRequest.loadMany(rows.map((row) => row[0]));
      return arrayJson(rows.map(([, itemJson], i) => `${itemJson.slice(0, -1)},"bookings":${bookings[i] as string}}`));
    },
  };
  const consumerBookingsLookup: ConsumerLookup<ConsumerBookingRow> = {
    kind: 'consumer.bookings',
    pages: consumerBookingPages,
    positionOf: (row) => positionOfItem(row, 'booking', 'bookingId', 'scheduledAt'),
    itemsJson: arrayJson,
  };

  /** One page of a consumer's records: authorization, the cursor, the page query, the existence check an empty page needs, the rows' relations. */
  async function consumerPage<Row>(caller: Identity, q: ConsumerPageQuery, lookup: ConsumerLookup<Row>): Promise<SerializedPage> {
    const query = parseQuery(ConsumerPageQuerySchema, q);
    const consumerKey = authorizedConsumer(caller, query.consumerId);
    const limit = query.limit ?? DEFAULT_PAGE_LIMIT;
    const after = query.cursor === undefined ? null : decodeCursor(query.cursor, lookup.kind, query.consumerId);
    const rows = await lookup.pages.load({ scope: consumerKey, after, take: limit + 1 });
    await ensureConsumerExists(consumerKey, rows.length);
    const page = pageOf(rows, limit, (last) => encodeCursor(lookup.kind, query.consumerId, lookup.positionOf(last)));
    return { itemsJson: page.rows.length === 0 ? '[]' : await lookup.itemsJson(page.rows), nextCursor: page.nextCursor };
  }

  async function requestsListJson(_caller: Identity, q: RequestsListQuery): Promise<SerializedPage> {
    const query = parseQuery(RequestsListQuerySchema, q);
    const limit = query.limit ?? DEFAULT_PAGE_LIMIT;
    const scope = JSON.stringify([query.status ?? null, query.category ?? null]);
    const after = query.cursor === undefined ? null : decodeCursor(query.cursor, 'requests.list', scope);
    const rows = await requestsPages.load({ scope: { status: query.status, category: query.category }, after, take: limit + 1 });
    const page = pageOf(rows, limit, (last) => encodeCursor('requests.list', scope, positionOfItem(last, 'request', 'requestId', 'createdAt')));
    return { itemsJson: arrayJson(page.rows), nextCursor: page.nextCursor };
  }
  const consumerRequestsJson = (caller: Identity, q: ConsumerPageQuery) => consumerPage(caller, q, consumerRequestsLookup);
  const consumerBookingsJson = (caller: Identity, q: ConsumerPageQuery) => consumerPage(caller, q, consumerBookingsLookup);

  return {
    requestsListJson,
    consumerRequestsJson,
    consumerBookingsJson,
    requestsList: async (caller, q) => parsePage<RequestItem>(await requestsListJson(caller, q)),
    consumerRequests: async (caller, q) => parsePage<ConsumerRequestItem>(await consumerRequestsJson(caller, q)),
    consumerBookings: async (caller, q) => parsePage<ConsumerBookingItem>(await consumerBookingsJson(caller, q)),

    close() {
      for (const loader of loaders) loader.close();
    },
  };
}
