/**
 * The chat service's ports (src/chat/ports.ts) that the Redis-backed stores implement, field for field, with every
 * read answered by a Promise, as a store across the network answers: ChatCache.get, ChatLimits.chat and
 * ChatLimits.reserveModelTokens. An embedded adapter that answers at once fits these shapes too.
 */
import type { CachedReply, LimitDecision, TokenReservation } from '../chat/ports.js';
import type { ModelRequest } from '../llm/provider.js';

export type { CachedReply, LimitDecision, TokenReservation };

export interface AsyncChatCache {
  /** The key of a request, or null when its output is not reproducible (never cached). */
  keyOf(request: ModelRequest): string | null;
  get(key: string): Promise<CachedReply | undefined>;
  put(key: string, reply: CachedReply): void;
}

export type Refusal = Extract<LimitDecision, { ok: false }>;

export interface AsyncChatLimits {
  /** Takes one chat from the user's chats bucket. */
  chat(userId: string): Promise<LimitDecision>;
  /** Reserves `maxTokens` model tokens; settled when the task ends. */
  reserveModelTokens(userId: string, maxTokens: number): Promise<{ ok: true; reservation: TokenReservation } | Refusal>;
}
