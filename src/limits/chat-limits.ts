import type { ChatLimits } from '../chat/ports.js';
import { AppError } from '../protocol/index.js';
import type { RateLimits } from './rate-limits.js';

/** The rate limits in the shape the chat service asks for (answered at once); every refusal is counted by bucket (`refused`). */
export function createChatLimits(limits: RateLimits, refused: (bucket: string) => void): ChatLimits {
  return {
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
