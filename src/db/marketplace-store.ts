import type { z } from 'zod';
import type { BookingStatusSchema, RequestStatusSchema } from '../protocol/index.js';

/**
 * The storage contract of the marketplace lookups: the queries the service
 * (src/marketplace/) needs, and nothing about who may ask or how the asks
 * are merged. Two implementations keep the same contract, checked by the
 * same tests: SQLite (marketplace-queries.ts, the embedded default) and
 * PostgreSQL (pg-marketplace-store.ts, cluster mode).
 *
 * Every row comes back as the JSON text of its wire item, built by the
 * database, so what a lookup produces is the frame the client gets. The text
 * may differ between engines where JSON allows it (SQLite writes a rating of
 * 5 as 5.0, PostgreSQL as 5); it always parses to the same value.
 */

export type RequestStatus = z.infer<typeof RequestStatusSchema>;
export type BookingStatus = z.infer<typeof BookingStatusSchema>;

/** Where the next page starts: the sort key and the id of the last item already sent. */
export interface KeysetPosition {
  sortKey: number;
  id: number;
}

/** requests.list row: the JSON text of one RequestItem. */
export type ListedRequestRow = string;
/**
 * consumer.requests page row: the request's key, the JSON text of its ConsumerRequestItem without `bookings`
 * (the item's last member, spliced in by the service), and the JSON text of its bookings array when the store
 * reads the bookings with the page (PostgreSQL); without it, the service asks bookingsOfRequests (SQLite).
 */
export type ConsumerRequestRow = [requestId: number, itemJson: string, bookingsJson?: string];
/** consumer.bookings page row: the JSON text of one ConsumerBookingItem, with its request and provider. */
export type ConsumerBookingRow = string;
/** A booking of one of the requests of a consumer.requests page: the request's key, and the JSON text of the booking with its provider. */
export type RequestBookingRow = [requestId: number, bookingJson: string];

export interface RequestsFilter {
  status?: RequestStatus | undefined;
  category?: string | undefined;
}

/**
 * Most ids bound to one relation query; the service never asks for more.
 * Also keeps SQLite's plans indexed after ANALYZE: it rightly prefers a scan
 * once an IN list covers about a quarter of a table, which at 256 ids only
 * happens to tables of a thousand rows or so.
 */
export const MAX_IN_LIST = 256;

/** A result now (SQLite answers synchronously) or later (PostgreSQL). */
export type MaybePromise<T> = T | Promise<T>;

/**
 * Each method is one query, reported to the store's `onQuery` under the op
 * name in brackets (the `chatwire_db_queries_total` label): the lookups'
 * query counts are the service's calls, whatever the engine.
 */
export interface MarketplaceStore {
  /** [requests.page] Rows of requests.list after `after` (null: from the newest), newest first, the id breaking ties. */
  requestsPage(filter: RequestsFilter, after: KeysetPosition | null, take: number): MaybePromise<ListedRequestRow[]>;
  /** [consumer_requests.page] A consumer's requests, ordered as requestsPage: every row with its bookings' text (ordered as bookingsOfRequests orders them), or no row with it. */
  consumerRequestsPage(consumerId: number, after: KeysetPosition | null, take: number): MaybePromise<ConsumerRequestRow[]>;
  /** [consumer_bookings.page] A consumer's bookings, newest scheduled_at first, the id breaking ties. */
  consumerBookingsPage(consumerId: number, after: KeysetPosition | null, take: number): MaybePromise<ConsumerBookingRow[]>;
  /** [bookings.by_request] The bookings of up to MAX_IN_LIST requests in one query: by request descending, then scheduled_at and booking_id descending. */
  bookingsOfRequests(requestIds: readonly number[]): MaybePromise<RequestBookingRow[]>;
  /** [consumers.by_id] The ids among these (up to MAX_IN_LIST) that are consumers. */
  existingConsumers(consumerIds: readonly number[]): MaybePromise<number[]>;
}
