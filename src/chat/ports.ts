/**
 * What the chat service needs from the stores around it. The embedded
 * implementations (LMDB cache, in-memory token buckets) are adapted to these in
 * main wiring; a Redis-backed one would implement the same shapes. Reads answer
 * with Promises, as a store across the network does; the embedded adapters
 * resolve at once.
 */
import type { CachedReply as StoredReply } from '../cache/response-cache.js';
import type { ModelRequest } from '../llm/provider.js';
import type { CacheMode, RateLimitInfo } from '../protocol/index.js';

/** A reply as the chat service gets and puts it: the cache's stored reply (one zod schema) without its bookkeeping. */
export type CachedReply = Pick<StoredReply, 'chunks' | 'finishReason' | 'usage'>;

export interface ChatCache {
  /** The key of a request, or null when its output is not reproducible (never cached). */
  keyOf(request: ModelRequest): string | null;
  get(key: string): Promise<CachedReply | undefined>;
  put(key: string, reply: CachedReply): void;
}

export type LimitDecision = { ok: true; info: RateLimitInfo } | { ok: false; bucket: string; retryAfterMs: number; info: RateLimitInfo };

export interface TokenReservation {
  /** Settles with the tokens really used; the rest goes back to the bucket. Idempotent. */
  settle(usedTokens: number): void;
  /** For a chat that never ran: everything goes back. */
  release(): void;
}

/** A send let through: its token reservation (null when it reserved none) and the chats bucket's state (the ack's `rateLimit`). */
export type Admission = { ok: true; reservation: TokenReservation | null; info: RateLimitInfo } | Extract<LimitDecision, { ok: false }>;

export interface ChatLimits {
  /** Takes one chat from the user's chats bucket. */
  chat(userId: string): Promise<LimitDecision>;
  /** Reserves `maxTokens` model tokens; settled when the task ends. */
  reserveModelTokens(userId: string, maxTokens: number): Promise<{ ok: true; reservation: TokenReservation } | Extract<LimitDecision, { ok: false }>>;
  /**
   * The limits of one send as one step (one round trip to a shared store): `maxTokens` model tokens (none when null,
   * as for a cache hit), then one chat. Tokens first: a refused chat gives the reservation back whole, while a refused
   * reservation takes no chat.
   */
  admit(userId: string, maxTokens: number | null): Promise<Admission>;
}

export type { CacheMode };
