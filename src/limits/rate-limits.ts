import type { RateLimitInfo } from '../protocol/index.js';
import { rateLimitField, rateLimitPolicyField, type LimitField, type PolicyField } from './ratelimit-headers.js';
import { ClockedBucket, policy, refillMs, type BucketPolicy } from './token-bucket.js';

export type BucketName = 'messages' | 'chats' | 'tokens';

/**
 * `info` describes the bucket that was charged (or refused): `limit` is its
 * capacity, `remaining` the whole units left, `resetMs` the ms until it is
 * full again (0 when full) — the ack's `rateLimit` field.
 */
export type Allowed = { ok: true; info: RateLimitInfo };
export type Denied = { ok: false; bucket: BucketName; retryAfterMs: number; info: RateLimitInfo };
export type Decision = Allowed | Denied;

/** Model tokens taken at send; the task's real usage is settled when it ends. */
export interface Reservation {
  /** Tokens taken from the bucket (maxTokens, or the bucket's capacity if that is smaller). */
  readonly reserved: number;
  /**
   * Charges `usedTokens`: the unused part of the reservation goes back, usage
   * past it is taken as debt that later reservations wait out. Only the first
   * settle or release counts. A usage that is not a finite number >= 0 is
   * charged as the whole reservation (no refund): a broken usage report must
   * not hand out free tokens. One above the chat's maxTokens is charged as
   * maxTokens: it must not put the user in debt for days either.
   */
  settle(usedTokens: number): void;
  /** For a chat that never ran (overloaded, store failed): everything goes back. Same as settle(0). */
  release(): void;
}

export type ReserveResult = { ok: true; reservation: Reservation; info: RateLimitInfo } | Denied;

export type ConnectionDecision = { ok: true; open: number; limit: number } | { ok: false; open: number; limit: number; reason: string; retryAfterMs?: number };

export interface RateLimitHeaders {
  'RateLimit-Policy': string;
  RateLimit: string;
}

/**
 * Per-user limits. Everything is keyed by user id, so all of a user's
 * connections (and HTTP calls) share one set of buckets. A Redis-backed
 * implementation for several processes would implement this same interface.
 */
export interface RateLimits {
  /** One inbound frame (or HTTP call). */
  frame(userId: string): Decision;
  /** One chat.send. */
  chat(userId: string): Decision;
  /** Reserves up to `maxTokens` model tokens for one task (an integer >= 1). */
  reserveModelTokens(userId: string, maxTokens: number): ReserveResult;
  /** The state of one bucket without charging it. */
  peek(userId: string, bucket: BucketName): RateLimitInfo;
  /**
   * `RateLimit-Policy` and `RateLimit` for an HTTP response to this user (charges nothing). `null`: a caller that
   * could not be identified (a 401); it holds no bucket, so it gets what a user the server never charged holds.
   */
  httpHeaders(userId: string | null): RateLimitHeaders;
  /** Counts a new connection; refused past maxConnectionsPerUser (then do not call connectionClosed). */
  connectionOpened(userId: string): ConnectionDecision;
  /**
   * A connection of this user was closed for flooding (it kept sending after rate_limited): connectionOpened
   * refuses its new connections, with a retryAfterMs, for FLOOD_PENALTY_MS doubled with every further flood
   * (at most FLOOD_PENALTY_MAX_MS; forgotten after FLOOD_FORGET_MS without one) and at least until its frame
   * bucket is full again, so that it cannot come straight back and flood again. Call connectionClosed for that
   * connection as usual.
   */
  floodClosed(userId: string): void;
  /**
   * Counts one frame of this user refused for its rate, on any connection; returns how many were refused in the
   * current window of REFUSAL_WINDOW_MS, all its connections together (what the flood close is decided on).
   */
  frameRefused(userId: string): number;
  /** A connection that was counted by connectionOpened has closed. */
  connectionClosed(userId: string): void;
  /**
   * Lets an anonymous user in: true if it is tracked already or there is room (it is tracked from then on, until the
   * sweep drops it), false once maxAnonymousUsers anonymous users are tracked. Only users let in here count as
   * anonymous.
   */
  admitAnonymous(userId: string): boolean;
  /** Drops users idle for idleMs whose buckets are full; returns how many. Runs on its own timer too. */
  sweep(): number;
  /** Users tracked now. */
  size(): number;
  close(): void;
}

export interface RateLimitsOptions {
  messagesPerSecond: number;
  chatsPerMinute: number;
  modelTokensPerMinute: number;
  maxConnectionsPerUser: number;
  /** Anonymous users (see admitAnonymous) tracked at once; default: no bound. */
  maxAnonymousUsers?: number;
  /** A user untouched this long (and with full buckets, no connection, no open reservation) is dropped. */
  idleMs?: number;
  /** How often the sweep runs. Default: every 30 s (or idleMs if shorter). */
  sweepIntervalMs?: number;
  /** Monotonic ms clock; performance.now() by default (the same clock the limiter package uses). */
  now?: () => number;
}

const DEFAULT_IDLE_MS = 2 * 60_000;
const DEFAULT_SWEEP_INTERVAL_MS = 30_000;
/** After a connection is closed for flooding: the first wait before the user may connect again, doubled per flood. */
export const FLOOD_PENALTY_MS = 1000;
export const FLOOD_PENALTY_MAX_MS = 60_000;
/** Floods are forgotten after this long without one. */
export const FLOOD_FORGET_MS = 10 * 60_000;
/** The window frameRefused counts refusals in. */
export const REFUSAL_WINDOW_MS = 1000;

class UserState {
  // Created on first use: most users only ever send frames, and a missing
  // bucket means a full one, so there is nothing to keep until it is charged.
  messages: ClockedBucket | null = null;
  chats: ClockedBucket | null = null;
  tokens: ClockedBucket | null = null;
  connections = 0;
  reservations = 0;
  // Connections closed for flooding (recently), the end of the last one's penalty, and whether connectionOpened
  // still has to hold new connections back. The sweep keeps a user whose penalty is still running.
  floods = 0;
  floodedUntil = 0;
  floodPending = false;
  /** Let in by admitAnonymous: counted against maxAnonymousUsers while it is tracked. */
  anonymous = false;
  // Frames refused for the rate since refusalsSince (a window of REFUSAL_WINDOW_MS), over all connections.
  refusals = 0;
  refusalsSince = -Infinity;
  constructor(public lastSeen: number) {}
}

export function createRateLimits(options: RateLimitsOptions): RateLimits {
  const now = options.now ?? (() => performance.now());
  const policies: Record<BucketName, BucketPolicy> = {
    messages: policy(options.messagesPerSecond, 1000),
    chats: policy(options.chatsPerMinute, 60_000),
    tokens: policy(options.modelTokensPerMinute, 60_000),
  };
  const maxConnections = options.maxConnectionsPerUser;
  if (!Number.isInteger(maxConnections) || maxConnections < 1) {
    throw new RangeError(`maxConnectionsPerUser must be an integer >= 1, got ${maxConnections}`);
  }

  // Why dropping an idle user cannot give it more than its rate: a dropped
  // user comes back with full buckets, so dropping is harmless exactly when
  // its buckets are already full. A bucket charged at most down to empty is
  // full again after refillMs(capacity) — the longest of those (the
  // per-minute buckets: 60 s at integer rates) must not exceed idleMs, so an
  // idle user's buckets are full by the time it qualifies. A bucket in debt
  // (model tokens used past a reservation) takes longer; the sweep checks
  // fullness itself and keeps such a user until the debt is paid.
  const longestRefillMs = Math.max(...Object.values(policies).map((p) => refillMs(p, p.capacity)));
  const idleMs = options.idleMs ?? Math.max(DEFAULT_IDLE_MS, Math.ceil(longestRefillMs));
  if (!(idleMs >= longestRefillMs)) {
    throw new RangeError(`idleMs (${idleMs}) must be at least the longest bucket refill time (${Math.ceil(longestRefillMs)} ms)`);
  }
  const sweepIntervalMs = options.sweepIntervalMs ?? Math.min(DEFAULT_SWEEP_INTERVAL_MS, idleMs);
  if (!Number.isFinite(sweepIntervalMs) || sweepIntervalMs <= 0) {
    throw new RangeError(`sweepIntervalMs must be a positive number, got ${sweepIntervalMs}`);
  }

  const policyField = rateLimitPolicyField(
    (Object.keys(policies) as BucketName[]).map((name): PolicyField => {
      const p = policies[name];
      return {
        name,
        quota: p.capacity,
        windowSec: Math.max(1, Math.round(refillMs(p, p.capacity) / 1000)),
        ...(name === 'tokens' ? { unit: 'model-tokens' } : {}),
      };
    }),
  );

  const maxAnonymous = options.maxAnonymousUsers ?? Infinity;
  if (!(maxAnonymous >= 1)) throw new RangeError(`maxAnonymousUsers must be >= 1, got ${maxAnonymous}`);

  const users = new Map<string, UserState>();
  let anonymousUsers = 0;

  function touch(userId: string): UserState {
    const t = now();
    let user = users.get(userId);
    if (user === undefined) {
      user = new UserState(t);
      users.set(userId, user);
    } else {
      user.lastSeen = t;
    }
    return user;
  }

  function bucketOf(user: UserState, name: BucketName): ClockedBucket {
    let bucket = user[name];
    if (bucket === null) {
      bucket = new ClockedBucket(policies[name], now);
      user[name] = bucket;
    }
    return bucket;
  }

  function infoOf(bucket: ClockedBucket): RateLimitInfo {
    return { limit: bucket.bucketSize, remaining: bucket.remaining(), resetMs: bucket.msUntilFull() };
  }

  function fullInfo(name: BucketName): RateLimitInfo {
    const p = policies[name];
    return { limit: p.capacity, remaining: p.capacity, resetMs: 0 };
  }

  function take(userId: string, name: BucketName, count: number): Decision {
    const bucket = bucketOf(touch(userId), name);
    if (bucket.tryRemoveTokens(count)) return { ok: true, info: infoOf(bucket) };
    return { ok: false, bucket: name, retryAfterMs: bucket.msUntilAvailable(count), info: infoOf(bucket) };
  }

  function reserveModelTokens(userId: string, maxTokens: number): ReserveResult {
    if (!Number.isInteger(maxTokens) || maxTokens < 1) throw new RangeError(`maxTokens must be an integer >= 1, got ${maxTokens}`);
    // More than the bucket holds could never be granted; take a full bucket
    // instead, and settle() charges anything past it as debt.
    const amount = Math.min(maxTokens, policies.tokens.capacity);
    const decision = take(userId, 'tokens', amount);
    if (!decision.ok) return decision;
    const user = users.get(userId)!;
    const bucket = user.tokens!;
    user.reservations += 1;
    let open = true;
    const finish = (used: number) => {
      if (!open) return;
      open = false;
      user.reservations -= 1;
      user.lastSeen = now();
      bucket.adjust(amount - used);
    };
    const reservation: Reservation = {
      reserved: amount,
      // A reply never holds more than the maxTokens it asked for: a larger count (a bogus upstream usage report)
      // would put the user in debt for days; it is charged as the whole maxTokens instead.
      settle: (usedTokens) => finish(Number.isFinite(usedTokens) && usedTokens >= 0 ? Math.min(usedTokens, maxTokens) : amount),
      release: () => finish(0),
    };
    return { ok: true, reservation, info: decision.info };
  }

  function peek(userId: string, name: BucketName): RateLimitInfo {
    const bucket = users.get(userId)?.[name];
    return bucket ? infoOf(bucket) : fullInfo(name);
  }

  function httpHeaders(userId: string | null): RateLimitHeaders {
    const user = userId === null ? undefined : users.get(userId);
    const limits = (Object.keys(policies) as BucketName[]).map((name): LimitField => {
      const bucket = user?.[name];
      const p = policies[name];
      const remaining = bucket ? bucket.remaining() : p.capacity;
      // With r units left, the next one arrives after this long: within it the client can use no more than r.
      const nextMs = bucket ? bucket.msUntilNextUnit() : refillMs(p, 1);
      return { name, remaining, windowSec: Math.ceil(nextMs / 1000) };
    });
    return { 'RateLimit-Policy': policyField, RateLimit: rateLimitField(limits) };
  }

  function connectionOpened(userId: string): ConnectionDecision {
    const user = touch(userId);
    if (user.floodPending) {
      const retryAfterMs = Math.max(Math.ceil(user.floodedUntil - now()), user.messages?.msUntilFull() ?? 0);
      if (retryAfterMs > 0) {
        return {
          ok: false,
          open: user.connections,
          limit: maxConnections,
          reason: `a connection of this user was closed for sending past its rate limit; reconnect in ${retryAfterMs} ms`,
          retryAfterMs,
        };
      }
      user.floodPending = false;
    }
    if (user.connections >= maxConnections) {
      return {
        ok: false,
        open: user.connections,
        limit: maxConnections,
        reason: `too many connections for this user: ${user.connections} open, at most ${maxConnections} allowed`,
      };
    }
    user.connections += 1;
    return { ok: true, open: user.connections, limit: maxConnections };
  }

  function connectionClosed(userId: string): void {
    const user = users.get(userId);
    // A close without a counted open (refused, or reported twice) must not free a slot it never held.
    if (user === undefined || user.connections === 0) return;
    user.connections -= 1;
    user.lastSeen = now();
  }

  const isFull = (bucket: ClockedBucket | null) => bucket === null || bucket.isFull();

  function sweep(): number {
    const t = now();
    let dropped = 0;
    for (const [userId, user] of users) {
      if (t - user.lastSeen < idleMs || user.connections > 0 || user.reservations > 0 || user.floodedUntil > t) continue;
      if (!isFull(user.messages) || !isFull(user.chats) || !isFull(user.tokens)) continue;
      users.delete(userId);
      if (user.anonymous) anonymousUsers -= 1;
      dropped += 1;
    }
    return dropped;
  }

  const timer = setInterval(sweep, sweepIntervalMs);
  timer.unref();

  return {
    frame: (userId) => take(userId, 'messages', 1),
    chat: (userId) => take(userId, 'chats', 1),
    reserveModelTokens,
    peek,
    httpHeaders,
    connectionOpened,
    floodClosed(userId) {
      const user = touch(userId);
      const t = now();
      // Several connections closed for one flood (spread over them) are one strike: the penalty running stands.
      if (user.floodPending && t < user.floodedUntil) return;
      // Strikes are forgotten after a quiet spell; otherwise every flood doubles the wait, so a client that
      // floods on every reconnect soon gets one chance a minute.
      if (t - user.floodedUntil > FLOOD_FORGET_MS) user.floods = 0;
      user.floods += 1;
      user.floodPending = true;
      user.floodedUntil = t + Math.min(FLOOD_PENALTY_MAX_MS, FLOOD_PENALTY_MS * 2 ** Math.min(user.floods - 1, 16));
    },
    frameRefused(userId) {
      const user = touch(userId);
      const t = now();
      if (t - user.refusalsSince > REFUSAL_WINDOW_MS) {
        user.refusalsSince = t;
        user.refusals = 0;
      }
      return ++user.refusals;
    },
    connectionClosed,
    admitAnonymous(userId) {
      if (users.has(userId)) {
        touch(userId);
        return true;
      }
      if (anonymousUsers >= maxAnonymous) return false;
      touch(userId).anonymous = true;
      anonymousUsers += 1;
      return true;
    },
    sweep,
    size: () => users.size,
    close() {
      clearInterval(timer);
      users.clear();
      anonymousUsers = 0;
    },
  };
}
