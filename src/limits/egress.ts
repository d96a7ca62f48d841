import { ClockedBucket, policy, refillMs } from './token-bucket.js';

export type EgressDecision = { ok: true } | { ok: false; bucket: 'egress'; retryAfterMs: number };

/**
 * Per-user bytes sent in answer to requests that send much more than they take: a `chat.resume` or SSE catch-up
 * replay, a history page, a task snapshot. An 80-byte request can be answered with hundreds of kilobytes; charged
 * by what it sends, a user (or many) cannot turn the server into an amplifier. Live streaming is not charged: the
 * model-token bucket already bounds it.
 */
export interface EgressLimits {
  /**
   * Takes `bytes` from the user's bucket, or refuses with the wait until they are there. A reply larger than the
   * whole bucket waits for a full bucket and then puts the user in debt for the rest, as model tokens do.
   */
  charge(userId: string, bytes: number): EgressDecision;
  /** Drops users idle for idleMs whose bucket is full; returns how many. Runs on its own timer too. */
  sweep(): number;
  /** Users tracked now. */
  size(): number;
  close(): void;
}

export interface EgressLimitsOptions {
  bytesPerMinute: number;
  /** A user untouched this long with a full bucket is dropped (it would come back with a full one anyway). */
  idleMs?: number;
  sweepIntervalMs?: number;
  now?: () => number;
}

interface EgressUser {
  bucket: ClockedBucket;
  lastSeen: number;
}

export function createEgressLimits(options: EgressLimitsOptions): EgressLimits {
  const now = options.now ?? (() => performance.now());
  const p = policy(options.bytesPerMinute, 60_000);
  // An idle user's bucket is full after one refill from empty: dropping it then loses nothing.
  const idleMs = options.idleMs ?? Math.max(2 * 60_000, Math.ceil(refillMs(p, p.capacity)));
  const users = new Map<string, EgressUser>();

  function charge(userId: string, bytes: number): EgressDecision {
    if (!(bytes > 0)) return { ok: true };
    let user = users.get(userId);
    if (user === undefined) {
      user = { bucket: new ClockedBucket(p, now), lastSeen: now() };
      users.set(userId, user);
    } else user.lastSeen = now();
    const whole = Math.ceil(bytes);
    const amount = Math.min(whole, p.capacity);
    if (!user.bucket.tryRemoveTokens(amount)) return { ok: false, bucket: 'egress', retryAfterMs: user.bucket.msUntilAvailable(amount) };
    if (whole > amount) user.bucket.adjust(amount - whole);
    return { ok: true };
  }

  function sweep(): number {
    const t = now();
    let dropped = 0;
    for (const [userId, user] of users) {
      if (t - user.lastSeen < idleMs || !user.bucket.isFull()) continue;
      users.delete(userId);
      dropped += 1;
    }
    return dropped;
  }

  const timer = setInterval(sweep, options.sweepIntervalMs ?? 30_000);
  timer.unref();
  return {
    charge,
    sweep,
    size: () => users.size,
    close() {
      clearInterval(timer);
      users.clear();
    },
  };
}
