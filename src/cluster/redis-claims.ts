/**
 * Claims across the nodes of a cluster: SET NX PX to take a key, and Lua compare-and-set / compare-and-delete to
 * refresh and release it only while the caller's value still holds it.
 *
 * While Redis is down, or when a command fails, claims are taken in the node's own memory store. Single-flight and
 * idempotency then hold per node only: two nodes may each run a task for the same request, or each accept a retry
 * of the same client message, until Redis answers again. Claims taken in memory stay there until released or
 * lapsed; while one is held, this node's own claims on that key (Redis or not) lose to it, so a node never runs two
 * holders of one key itself across the switch back.
 */
import { claimTtlMs, createMemoryClaimStore, type ClaimResult, type ClaimStore, type MemoryClaimStore } from './claims.js';
import type { RedisHub } from './redis.js';
import { downReason, failureReason, redisScript, type FallbackHook } from './scripts.js';

/** Takes KEYS[1] for ARGV[1] for ARGV[2] ms if free: {1}, else {0, holder}. */
const claimScript = redisScript(`
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
return {0, redis.call('GET', KEYS[1])}
`);

const refreshScript = redisScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
`);

const releaseScript = redisScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
`);

export interface RedisClaimStoreOptions {
  hub: RedisHub;
  /** Where claims go while Redis cannot answer; a memory store of its own by default (closed with this store then). */
  fallback?: MemoryClaimStore;
  onFallback?: FallbackHook;
}

const PART = 'claims';

export function createRedisClaimStore(options: RedisClaimStoreOptions): ClaimStore {
  const { hub } = options;
  const memory = options.fallback ?? createMemoryClaimStore();
  const ownsMemory = options.fallback === undefined;
  const onFallback = options.onFallback ?? (() => {});
  const keyOf = (key: string) => [hub.key(`claim:${key}`)];

  /** The answer of `viaRedis`, or of `locally` while Redis cannot answer. */
  async function answer<T>(viaRedis: () => Promise<T>, locally: () => Promise<T>): Promise<T> {
    if (!hub.up) {
      onFallback(downReason(PART));
      return locally();
    }
    try {
      return await viaRedis();
    } catch (err) {
      onFallback(failureReason(PART, err));
      return locally();
    }
  }

  return {
    async claim(key, value, ttlMs) {
      const ms = claimTtlMs(ttlMs);
      const local = memory.holder(key);
      if (local !== undefined && local !== value) return { won: false, holder: local };
      return answer<ClaimResult>(
        async () => {
          const [won, holder] = (await claimScript(hub.command, keyOf(key), [value, ms])) as [number, string | null];
          return won === 1 ? { won: true } : { won: false, holder: String(holder) };
        },
        () => memory.claim(key, value, ms),
      );
    },
    async refresh(key, value, ttlMs) {
      const ms = claimTtlMs(ttlMs);
      const inMemory = await memory.refresh(key, value, ms);
      const inRedis = await answer(
        async () => Number(await refreshScript(hub.command, keyOf(key), [value, ms])) === 1,
        async () => false,
      );
      return inMemory || inRedis;
    },
    async release(key, value) {
      const inMemory = await memory.release(key, value);
      const inRedis = await answer(
        async () => Number(await releaseScript(hub.command, keyOf(key), [value])) === 1,
        async () => false,
      );
      return inMemory || inRedis;
    },
    close() {
      if (ownsMemory) memory.close();
    },
  };
}
