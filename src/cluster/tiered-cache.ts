/**
 * The reply cache of a cluster node: the node's own cache (LMDB, src/cache/chat-cache.ts) first, Redis second, so
 * that a reply computed on one node is a hit on every other.
 *
 * get: the first level, else Redis; a reply found in Redis is also written to the first level, where the node finds
 * it next time without a round trip (it then lives there for the first level's own TTL, counted from that copy).
 * put: both levels. Redis values are checked against the cache's schema on read: a value that is not a reply is a
 * miss. Each expires after the cache TTL, and a reply over `maxValueBytes` stays on its node.
 * While Redis is down, or when a command fails, the first level alone answers.
 */
import type { z } from 'zod';
import { CachedReplySchema } from '../cache/response-cache.js';
import type { AsyncChatCache, CachedReply } from './ports.js';
import type { RedisHub } from './redis.js';
import { downReason, failureReason, type FallbackHook } from './scripts.js';

/** The first level: the embedded ChatCache (its get may answer at once or with a Promise). */
export interface FirstLevelCache {
  keyOf: AsyncChatCache['keyOf'];
  get(key: string): CachedReply | undefined | Promise<CachedReply | undefined>;
  put(key: string, reply: CachedReply): void;
}

/** A tiered cache's put resolves once Redis has the reply (or could not take it); it never rejects. */
export interface TieredChatCache extends AsyncChatCache {
  put(key: string, reply: CachedReply): Promise<void>;
}

export interface TieredChatCacheOptions {
  first: FirstLevelCache;
  hub: RedisHub;
  /** The cache TTL (CHATWIRE_CACHE_TTL_SEC in ms): each reply expires from Redis after it. */
  ttlMs: number;
  /** The model name stored with each reply, as the first level stores it. */
  model: string;
  /** Replies larger than this (their JSON, in bytes) are not put in Redis; default 512 KiB. */
  maxValueBytes?: number;
  onFallback?: FallbackHook;
}

const PART = 'reply cache';
export const DEFAULT_MAX_VALUE_BYTES = 512 * 1024;

export function createTieredChatCache(options: TieredChatCacheOptions): TieredChatCache {
  const { first, hub, model } = options;
  const ttlMs = Math.ceil(options.ttlMs);
  if (!(ttlMs > 0)) throw new RangeError(`ttlMs must be > 0, got ${options.ttlMs}`);
  const maxValueBytes = options.maxValueBytes ?? DEFAULT_MAX_VALUE_BYTES;
  const onFallback = options.onFallback ?? (() => {});
  const keyOf = (key: string) => hub.key(`reply:${key}`);

  /** The reply Redis holds under `key`, or undefined (absent, unreadable, or Redis did not answer). */
  async function second(key: string): Promise<CachedReply | undefined> {
    if (!hub.up) {
      onFallback(downReason(PART));
      return undefined;
    }
    let raw: string | null;
    try {
      raw = await hub.command.get(keyOf(key));
    } catch (err) {
      onFallback(failureReason(PART, err));
      return undefined;
    }
    if (raw === null) return undefined;
    // Not a reply (a damaged or foreign value): a miss; the put that follows the miss replaces it.
    const stored = parse(raw);
    if (stored === undefined) return undefined;
    return { chunks: stored.chunks, finishReason: stored.finishReason, usage: stored.usage };
  }

  return {
    keyOf: (request) => first.keyOf(request),
    async get(key) {
      const near = await first.get(key);
      if (near !== undefined) return near;
      const far = await second(key);
      if (far !== undefined) first.put(key, far);
      return far;
    },
    async put(key, reply) {
      first.put(key, reply);
      const value = JSON.stringify({ chunks: reply.chunks, finishReason: reply.finishReason, usage: reply.usage, model, createdAt: Date.now() });
      if (Buffer.byteLength(value, 'utf8') > maxValueBytes) return;
      if (!hub.up) return onFallback(downReason(PART));
      try {
        await hub.command.set(keyOf(key), value, 'PX', ttlMs);
      } catch (err) {
        onFallback(failureReason(PART, err));
      }
    },
  };
}

function parse(raw: string): z.infer<typeof CachedReplySchema> | undefined {
  let json: unknown;
  try {
    json = JSON.parse(raw);
  } catch {
    return undefined;
  }
  const parsed = CachedReplySchema.safeParse(json);
  return parsed.success ? parsed.data : undefined;
}
