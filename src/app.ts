/**
 * Wires every part of chatwire together, in one visible place: storage, the
 * model pool, the chat service, limits, auth and the transport. Each part's
 * adapters live in its own folder; this file only builds the parts and connects them. Tests and
 * benchmarks start a real server with createApp(config) on port 0.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import { createConfiguredAuth, warnAboutAuthSettings } from './auth/configured-auth.js';
import { originPolicy } from './auth/origin-policy.js';
import { cacheReadiness, createChatCache } from './cache/chat-cache.js';
import { openResponseCache, type ResponseCache } from './cache/response-cache.js';
import { createChatService, type ChatService } from './chat/chat-service.js';
import { startIdempotencyPruning } from './chat/idempotency.js';
import { clusterMode, type Config } from './config.js';
import { openCluster, type ClusterParts } from './cluster/wiring.js';
import type { MarketplaceStore } from './db/marketplace-store.js';
import { createLocalBus, type NodeBus } from './cluster/bus.js';
import { randomBase64url } from './random-id.js';
import { createChatStore, type ChatStore } from './db/chat-store.js';
import { databaseFile } from './db/data-file.js';
import { startCheckpointer } from './db/checkpointer.js';
import { Database } from './db/database.js';
import { createSqliteMarketplaceStore } from './db/marketplace-queries.js';
import { migrate } from './db/migrate.js';
import { probeDataDir, storageReadiness } from './db/storage-health.js';
import { backendFingerprint } from './llm/backend.js';
import { DEV_DEFAULT_MAX_TOKENS } from './llm/dev.js';
import { createModelPool, workerBalance, type ModelPool } from './llm/pool.js';
import { createMarketplaceService, type MarketplaceService } from './marketplace/marketplace-service.js';
import { providerSettingsFrom } from './llm/provider.js';
import { connectionQuota, createChatLimits, rateLimitHeaders } from './limits/chat-limits.js';
import { createEgressLimits, type EgressLimits } from './limits/egress.js';
import { createRateLimits, type RateLimits } from './limits/rate-limits.js';
import { createMetrics, type Metrics } from './metrics/metrics.js';
import { createPendingAdmission, type PendingAdmission } from './transport/admission.js';
import type { Authenticator, ReadinessCheck, TransportDeps } from './transport/deps.js';
import { createFdGuard, raiseFdLimit } from './transport/fd-limit.js';
import { asProvider, choiceFingerprint, choiceName, type ProviderChoice } from './llm/custom-provider.js';
import { createInlinePool } from './llm/inline-pool.js';
import { createBufferBudget, type BufferBudget } from './transport/buffer-budget.js';
import { startHttpServer, type HttpServer } from './transport/server.js';
import { lockDataDir } from './db/data-dir-lock.js';

export interface App {
  readonly port: number;
  readonly metrics: Metrics;
  readonly server: HttpServer;
  /** Graceful shutdown: stop accepting, cancel running tasks and store them, flush, close everything. */
  close(): Promise<void>;
}

export interface AppOptions {
  log: Logger;
  /** How the transports are served (createChatwire's listen and attach); default: chatwire's own uWS app on config.host:config.port. */
  serve?: (deps: TransportDeps) => Promise<HttpServer>;
  /** Identifies callers in place of the JWT verifier (createChatwire's `authenticate` hook). */
  auth?: Authenticator;
  /** A custom model provider in place of config.llm (createChatwire's `provider`). */
  provider?: ProviderChoice;
}

export const CACHE_DIR = 'cache';
export { DATABASE_FILE_NAME as SQLITE_FILE } from './db/data-file.js';

type Closer = () => Promise<void> | void;

/** What createApp opened, closed in reverse order; a part that fails to close is logged and the rest still close. */
function createClosers(log: Logger) {
  const closers: Closer[] = [];
  return {
    add(close: Closer): void {
      closers.push(close);
    },
    async closeAll(): Promise<void> {
      for (const close of closers.reverse()) {
        try {
          await close();
        } catch (err) {
          log.warn({ err }, 'closing a part failed');
        }
      }
    },
  };
}
type Closers = ReturnType<typeof createClosers>;

export async function createApp(config: Config, options: AppOptions): Promise<App> {
  const { log } = options;
  const metrics = createMetrics();
  const closers = createClosers(log);
  // First (it also creates the dir): a second server on this dir stops here, before it touches the first one's
  // database or cache.
  const dataDirLock = lockDataDir(config.dataPath);
  closers.add(() => dataDirLock.release());
  try {
    const nodeId = randomBase64url(9);
    // Cluster mode (PostgreSQL + Redis) or embedded (SQLite + LMDB + memory): chosen here, once.
    const cluster = clusterMode(config) ? await openCluster(config, { nodeId, metrics, log }) : null;
    if (cluster !== null) closers.add(() => cluster.close());
    const storage = cluster === null ? await openStorage(config, metrics, log, closers) : clusterStorage(cluster, config);
    const cache = openCache(config, metrics, log, closers);
    const models = await openModels(config, options, metrics, closers);
    const { limits, egress } = openLimits(config, closers);
    const auth = createConfiguredAuth(config, (userId) => limits.admitAnonymous(userId));
    warnAboutAuthSettings(config, auth, log, options.auth !== undefined);
    // chat.started reaches a user's other connections through the node bus: this process's, or Redis in a cluster.
    const bus = cluster?.bus ?? createLocalBus();
    if (cluster === null) closers.add(() => bus.close());
    const marketplace = createMarketplaceService({ store: storage.marketplaceStore, batching: config.dbBatching });
    closers.add(() => marketplace.close());
    const refused = (bucket: string) => metrics.rateLimited.inc({ bucket });
    const firstLevel = createChatCache({ cache, provider: models.providerName, backend: models.backend, model: config.model, log });
    const chat = createChatService({
      store: storage.store,
      pool: models.pool,
      cache: cluster === null ? firstLevel : cluster.cache(firstLevel),
      limits: cluster === null ? createChatLimits(limits, refused) : cluster.limits(limits, refused),
      taskLog: cluster?.taskLog,
      // A claim outlives the longest call a worker may run (the task timeout), so it never lapses under a live call.
      sharedFlights: cluster === null ? undefined : { claims: cluster.claims, claimMs: config.taskTimeoutMs + 60_000 },
      metrics,
      log,
      provider: models.providerName,
      model: config.model,
      contextMessages: config.contextMessages,
      defaultMaxTokens: models.providerName === 'dev' ? DEV_DEFAULT_MAX_TOKENS : config.defaultMaxTokens,
      capUnsetMaxTokens: models.providerName !== 'dev',
      taskRetentionMs: config.taskRetentionMs,
      taskRetentionMaxBytes: config.taskRetentionMaxBytes,
      maxRunningPerUser: config.maxRunningPerUser,
      bus,
      claims: cluster?.claims,
    });
    const pruning = startIdempotencyPruning(storage.store, { onError: (err) => log.warn({ err }, 'deleting expired idempotency keys failed') });
    closers.add(() => pruning.stop());
    const { admission, buffers } = openConnectionGuards(config, log, closers);
    const deps = transportDeps({
      config,
      metrics,
      log,
      auth: options.auth ?? auth,
      chat,
      marketplace,
      limits,
      egress,
      admission,
      buffers,
      storage,
      cache,
      pool: models.pool,
      providerName: models.providerName,
      nodeId,
      connections: cluster === null ? connectionQuota(limits) : cluster.connections(limits),
      bus,
    });
    const server = await (options.serve ?? ((d: TransportDeps) => startHttpServer(d, config.host, config.port)))(deps);
    return appHandle(server, metrics, chat, closers);
  } catch (err) {
    await closers.closeAll();
    throw err;
  }
}

interface Parts {
  config: Config;
  metrics: Metrics;
  log: Logger;
  auth: Authenticator;
  chat: ChatService;
  marketplace: MarketplaceService;
  limits: RateLimits;
  egress: EgressLimits;
  admission: PendingAdmission;
  buffers: BufferBudget;
  storage: Storage;
  cache: ResponseCache;
  pool: ModelPool;
  providerName: string;
  nodeId: string;
  connections: TransportDeps['connections'];
  bus: NodeBus;
}

/** What the transports are connected to: the chat and marketplace services and, per user, the limits around them. */
function transportDeps(parts: Parts): TransportDeps {
  const { config, metrics, log, auth, chat, marketplace, limits, egress, admission, buffers, storage, cache, pool, providerName, nodeId, connections, bus } =
    parts;
  return {
    config,
    providerName,
    nodeId,
    metrics,
    log,
    auth,
    chat,
    marketplace,
    session: {
      chat,
      marketplace,
      frameLimit: (userId) => limits.frame(userId),
      frameRefused: (userId) => limits.frameRefused(userId),
      flooded: (userId) => limits.floodClosed(userId),
      egress: (userId, bytes) => egress.charge(userId, bytes),
      bus,
      metrics,
      log,
    },
    buffers,
    connections,
    admission,
    checkOrigin: originPolicy(config.allowedOrigins),
    rateLimitHeaders: rateLimitHeaders(limits),
    httpLimit: (userId) => limits.frame(userId),
    readiness: [...storage.readiness, { name: 'workers', check: () => pool.check() }, cacheReadiness(cache)],
    beforeScrape: () => {
      const s = pool.stats();
      metrics.queueDepth.set(s.queued);
      metrics.modelCallsInFlight.set(s.inFlight);
      metrics.rateLimitUsers.set(limits.size());
      metrics.pendingConnections.set(admission.pending());
      metrics.bufferedBytes.set(buffers.totalBytes());
    },
  };
}

/** The running app: close() stops listening, ends the chats (stored as cancelled), then closes every part once. */
function appHandle(server: HttpServer, metrics: Metrics, chat: ChatService, closers: Closers): App {
  let closing: Promise<void> | null = null;
  return {
    port: server.port,
    metrics,
    server,
    close() {
      closing ??= (async () => {
        server.stopListening();
        await chat.close();
        await server.close();
        await closers.closeAll();
      })();
      return closing;
    },
  };
}

/** The database (migrated, checkpointed) and the chat store on it; tasks the last process left running are marked failed. */
/** Where conversations, tasks and the marketplace are kept, and how /readyz checks it. */
interface Storage {
  store: ChatStore;
  marketplaceStore: MarketplaceStore;
  readiness: ReadinessCheck[];
}

/** Cluster mode's storage: PostgreSQL and Redis (see src/cluster/wiring.ts), and the data dir LMDB (the first-level cache) writes to. */
function clusterStorage(cluster: ClusterParts, config: Config): Storage {
  const disk = { name: 'disk', check: () => probeDataDir(config.dataPath) };
  return { store: cluster.store, marketplaceStore: cluster.marketplaceStore, readiness: [...cluster.readiness, disk] };
}

async function openStorage(config: Config, metrics: Metrics, log: Logger, closers: Closers): Promise<Storage> {
  const db = new Database(databaseFile(config.dataPath), { onQuery: (op) => metrics.dbQueries.tally(op).inc() });
  closers.add(() => db.close());
  const applied = migrate(db);
  if (applied.length > 0) log.info({ migrations: applied }, 'database migrated');
  const checkpointer = startCheckpointer(db, { log: (level, msg, fields) => log[level](fields ?? {}, msg) });
  closers.add(() => checkpointer.close());
  const store = createChatStore(db, { onCommit: (seconds) => metrics.dbCommitSeconds.observe(seconds) });
  closers.add(() => store.close());
  const recovered = await store.recoverUnfinished();
  if (recovered > 0) log.warn({ tasks: recovered }, 'tasks left unfinished by the previous process were marked failed');
  return { store, marketplaceStore: createSqliteMarketplaceStore(db), readiness: storageReadiness(db, config.dataPath) };
}

function openCache(config: Config, metrics: Metrics, log: Logger, closers: Closers): ResponseCache {
  const cache = openResponseCache({
    path: path.join(config.dataPath, CACHE_DIR),
    ttlMs: config.cacheTtlSec * 1000,
    maxBytes: config.cacheMaxBytes,
    hooks: {
      onEvict: (count) => metrics.cacheEvictions.inc(count),
      onBytes: (bytes) => metrics.cacheBytes.set(bytes),
    },
    log: (level, msg, fields) => log[level](fields ?? {}, msg),
  });
  closers.add(() => cache.close());
  return cache;
}

/**
 * The model pool for the configured provider (or the host's custom one), its name, and the fingerprint of the
 * backend that goes into every cache key: a reply is never served for another upstream or model file.
 */
async function openModels(
  config: Config,
  options: AppOptions,
  metrics: Metrics,
  closers: Closers,
): Promise<{ pool: ModelPool; providerName: string; backend: string }> {
  const custom = options.provider;
  const providerName = custom === undefined ? config.llm : choiceName(custom);
  let localModel: { identity: string } | undefined;
  if (custom === undefined && config.llm === 'local') {
    // A missing or broken model file stops the start here, not at the first chat.
    const { validateLocalModel } = await import('./llm/local-model.js');
    const model = await validateLocalModel(config.modelPath);
    options.log.info({ model: model.name, architecture: model.architecture, bytes: model.fileBytes, identity: model.identity }, 'local model file checked');
    localModel = model;
  }
  const backend = custom === undefined ? backendFingerprint(config, localModel) : choiceFingerprint(custom);
  const poolOptions = {
    settings: { ...providerSettingsFrom(config), module: custom?.kind === 'module' ? custom.module : undefined },
    threads: config.workerThreads,
    tasksPerWorker: config.tasksPerWorker,
    maxQueue: config.maxQueue,
    maxQueuedPerOwner: config.maxQueuedPerUser,
    taskTimeoutMs: config.taskTimeoutMs,
    balance: workerBalance(config.workerBalance, config.llm),
    hooks: {
      onModelCall: () => metrics.modelCalls.inc(),
      onWorkerFailure: () => metrics.workerFailures.inc(),
      onOwnerQueueFull: () => metrics.rateLimited.inc({ bucket: 'queued' }),
    },
  };
  const pool = custom?.kind === 'object' ? createInlinePool(asProvider(custom.provider), poolOptions) : createModelPool(poolOptions);
  closers.add(() => pool.close());
  return { pool, providerName, backend };
}

function openLimits(config: Config, closers: Closers): { limits: RateLimits; egress: EgressLimits } {
  const limits = createRateLimits({
    messagesPerSecond: config.messagesPerSecond,
    chatsPerMinute: config.chatsPerMinute,
    modelTokensPerMinute: config.modelTokensPerMinute,
    maxConnectionsPerUser: config.maxConnectionsPerUser,
    maxAnonymousUsers: config.maxAnonymousUsers,
  });
  closers.add(() => limits.close());
  const egress = createEgressLimits({ bytesPerMinute: config.egressBytesPerMinute });
  closers.add(() => egress.close());
  return { limits, egress };
}

/** The bounds on connections before they are chats: descriptors, unauthenticated connections, buffered bytes. */
function openConnectionGuards(config: Config, log: Logger, closers: Closers): { admission: PendingAdmission; buffers: BufferBudget } {
  // Every connection is a descriptor: use all the process may have, and refuse new ones a little before the end.
  raiseFdLimit(log);
  const fdGuard = createFdGuard({ log });
  closers.add(() => fdGuard.close());
  const admission = createPendingAdmission({
    maxPending: config.maxPendingConnections,
    maxPendingPerAddress: config.maxPendingPerAddress,
    retryAfterMs: 1000,
    nearFdLimit: () => fdGuard.nearLimit(),
  });
  closers.add(() => admission.close());
  const buffers = createBufferBudget({ maxBufferedBytes: config.maxBufferedBytes });
  closers.add(() => buffers.close());
  return { admission, buffers };
}
