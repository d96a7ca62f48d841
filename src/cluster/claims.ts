/**
 * Claims: a key held by one holder for a while, for single-flight (one task per identical request) and idempotency
 * (one chat per client message id). A claim is taken only if the key is free, lapses after its TTL unless
 * refreshed, and only its holder can refresh or release it. The memory store serves one process; the Redis store
 * (src/cluster/redis-claims.ts) the nodes of a cluster.
 */

export type ClaimResult = { won: true } | { won: false; holder: string };

export interface ClaimStore {
  /** Takes `key` for `value` for `ttlMs` if no one holds it; otherwise says who does. */
  claim(key: string, value: string, ttlMs: number): Promise<ClaimResult>;
  /**
   * Extends the claim to `ttlMs` from now if `value` still holds it; false otherwise (it lapsed, another took it, or
   * the store that holds it cannot answer now).
   */
  refresh(key: string, value: string, ttlMs: number): Promise<boolean>;
  /** Frees the key if `value` still holds it; false otherwise (nothing changes). */
  release(key: string, value: string): Promise<boolean>;
  close(): void;
}

export interface MemoryClaimStore extends ClaimStore {
  /** The value holding `key` now, if any (answered at once). */
  holder(key: string): string | undefined;
  /** Claims held now. */
  size(): number;
}

export interface MemoryClaimStoreOptions {
  /** Monotonic ms clock; performance.now() by default. */
  now?: () => number;
  /** How often lapsed claims are dropped; default 30 s. */
  sweepIntervalMs?: number;
}

/** A claim's TTL in whole ms (Redis's PX takes an integer), at least 1. */
export function claimTtlMs(ttlMs: number): number {
  if (!Number.isFinite(ttlMs) || ttlMs <= 0) throw new RangeError(`ttlMs must be a positive number, got ${ttlMs}`);
  return Math.ceil(ttlMs);
}

export function createMemoryClaimStore(options: MemoryClaimStoreOptions = {}): MemoryClaimStore {
  const now = options.now ?? (() => performance.now());
  const claims = new Map<string, { value: string; until: number }>();

  function live(key: string): { value: string; until: number } | undefined {
    const held = claims.get(key);
    if (held === undefined) return undefined;
    if (held.until > now()) return held;
    claims.delete(key);
    return undefined;
  }

  function sweep(): void {
    const t = now();
    for (const [key, held] of claims) if (held.until <= t) claims.delete(key);
  }
  const timer = setInterval(sweep, options.sweepIntervalMs ?? 30_000);
  timer.unref();

  return {
    async claim(key, value, ttlMs) {
      const ms = claimTtlMs(ttlMs);
      const held = live(key);
      if (held !== undefined) return { won: false, holder: held.value };
      claims.set(key, { value, until: now() + ms });
      return { won: true };
    },
    async refresh(key, value, ttlMs) {
      const ms = claimTtlMs(ttlMs);
      const held = live(key);
      if (held === undefined || held.value !== value) return false;
      held.until = now() + ms;
      return true;
    },
    async release(key, value) {
      const held = live(key);
      if (held === undefined || held.value !== value) return false;
      claims.delete(key);
      return true;
    },
    holder: (key) => live(key)?.value,
    size() {
      sweep();
      return claims.size;
    },
    close() {
      clearInterval(timer);
      claims.clear();
    },
  };
}
