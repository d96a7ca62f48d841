/**
 * Redis for the tests: each hub gets its own key prefix
 * (`chatwire-test:<pid>:<random>:`), and every key under it is deleted when the
 * test file ends, passed or failed.
 *
 * The server is CHATWIRE_TEST_REDIS_URL, default redis://127.0.0.1:6379. Where
 * it does not answer, the Redis tests skip with a message; under CI (CI set)
 * they run and fail instead.
 */
import crypto from 'node:crypto';
import { after } from 'node:test';
import { Redis } from 'ioredis';
import { openRedis, type OpenRedisOptions, type RedisHub } from '../../src/cluster/redis.js';

export const TEST_REDIS_URL = process.env.CHATWIRE_TEST_REDIS_URL ?? 'redis://127.0.0.1:6379';
const RUN = `chatwire-test:${process.pid}:${crypto.randomBytes(4).toString('hex')}`;
let counter = 0;
const hubs = new Set<RedisHub>();

let reachable: Promise<string | null> | null = null;
/** null when the server answers, else why not. */
function unreachableReason(): Promise<string | null> {
  reachable ??= (async () => {
    const probe = new Redis(TEST_REDIS_URL, { lazyConnect: true, enableOfflineQueue: false, maxRetriesPerRequest: 0, retryStrategy: () => null });
    probe.on('error', () => {});
    try {
      await probe.connect();
      await probe.ping();
      return null;
    } catch (err) {
      return `Redis not reachable at ${TEST_REDIS_URL} (${(err as Error).message}); set CHATWIRE_TEST_REDIS_URL`;
    } finally {
      probe.disconnect();
    }
  })();
  return reachable;
}

/** `{ skip }` with the reason when Redis does not answer, unless CI is set (then the test runs and fails, saying why). */
export async function redisTestOptions(): Promise<{ skip?: string }> {
  const reason = await unreachableReason();
  if (reason === null || process.env.CI) return {};
  return { skip: reason };
}

/** A key prefix of this test process's own, for a server process started by the test; its keys are deleted after. */
export function testRedisPrefix(): string {
  counter += 1;
  return `${RUN}:${counter}:`;
}

/** A hub on the test server under a prefix of its own, ready; closed and its keys deleted when the file ends. */
export async function openTestRedis(options: OpenRedisOptions = {}): Promise<RedisHub> {
  const reason = await unreachableReason();
  if (reason !== null) throw new Error(reason);
  const hub = openRedis(TEST_REDIS_URL, { prefix: testRedisPrefix(), ...options });
  hubs.add(hub);
  await hub.ready(5000);
  return hub;
}

/** Deletes every key under `prefix`. */
export async function deleteKeys(redis: Redis, prefix: string): Promise<void> {
  let cursor = '0';
  do {
    const [next, keys] = await redis.scan(cursor, 'MATCH', `${prefix}*`, 'COUNT', 500);
    cursor = next;
    if (keys.length > 0) await redis.unlink(...keys);
  } while (cursor !== '0');
}

after(async () => {
  if (hubs.size === 0 && counter === 0) return;
  const cleaner = new Redis(TEST_REDIS_URL, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null });
  cleaner.on('error', () => {});
  try {
    await Promise.all([...hubs].map((h) => h.close()));
    await cleaner.connect();
    await deleteKeys(cleaner, `${RUN}:`);
  } catch {
    // Redis gone: nothing to delete.
  } finally {
    cleaner.disconnect();
  }
});

/** Cuts a hub's command connection, as when Redis stops answering this node; resolves once the hub reports it down. */
export async function cutRedis(hub: RedisHub): Promise<void> {
  const down = new Promise<void>((resolve) => {
    const off = hub.onState((state) => {
      if (state !== 'down') return;
      off();
      resolve();
    });
  });
  hub.command.disconnect();
  await down;
}

/** Reconnects a hub cut by cutRedis; resolves once its commands are answered again. */
export async function restoreRedis(hub: RedisHub): Promise<void> {
  hub.command.connect().catch(() => {});
  await hub.ready(5000);
}
