import type { Admission, ChatLimits } from '../chat/ports.js';
import { AppError } from '../protocol/index.js';
import type { RateLimits, Reservation } from './rate-limits.js';

/**
 * ChatLimits.admit over one process's rate limits (answered at once): tokens, then a chat, the reservation given
 * back when the chat is refused. Every refusal is counted by bucket (`refused`).
 */
export function admitLocally(limits: RateLimits, refused: (bucket: string) => void, userId: string, maxTokens: number | null): Admission {
  let reservation: Reservation | null = null;
  if (maxTokens !== null) {
    const reserved = limits.reserveModelTokens(userId, maxTokens);
    if (!reserved.ok) {
      refused(reserved.bucket);
      return reserved;
    }
    reservation = reserved.reservation;
  }
  const chat = limits.chat(userId);
  if (!chat.ok) {
    reservation?.release();
    refused(chat.bucket);
    return chat;
  }
  return { ok: true, reservation, info: chat.info };
}

/** The rate limits in the shape the chat service asks for (answered at once); every refusal is counted by bucket (`refused`). */
export function createChatLimits(limits: RateLimits, refused: (bucket: string) => void): ChatLimits {
  return {
    admit: (userId, maxTokens) => Promise.resolve(admitLocally(limits, refused, userId, maxTokens)),
    chat: (userId) => {
      const d = limits.chat(userId);
      if (!d.ok) refused(d.bucket);
      return Promise.resolve(d);
    },
    reserveModelTokens: (userId, maxTokens) => {
      const d = limits.reserveModelTokens(userId, maxTokens);
      if (!d.ok) refused(d.bucket);
      return Promise.resolve(d);
    },
  };
}

/** A connection let in, or the refusal to send. */
export type ConnectionAdmission = { ok: true } | { ok: false; error: AppError };

/** The per-user connection cap as the transports ask for it: a refusal is an AppError ready to send. */
export function connectionQuota(limits: RateLimits): {
  opened(userId: string): ConnectionAdmission;
  closed(userId: string): void;
} {
  return {
    opened: (userId) => {
      const d = limits.connectionOpened(userId);
      if (d.ok) return { ok: true };
      // 429 rather than 403 or 503: the user is over a quota (docs/rate-limits.md, "Connections").
      return { ok: false, error: new AppError('rate_limited', d.reason, d.retryAfterMs === undefined ? {} : { retryAfterMs: d.retryAfterMs }) };
    },
    closed: (userId) => limits.connectionClosed(userId),
  };
}

/** A user's RateLimit-Policy / RateLimit fields under the lower-case names every transport writes. */
export function rateLimitHeaders(limits: RateLimits): (userId: string | null) => Record<string, string> {
  return (userId) => {
    const h = limits.httpHeaders(userId);
    return { 'ratelimit-policy': h['RateLimit-Policy'], ratelimit: h.RateLimit };
  };
}
