/**
 * Wires every part of chatwire together, in one visible place: storage, the
 * model pool, the chat service, limits, auth and the transport. Tests and
 * benchmarks start a real server with createApp(config) on port 0.
 */
import path from 'node:path';
import type { Logger } from 'pino';
import { createAuth } from './auth/auth.js';
import { cacheKey, isCacheable } from './cache/cache-key.js';
import { openResponseCache } from './cache/response-cache.js';
import { createChatService } from './chat/chat-service.js';
import type { ChatCache, ChatLimits } from './chat/ports.js';
import type { Config } from './config.js';
import { createChatStore } from './db/chat-store.js';
import { databaseFile } from './db/data-file.js';
import { startCheckpointer } from './db/checkpointer.js';
import { Database } from './db/database.js';
import { createSqliteMarketplaceStore } from './db/marketplace-queries.js';
import { migrate } from './db/migrate.js';
import { probeDataDir } from './db/storage-health.js';
import { backendFingerprint } from './llm/backend.js';
import { DEV_DEFAULT_MAX_TOKENS } from './llm/dev.js';
import { createModelPool } from './llm/pool.js';
import { createMarketplaceService } from './marketplace/marketplace-service.js';
import { providerSettingsFrom } from './llm/provider.js';
import { createEgressLimits } from './limits/egress.js';
import { createRateLimits } from './limits/rate-limits.js';
import { createMetrics, type Metrics } from './metrics/metrics.js';
import { AppError } from './protocol/index.js';
import { createPendingAdmission } from './transport/admission.js';
import type { Authenticator, TransportDeps } from './transport/deps.js';
import { createFdGuard, raiseFdLimit } from './transport/fd-limit.js';
import { asProvider, choiceFingerprint, choiceName, type ProviderChoice } from './llm/custom-provider.js';
import { createInlinePool } from './llm/inline-pool.js';
import { createBufferBudget } from './transport/buffer-budget.js';
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

export async function createApp(config: Config, options: AppOptions): Promise<App> {
  const { log } = options;
  const metrics = createMetrics();
  // First (it also creates the dir): a second server on this dir stops here, before it touches the first one's
  // database or cache.
  const dataDirLock = lockDataDir(config.dataPath);
  const closers: (() => Promise<void> | void)[] = [() => dataDirLock.release()];
  const closeAll = async () => {
    for (const close of closers.reverse()) {
      try {
        await close();
      } catch (err) {
        log.warn({ err }, 'closing a part failed');
      }
    }
  };

  try {
    const db = new Database(databaseFile(config.dataPath), { onQuery: (op) => metrics.dbQueries.tally(op).inc() });
    closers.push(() => db.close());
    const applied = migrate(db);
    if (applied.length > 0) log.info({ migrations: applied }, 'database migrated');
    const checkpointer = startCheckpointer(db, { log: (level, msg, fields) => log[level](fields ?? {}, msg) });
    closers.push(() => checkpointer.close());
    const store = createChatStore(db, { onCommit: (seconds) => metrics.dbCommitSeconds.observe(seconds) });
    closers.push(() => store.close());
    const recovered = store.recoverUnfinished();
    if (recovered > 0) log.warn({ tasks: recovered }, 'tasks left unfinished by the previous process were marked failed');

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
    closers.push(() => cache.close());

    let localModel: { identity: string } | undefined;
    const custom = options.provider;
    const providerName = custom === undefined ? config.llm : choiceName(custom);
    if (custom === undefined && config.llm === 'local') {
      // A missing or broken model file stops the start here, not at the first chat.
      const { validateLocalModel } = await import('./llm/local-model.js');
      const model = await validateLocalModel(config.modelPath);
      log.info({ model: model.name, architecture: model.architecture, bytes: model.fileBytes, identity: model.identity }, 'local model file checked');
      localModel = model;
    }
    // In every cache key: a reply is never served for another upstream or model file than the one that wrote it.
    const backend = custom === undefined ? backendFingerprint(config, localModel) : choiceFingerprint(custom);
    const poolOptions = {
      settings: { ...providerSettingsFrom(config), module: custom?.kind === 'module' ? custom.module : undefined },
      threads: config.workerThreads,
      tasksPerWorker: config.tasksPerWorker,
      maxQueue: config.maxQueue,
      maxQueuedPerOwner: config.maxQueuedPerUser,
      taskTimeoutMs: config.taskTimeoutMs,
      hooks: {
        onModelCall: () => metrics.modelCalls.inc(),
        onWorkerFailure: () => metrics.workerFailures.inc(),
        onOwnerQueueFull: () => metrics.rateLimited.inc({ bucket: 'queued' }),
      },
    };
    const pool = custom?.kind === 'object' ? createInlinePool(asProvider(custom.provider), poolOptions) : createModelPool(poolOptions);
    closers.push(() => pool.close());

    const limits = createRateLimits({
      messagesPerSecond: config.messagesPerSecond,
      chatsPerMinute: config.chatsPerMinute,
      modelTokensPerMinute: config.modelTokensPerMinute,
      maxConnectionsPerUser: config.maxConnectionsPerUser,
      maxAnonymousUsers: config.maxAnonymousUsers,
    });
    closers.push(() => limits.close());
    const egress = createEgressLimits({ bytesPerMinute: config.egressBytesPerMinute });
    closers.push(() => egress.close());

    const auth = createAuth(
      config.jwtSecret === undefined
        ? { admitAnonymous: (userId) => limits.admitAnonymous(userId) }
        : { secret: config.jwtSecret, requireExp: config.jwtRequireExp, audience: config.jwtAudience, issuer: config.jwtIssuer, maxTtlSec: config.jwtMaxTtlSec },
    );
    if (options.auth !== undefined) {
      // The host's hook identifies callers: the token settings are not used.
    } else if (auth.mode === 'open') {
      log.warn('open mode: no CHATWIRE_JWT_SECRET, so ?user= is trusted as the user id; set a secret in production');
      const unused = [
        config.jwtRequireExp ? 'CHATWIRE_JWT_REQUIRE_EXP' : null,
        config.jwtAudience !== undefined ? 'CHATWIRE_JWT_AUDIENCE' : null,
        config.jwtIssuer !== undefined ? 'CHATWIRE_JWT_ISSUER' : null,
        config.jwtMaxTtlSec !== undefined ? 'CHATWIRE_JWT_MAX_TTL_SEC' : null,
      ].filter((name) => name !== null);
      if (unused.length > 0) log.warn({ settings: unused }, 'these token settings do nothing without CHATWIRE_JWT_SECRET');
    } else if (auth.weakSecret) log.warn('CHATWIRE_JWT_SECRET is shorter than 32 bytes; use a longer random secret');

    const marketplace = createMarketplaceService({ store: createSqliteMarketplaceStore(db), batching: config.dbBatching });
    closers.push(() => marketplace.close());

    const chatCache: ChatCache = {
      keyOf: (request) =>
        isCacheable({ provider: providerName, temperature: request.temperature })
          ? cacheKey({ provider: providerName, backend, model: request.model, temperature: request.temperature, maxTokens: request.maxTokens, messages: request.messages })
          : null,
      get: (key) => cache.get(key),
      put: (key, reply) => {
        cache.put(key, { ...reply, model: config.model, createdAt: Date.now() }).catch((err: unknown) => log.warn({ err }, 'writing the response cache failed'));
      },
    };
    const chatLimits: ChatLimits = {
      chat: (userId) => {
        const d = limits.chat(userId);
        if (!d.ok) metrics.rateLimited.inc({ bucket: d.bucket });
        return d;
      },
      reserveModelTokens: (userId, maxTokens) => {
        const d = limits.reserveModelTokens(userId, maxTokens);
        if (!d.ok) metrics.rateLimited.inc({ bucket: d.bucket });
        return d;
      },
    };

    const chat = createChatService({
      store,
      pool,
      cache: chatCache,
      limits: chatLimits,
      metrics,
      log,
      provider: providerName,
      model: config.model,
      contextMessages: config.contextMessages,
      defaultMaxTokens: providerName === 'dev' ? DEV_DEFAULT_MAX_TOKENS : config.defaultMaxTokens,
      capUnsetMaxTokens: providerName !== 'dev',
      taskRetentionMs: config.taskRetentionMs,
      taskRetentionMaxBytes: config.taskRetentionMaxBytes,
      maxRunningPerUser: config.maxRunningPerUser,
    });

    // Every connection is a descriptor: use all the process may have, and refuse new ones a little before the end.
    raiseFdLimit(log);
    const fdGuard = createFdGuard({ log });
    closers.push(() => fdGuard.close());
    const admission = createPendingAdmission({
      maxPending: config.maxPendingConnections,
      maxPendingPerAddress: config.maxPendingPerAddress,
      retryAfterMs: 1000,
      nearFdLimit: () => fdGuard.nearLimit(),
    });
    closers.push(() => admission.close());
    const buffers = createBufferBudget({ maxBufferedBytes: config.maxBufferedBytes });
    closers.push(() => buffers.close());

    const allowed = config.allowedOrigins === '*' ? null : new Set(config.allowedOrigins);
    const deps: TransportDeps = {
      config,
      providerName,
      metrics,
      log,
      auth: options.auth ?? auth,
      chat,
      marketplace,
      session: {
        chat,
        marketplace,
        frameLimit: (userId) => limits.frame(userId),
        frameRefused: (userId) => limits.frameRefused(userId),
        flooded: (userId) => limits.floodClosed(userId),
        egress: (userId, bytes) => egress.charge(userId, bytes),
        metrics,
        log,
      },
      buffers,
      connections: {
        opened: (userId) => {
          const d = limits.connectionOpened(userId);
          if (d.ok) return { ok: true };
          // 429 rather than 403 or 503: the user is over a quota (docs/rate-limits.md, "Connections").
          return { ok: false, error: new AppError('rate_limited', d.reason, d.retryAfterMs === undefined ? {} : { retryAfterMs: d.retryAfterMs }) };
        },
        closed: (userId) => limits.connectionClosed(userId),
      },
      admission,
      checkOrigin: (origin) => {
        if (allowed !== null && origin !== undefined && !allowed.has(origin)) throw new AppError('forbidden', `origin ${origin} is not allowed`);
      },
      rateLimitHeaders: (userId) => {
        const h = limits.httpHeaders(userId);
        return { 'ratelimit-policy': h['RateLimit-Policy'], ratelimit: h.RateLimit };
      },
      httpLimit: (userId) => limits.frame(userId),
      readiness: [
        { name: 'sqlite', check: () => void db.raw.prepare('SELECT 1').get() },
        // SELECT 1 answers on a full or read-only disk; this fails then, so /readyz says 503 before chats fail.
        { name: 'disk', check: () => probeDataDir(config.dataPath) },
        { name: 'workers', check: () => pool.check() },
        { name: 'cache', check: () => void cache.stats() },
      ],
      beforeScrape: () => {
        const s = pool.stats();
        metrics.queueDepth.set(s.queued);
        metrics.modelCallsInFlight.set(s.inFlight);
        metrics.rateLimitUsers.set(limits.size());
        metrics.pendingConnections.set(admission.pending());
        metrics.bufferedBytes.set(buffers.totalBytes());
      },
    };

    const server = await (options.serve ?? ((d: TransportDeps) => startHttpServer(d, config.host, config.port)))(deps);
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
          await closeAll();
        })();
        return closing;
      },
    };
  } catch (err) {
    await closeAll();
    throw err;
  }
}
