/**
 * The chat service's ports (src/chat/ports.ts) that the Redis-backed stores implement: ChatCache and ChatLimits,
 * whose reads answer with Promises, as a store across the network does.
 */
import type { CachedReply, ChatCache, ChatLimits, LimitDecision, TokenReservation } from '../chat/ports.js';

export type { CachedReply, LimitDecision, TokenReservation };
export type AsyncChatCache = ChatCache;
export type AsyncChatLimits = ChatLimits;
export type Refusal = Extract<LimitDecision, { ok: false }>;
