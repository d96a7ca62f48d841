/**
 * Cluster mode's parts, opened once for a node: PostgreSQL (migrated under the
 * advisory lock) with the chat and marketplace stores on it, and Redis with
 * the bus, the task log, the shared buckets, connection cap, reply cache and
 * claims. src/app.ts picks these or the embedded ones; the chat service and the
 * transports see the same interfaces either way.
 *
 * PostgreSQL is required: a node that cannot reach it at start stops, and
 * /readyz says 503 while it is unreachable later. Redis is not: a node starts
 * without it (degraded: its own buckets, cache and single-flight), says so in
 * /readyz, a metric and one log line per change, and rejoins when it answers.
 */
import type { Logger } from 'pino';
import type { ChatCache, ChatLimits } from '../chat/ports.js';
import type { Config } from '../config.js';
import type { ChatStore } from '../db/chat-store.js';
import type { MarketplaceStore } from '../db/marketplace-store.js';
import { openPostgres, type Pg } from '../db/pg.js';
import { createPgChatStore, type PgChatStore } from '../db/pg-chat-store.js';
import { createPgMarketplaceStore } from '../db/pg-marketplace-store.js';
import { migratePg } from '../db/pg-migrate.js';
import { describeStorageError } from '../db/storage-health.js';
import type { RateLimits } from '../limits/rate-limits.js';
import type { Metrics } from '../metrics/metrics.js';
import type { ReadinessCheck } from '../transport/deps.js';
import { createRedisBus, type NodeBus } from './bus.js';
import { createRedisClaimStore } from './redis-claims.js';
import type { ClaimStore } from './claims.js';
import { createRedisChatLimits } from './redis-buckets.js';
import { createRedisConnectionQuota, type SharedConnectionQuota } from './redis-connections.js';
import { openRedis, redact, type RedisHub } from './redis.js';
import { createRedisTaskLog } from './redis-task-log.js';
import { nodeLost, type TaskLog } from './task-log.js';
import { createTieredChatCache, type FirstLevelCache } from './tiered-cache.js';

export interface ClusterParts {
  sql: Pg;
  hub: RedisHub;
  bus: NodeBus;
  store: ChatStore;
  marketplaceStore: MarketplaceStore;
  taskLog: TaskLog;
  claims: ClaimStore;
  readiness: ReadinessCheck[];
  /** The user buckets (chats, model tokens) shared by every node, on top of this node's own. */
  limits(local: RateLimits, refused: (bucket: string) => void): ChatLimits;
  /** The per-user connection cap across nodes. */
  connections(local: RateLimits): SharedConnectionQuota;
  /** LMDB first, Redis second. */
  cache(first: FirstLevelCache): ChatCache;
  close(): Promise<void>;
}

/** How often each node looks in PostgreSQL for tasks whose end was lost with their node (see staleTaskSweep). */
export const STALE_TASK_SWEEP_MS = 30_000;

export interface OpenClusterOptions {
  nodeId: string;
  metrics: Metrics;
  log: Logger;
}

export async function openCluster(config: Config & { databaseUrl: string; redisUrl: string }, options: OpenClusterOptions): Promise<ClusterParts> {
  const { nodeId, metrics, log } = options;
  const onQuery = (op: string) => metrics.dbQueries.tally(op).inc();
  const sql = openPostgres(config.databaseUrl, { applicationName: `chatwire ${nodeId}` });
  let hub: RedisHub | null = null;
  try {
    const applied = await migratePg(sql);
    if (applied.length > 0) log.info({ migrations: applied }, 'database migrated');
    const store = createPgChatStore(sql, { nodeId, onQuery, onCommit: (seconds) => metrics.dbCommitSeconds.observe(seconds) });
    const marketplaceStore = createPgMarketplaceStore(sql, { onQuery });
    const redis = openRedis(config.redisUrl, { prefix: config.redisPrefix });
    hub = redis;
    watchRedis(redis, metrics, log);
    await redis.ready(5000).catch(() => {});
    const bus = createRedisBus(redis);
    // One line per part when it first falls back; the counter has every operation.
    const warned = new Set<string>();
    const onFallback = (reason: string) => {
      const part = reason.slice(0, reason.indexOf(':')) || reason;
      metrics.redisFallbacks.inc({ part });
      if (warned.has(part) || redis.up) return;
      warned.add(part);
      log.warn({ part, reason }, 'Redis unreachable: this node answers alone (its own buckets, cache and single-flight) until it is back');
    };
    redis.onState((state) => {
      if (state === 'up') warned.clear();
    });
    const taskLog = createRedisTaskLog({
      hub: redis,
      bus,
      nodeId,
      retentionMs: config.taskRetentionMs,
      log,
      onLost: (taskId, terminal) => {
        metrics.nodesLost.inc();
        log.warn({ taskId }, 'the node running a task stopped renewing its lease: the task ended node_lost');
        store.failUnfinished(taskId, 'node_lost', terminal.message).catch((err: unknown) => {
          log.error({ err, taskId }, 'marking a task of a lost node failed in storage');
        });
      },
    });
    const staleSweep = staleTaskSweep(store, config.taskTimeoutMs, metrics, log);
    const claims = createRedisClaimStore({ hub: redis, onFallback });
    const readiness: ReadinessCheck[] = [
      {
        name: 'postgres',
        check: async () => {
          try {
            await sql`SELECT 1`.execute();
          } catch (err) {
            throw new Error(describeStorageError(err) ?? (err as Error).message);
          }
        },
      },
      {
        name: 'redis',
        optional: true,
        check: () => {
          if (!redis.up) throw new Error(`not reachable at ${redact(config.redisUrl)}; this node runs on its own buckets, cache and single-flight`);
        },
      },
    ];
    let closed = false;
    return {
      sql,
      hub: redis,
      bus,
      store,
      marketplaceStore,
      taskLog,
      claims,
      readiness,
      limits: (local, refused) =>
        createRedisChatLimits({
          hub: redis,
          local,
          chatsPerMinute: config.chatsPerMinute,
          modelTokensPerMinute: config.modelTokensPerMinute,
          refused,
          onFallback,
        }),
      connections: (local) => createRedisConnectionQuota({ hub: redis, local, nodeId, onFallback }),
      cache: (first) => createTieredChatCache({ first, hub: redis, ttlMs: config.cacheTtlSec * 1000, model: config.model, onFallback }),
      async close() {
        if (closed) return;
        closed = true;
        clearInterval(staleSweep);
        await taskLog.close();
        bus.close();
        claims.close();
        await store.close();
        await redis.close();
        await sql.end({ timeout: 5 });
      },
    };
  } catch (err) {
    await hub?.close();
    await sql.end({ timeout: 1 });
    throw err;
  }
}

/**
 * The backstop under the lease sweep: a node that sees another's lease lapse marks its tasks node_lost in
 * PostgreSQL, but if that node dies too before it does, or PostgreSQL is unreachable then, nobody else would (the
 * lease is gone from Redis). Every node therefore ends, every STALE_TASK_SWEEP_MS, the tasks still unfinished in
 * PostgreSQL that began more than twice the model call's deadline ago, plus a minute: no task runs that long (its
 * call is stopped at the deadline, waiting for a worker included), so such a row is one whose end was lost.
 * The update is idempotent: nodes sweeping at once end each row once.
 */
export function staleTaskSweep(
  store: Pick<PgChatStore, 'failStale'>,
  taskTimeoutMs: number,
  metrics: Pick<Metrics, 'nodesLost'>,
  log: Pick<Logger, 'warn'>,
  everyMs = STALE_TASK_SWEEP_MS,
): NodeJS.Timeout {
  const maxAgeMs = 2 * taskTimeoutMs + 60_000;
  const { message } = nodeLost('');
  let sweeping = false;
  const timer = setInterval(() => {
    if (sweeping) return;
    sweeping = true;
    store
      .failStale(Date.now() - maxAgeMs, 'node_lost', message)
      .then((ended) => {
        if (ended.length === 0) return;
        metrics.nodesLost.inc(ended.length);
        log.warn({ taskIds: ended.slice(0, 20), count: ended.length }, 'tasks left unfinished by a lost node were ended node_lost');
      })
      // PostgreSQL unreachable: /readyz says so; the next sweep looks again.
      .catch(() => {})
      .finally(() => {
        sweeping = false;
      });
  }, everyMs);
  timer.unref();
  return timer;
}

/** The redis_up gauge and one log line per change of state. */
function watchRedis(hub: RedisHub, metrics: Metrics, log: Logger): void {
  metrics.redisUp.set(0);
  let seenUp = false;
  hub.onState((state) => {
    metrics.redisUp.set(state === 'up' ? 1 : 0);
    if (state === 'up') {
      if (seenUp) log.info('Redis is back: buckets, cache, single-flight and task logs are shared again');
      seenUp = true;
    } else {
      log.warn('Redis unreachable: this node runs degraded on its own buckets, cache and single-flight; tasks stream to readers on this node');
    }
  });
}
