import { isIP } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';

const bool = z.enum(['true', 'false', '1', '0', 'yes', 'no', 'on', 'off']).transform((v) => v === 'true' || v === '1' || v === 'yes' || v === 'on');

// Plain decimal only: Number() would read '' and ' ' as 0, '0x1F90' as 8080 and '8e3' as 8000. No sign: no
// setting has a negative minimum.
const int = (min: number, max: number) => {
  const expected = `expected a whole number from ${min} to ${max}`;
  return z.string().trim().regex(/^\d+$/, expected).transform(Number).pipe(z.number().min(min, expected).max(max, expected));
};
const positive = (max: number) => {
  const expected = `expected a number above 0 and at most ${max} (decimals like 0.5 allowed)`;
  return z
    .string()
    .trim()
    .regex(/^(\d+\.?\d*|\.\d+)$/, expected)
    .transform(Number)
    .pipe(z.number().positive(expected).max(max, expected));
};
/** A required text setting: blank (empty or whitespace only) is never meant, e.g. CHATWIRE_DATA_DIR=" " would make a directory named " ". */
const nonBlank = (what: string) => z.string().refine((v) => v.trim() !== '', `expected ${what}, not a blank value`);
/**
 * A setting that may be left unset. `blank` says what a value set to '' means: 'unset' where an empty value
 * is a usual way to say "none" and nothing is weakened by it; 'error' where it most likely comes from a
 * missing template variable and reading it as unset would be unsafe. A value of whitespace only is always an error.
 */
const optionalText = (env: string, blank: 'unset' | 'error', unsetMeans: string) =>
  z
    .string()
    .optional()
    .superRefine((v, ctx) => {
      if (v === undefined || v.trim() !== '' || (v === '' && blank === 'unset')) return;
      const how = blank === 'unset' ? `leave ${env} empty or unset` : `unset ${env}`;
      ctx.addIssue({ code: 'custom', message: `set but ${v === '' ? 'empty' : 'only whitespace'}: give a value, or ${how} for ${unsetMeans}` });
    })
    .transform((v) => (v === '' ? undefined : v));
/** An optional whole number: unset or empty = none. */
const optionalInt = (min: number, max: number) =>
  z
    .string()
    .optional()
    .transform((v) => (v === undefined || v === '' ? undefined : v))
    .pipe(int(min, max).optional());
/** A comma-separated list of IP addresses (empty = none), e.g. the proxies whose X-Forwarded-For is trusted. */
const addresses = z
  .string()
  .optional()
  .transform((value, ctx): readonly string[] => {
    if (value === undefined || value.trim() === '') return Object.freeze([]);
    const out: string[] = [];
    for (const entry of value.split(',').map((e) => e.trim())) {
      if (isIP(entry) === 0) {
        ctx.addIssue({ code: 'custom', message: `${JSON.stringify(entry)} is not an IP address: expected a comma-separated list like 127.0.0.1,::1` });
        return z.NEVER;
      }
      out.push(entry);
    }
    return Object.freeze(out);
  });
const httpUrl = z.url({ protocol: /^https?$/, error: 'expected an http:// or https:// URL' });
/** An optional URL of a service with one of `schemes` (checked after optionalText: undefined passes). */
const serviceUrl = (schemes: readonly string[], what: string) =>
  z
    .string()
    .optional()
    .refine((v) => {
      if (v === undefined) return true;
      try {
        return schemes.includes(new URL(v).protocol.slice(0, -1));
      } catch {
        return false;
      }
    }, `expected ${what}`);

// An origin as a browser sends it in the Origin header: scheme://host[:port], nothing after.
const ORIGIN = /^([a-z][a-z0-9+.-]*):\/\/([a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?$/i;
const DEFAULT_PORTS: Record<string, string> = { http: '80', https: '443' };
/** `*`, or a list of origins normalised the way browsers serialise them (lower case, default port dropped), so that a match is an exact string compare. */
const origins = z.string().transform((value, ctx): '*' | readonly string[] => {
  const entries = value.split(',').map((e) => e.trim());
  if (entries.length === 1 && entries[0] === '*') return '*';
  const fail = (message: string) => {
    ctx.addIssue({ code: 'custom', message });
    return z.NEVER;
  };
  if (value.trim() === '')
    return fail('expected `*` (any origin) or a comma-separated list of origins like https://app.example; empty would refuse every browser');
  if (entries.includes('*')) return fail('`*` allows any origin and cannot be combined with a list of origins');
  const out: string[] = [];
  for (const entry of entries) {
    if (entry === '') return fail('has an empty entry: remove the stray comma');
    const m = ORIGIN.exec(entry);
    if (m === null) return fail(`${JSON.stringify(entry)} is not an origin: expected scheme://host[:port] with no path, like https://app.example`);
    const scheme = m[1]!.toLowerCase();
    const port = m[3] === undefined ? undefined : Number(m[3]);
    if (port !== undefined && (port < 1 || port > 65535)) return fail(`${JSON.stringify(entry)} has a port outside 1..65535`);
    const keepPort = port !== undefined && String(port) !== DEFAULT_PORTS[scheme];
    out.push(`${scheme}://${m[2]!.toLowerCase()}${keepPort ? `:${port}` : ''}`);
  }
  return Object.freeze([...new Set(out)]);
});

/**
 * Every setting chatwire reads, with its environment variable, default and
 * meaning. This table is the one source for config parsing and for the
 * README's configuration table (test/unit/config.test.ts keeps them in step).
 */
export const settings = {
  port: { env: 'PORT', schema: int(0, 65535), default: '8080', doc: 'HTTP and WebSocket port (0 picks a free one)' },
  host: { env: 'HOST', schema: nonBlank('an address'), default: '0.0.0.0', doc: 'address to listen on' },
  dataDir: { env: 'CHATWIRE_DATA_DIR', schema: nonBlank('a directory path'), default: './data', doc: 'where SQLite and LMDB keep their files' },
  llm: { env: 'CHATWIRE_LLM', schema: z.enum(['dev', 'openai', 'local']), default: 'dev', doc: 'model provider: dev, openai or local' },
  model: {
    env: 'CHATWIRE_MODEL',
    schema: nonBlank('a model name').pipe(z.string().max(128)),
    default: 'dev-1',
    doc: 'default model name sent to the provider',
  },
  devTokenDelayMs: { env: 'CHATWIRE_DEV_TOKEN_DELAY_MS', schema: int(0, 60_000), default: '15', doc: 'dev provider: delay before each token (0 allowed)' },
  devFaults: {
    env: 'CHATWIRE_DEV_FAULTS',
    schema: bool,
    default: 'false',
    doc: 'dev provider: honour `/fault exit|throw|hang` messages (fault-injection tests only)',
  },
  workerThreads: {
    env: 'CHATWIRE_WORKER_THREADS',
    schema: int(1, 256),
    default: String(Math.max(1, os.availableParallelism())),
    doc: 'model worker threads (default: number of cores)',
  },
  tasksPerWorker: {
    env: 'CHATWIRE_TASKS_PER_WORKER',
    schema: int(1, 10_000),
    default: '64',
    doc: 'concurrent model tasks per worker (streaming providers are I/O-bound)',
  },
  workerBalance: {
    env: 'CHATWIRE_WORKER_BALANCE',
    schema: z.enum(['auto', 'pack', 'spread']),
    default: 'auto',
    doc: 'how model calls go to workers: `pack` fills one worker before the next (streams share its wake-ups), `spread` evens them out; `auto`: pack for openai, spread otherwise',
  },
  maxQueue: {
    env: 'CHATWIRE_MAX_QUEUE',
    schema: int(0, 1_000_000),
    default: '1024',
    doc: 'chats waiting for a worker before new ones get `overloaded`; a chat cancelled or past its deadline while it waits frees its place at once',
  },
  defaultMaxTokens: {
    env: 'CHATWIRE_DEFAULT_MAX_TOKENS',
    schema: int(1, 32_768),
    default: '1024',
    doc: 'openai/local: maxTokens of a chat that sets none (caps its token reservation); dev replies are 32 tokens',
  },
  taskTimeoutMs: {
    env: 'CHATWIRE_TASK_TIMEOUT_MS',
    schema: int(1000, 3_600_000),
    default: '300000',
    doc: 'hard deadline of one model call; a worker past it is replaced',
  },
  taskRetentionMs: {
    env: 'CHATWIRE_TASK_RETENTION_MS',
    schema: int(300_000, 86_400_000),
    default: '600000',
    doc: 'how long a finished task stays resumable (at least 5 minutes)',
  },
  taskRetentionMaxBytes: {
    env: 'CHATWIRE_TASK_RETENTION_MAX_BYTES',
    schema: int(1024 * 1024, 64 * 1024 * 1024 * 1024),
    default: String(256 * 1024 * 1024),
    doc: 'memory budget for the deltas of finished tasks; past it the oldest are dropped from memory and resumed from storage',
  },
  maxRunningPerUser: {
    env: 'CHATWIRE_MAX_RUNNING_PER_USER',
    schema: int(1, 100_000),
    default: '16',
    doc: 'chats of one user in flight (waiting or streaming) at once; past it: `rate_limited`',
  },
  maxQueuedPerUser: {
    env: 'CHATWIRE_MAX_QUEUED_PER_USER',
    schema: int(1, 100_000),
    default: '8',
    doc: 'chats of one user (or one anonymous address) waiting for a worker; past it: `rate_limited`; waiting users are served round-robin',
  },
  contextMessages: {
    env: 'CHATWIRE_CONTEXT_MESSAGES',
    schema: int(0, 1000),
    default: '20',
    doc: "earlier messages of the conversation put in the model's context",
  },
  maxFrameBytes: {
    env: 'CHATWIRE_MAX_FRAME_BYTES',
    schema: int(1024, 16 * 1024 * 1024),
    default: '65536',
    doc: 'largest WebSocket frame or HTTP body accepted; over it: 413 / close 1009',
  },
  maxBackpressureBytes: {
    env: 'CHATWIRE_MAX_BACKPRESSURE_BYTES',
    schema: int(16 * 1024, 256 * 1024 * 1024),
    default: '1048576',
    doc: 'bytes buffered for a slow reader before its socket is closed',
  },
  maxBufferedBytes: {
    env: 'CHATWIRE_MAX_BUFFERED_BYTES',
    schema: int(1024 * 1024, 64 * 1024 * 1024 * 1024),
    default: String(256 * 1024 * 1024),
    doc: 'bytes buffered for slow readers over all sockets; past it the most backed-up sockets are closed (1013) first',
  },
  idleTimeoutSec: {
    env: 'CHATWIRE_IDLE_TIMEOUT_SEC',
    schema: int(8, 960),
    default: '120',
    doc: 'a WebSocket silent this long (pings answered count) is closed',
  },
  messagesPerSecond: {
    env: 'CHATWIRE_MESSAGES_PER_SECOND',
    schema: positive(1_000_000),
    default: '50',
    doc: 'per-user frames per second (burst of the same size)',
  },
  chatsPerMinute: { env: 'CHATWIRE_CHATS_PER_MINUTE', schema: positive(1_000_000), default: '60', doc: 'per-user chats per minute' },
  modelTokensPerMinute: {
    env: 'CHATWIRE_MODEL_TOKENS_PER_MINUTE',
    schema: positive(1_000_000_000),
    default: '20000',
    doc: 'per-user model tokens per minute (reserved at send, settled at the end)',
  },
  shutdownTimeoutMs: {
    env: 'CHATWIRE_SHUTDOWN_TIMEOUT_MS',
    schema: int(100, 120_000),
    default: '5000',
    doc: 'graceful shutdown deadline before the process exits anyway',
  },
  dbBatching: {
    env: 'CHATWIRE_DB_BATCHING',
    schema: bool,
    default: 'true',
    doc: 'merge marketplace lookups that arrive in the same tick from different connections into one query',
  },
  cacheTtlSec: { env: 'CHATWIRE_CACHE_TTL_SEC', schema: int(1, 365 * 86_400), default: '86400', doc: 'how long a cached reply is served' },
  cacheMaxBytes: {
    env: 'CHATWIRE_CACHE_MAX_BYTES',
    schema: int(64 * 1024, 1024 * 1024 * 1024 * 1024),
    default: String(256 * 1024 * 1024),
    doc: 'byte bound of the reply cache; least recently used entries are evicted past it',
  },
  openaiBaseUrl: {
    env: 'CHATWIRE_OPENAI_BASE_URL',
    schema: httpUrl,
    default: 'https://api.openai.com/v1',
    doc: 'openai provider: http(s) base URL of any OpenAI-compatible server (Ollama, vLLM, llama.cpp, LM Studio)',
  },
  openaiApiKey: {
    env: 'CHATWIRE_OPENAI_API_KEY',
    schema: optionalText('CHATWIRE_OPENAI_API_KEY', 'unset', 'no key'),
    default: undefined,
    doc: 'openai provider: API key; unset or empty = none (local servers); whitespace only is an error',
  },
  upstreamFirstTokenTimeoutMs: {
    env: 'CHATWIRE_UPSTREAM_FIRST_TOKEN_TIMEOUT_MS',
    schema: int(100, 600_000),
    default: '30000',
    doc: 'openai provider: longest wait for the first token',
  },
  upstreamIdleTimeoutMs: {
    env: 'CHATWIRE_UPSTREAM_IDLE_TIMEOUT_MS',
    schema: int(100, 600_000),
    default: '15000',
    doc: 'openai provider: longest silence between two chunks',
  },
  upstreamMaxRetries: {
    env: 'CHATWIRE_UPSTREAM_MAX_RETRIES',
    schema: int(0, 10),
    default: '2',
    doc: 'openai provider: retries (with backoff) before the first token',
  },
  modelPath: {
    env: 'CHATWIRE_MODEL_PATH',
    schema: optionalText('CHATWIRE_MODEL_PATH', 'unset', 'none'),
    default: undefined,
    doc: 'local provider: path of the GGUF model file; unset or empty = none; whitespace only is an error',
  },
  localThreads: { env: 'CHATWIRE_LOCAL_THREADS', schema: int(0, 256), default: '1', doc: 'local provider: CPU threads per worker (0 = library default)' },
  localContextSize: { env: 'CHATWIRE_LOCAL_CONTEXT_SIZE', schema: int(128, 131_072), default: '2048', doc: 'local provider: context size in tokens' },
  localSequences: {
    env: 'CHATWIRE_LOCAL_SEQUENCES',
    schema: int(1, 64),
    default: '4',
    doc: 'local provider: generations one worker runs at once (more wait their turn)',
  },
  maxConnectionsPerUser: {
    env: 'CHATWIRE_MAX_CONNECTIONS_PER_USER',
    schema: int(1, 100_000),
    default: '16',
    doc: 'WebSocket connections and SSE streams one user may hold at once',
  },
  maxPendingConnections: {
    env: 'CHATWIRE_MAX_PENDING_CONNECTIONS',
    schema: int(1, 1_000_000),
    default: '1024',
    doc: 'connections and socket.io sessions not yet authenticated, in total; past it new ones get 503',
  },
  maxPendingPerAddress: {
    env: 'CHATWIRE_MAX_PENDING_PER_ADDRESS',
    schema: int(1, 1_000_000),
    default: '32',
    doc: 'connections and socket.io sessions not yet authenticated from one client address; past it new ones get 429',
  },
  handshakeTimeoutMs: {
    env: 'CHATWIRE_HANDSHAKE_TIMEOUT_MS',
    schema: int(500, 60_000),
    default: '5000',
    doc: 'a socket.io session that has not connected with valid credentials by then is closed',
  },
  egressBytesPerMinute: {
    env: 'CHATWIRE_EGRESS_BYTES_PER_MINUTE',
    schema: int(64 * 1024, 1024 * 1024 * 1024 * 1024),
    default: String(64 * 1024 * 1024),
    doc: 'per-user bytes of replays (resume, SSE catch-up, history pages) per minute; past it: `rate_limited`',
  },
  trustProxy: {
    env: 'CHATWIRE_TRUST_PROXY',
    schema: addresses,
    default: undefined,
    doc: 'comma-separated addresses of proxies whose `X-Forwarded-For` names the client (unset = none: the peer address is the client)',
  },
  maxAnonymousUsers: {
    env: 'CHATWIRE_MAX_ANONYMOUS_USERS',
    schema: int(1, 10_000_000),
    default: '10000',
    doc: 'open mode: client addresses tracked as anonymous users at once; past it: 503 for new anonymous callers',
  },
  allowedOrigins: {
    env: 'CHATWIRE_ALLOWED_ORIGINS',
    schema: origins,
    default: '*',
    doc: 'origins allowed for WebSocket upgrades and CORS: `*` (any), or a comma-separated list of `scheme://host[:port]`; empty, or `*` in a list, is an error',
  },
  jwtSecret: {
    env: 'CHATWIRE_JWT_SECRET',
    schema: optionalText('CHATWIRE_JWT_SECRET', 'error', 'open mode'),
    default: undefined,
    doc: 'HS256 secret; unset = open mode (`?user=` trusted, a warning at start); set but empty or whitespace only is an error, never open mode',
  },
  jwtRequireExp: {
    env: 'CHATWIRE_JWT_REQUIRE_EXP',
    schema: bool,
    default: 'false',
    doc: 'refuse tokens without `exp` (the protocol requires only `sub`; an `exp` present is always checked)',
  },
  jwtAudience: {
    env: 'CHATWIRE_JWT_AUDIENCE',
    schema: optionalText('CHATWIRE_JWT_AUDIENCE', 'error', 'no audience check'),
    default: undefined,
    doc: 'when set, a token must carry this `aud` (unset = `aud` not checked)',
  },
  jwtIssuer: {
    env: 'CHATWIRE_JWT_ISSUER',
    schema: optionalText('CHATWIRE_JWT_ISSUER', 'error', 'no issuer check'),
    default: undefined,
    doc: 'when set, a token must carry this `iss` (unset = `iss` not checked)',
  },
  jwtMaxTtlSec: {
    env: 'CHATWIRE_JWT_MAX_TTL_SEC',
    schema: optionalInt(1, 10 * 365 * 86_400),
    default: undefined,
    doc: 'when set, a token whose `exp` is further than this past its `iat` (or past now, without `iat`) is refused (unset = any lifetime)',
  },
  databaseUrl: {
    env: 'CHATWIRE_DATABASE_URL',
    schema: optionalText('CHATWIRE_DATABASE_URL', 'unset', 'embedded storage').pipe(serviceUrl(['postgres', 'postgresql'], 'a postgres:// URL')),
    default: undefined,
    doc: 'cluster mode: PostgreSQL for conversations, tasks and the marketplace (with `CHATWIRE_REDIS_URL`; unset = SQLite in the data dir)',
  },
  redisUrl: {
    env: 'CHATWIRE_REDIS_URL',
    schema: optionalText('CHATWIRE_REDIS_URL', 'unset', 'embedded storage').pipe(serviceUrl(['redis', 'rediss'], 'a redis:// or rediss:// URL')),
    default: undefined,
    doc: 'cluster mode: Redis for task logs, leases, buckets, the shared reply cache and single-flight (with `CHATWIRE_DATABASE_URL`)',
  },
  redisPrefix: {
    env: 'CHATWIRE_REDIS_PREFIX',
    schema: nonBlank('a key prefix').pipe(z.string().max(64)),
    default: 'chatwire:',
    doc: 'cluster mode: the prefix of every Redis key and channel (nodes of one cluster share it)',
  },
  logLevel: { env: 'LOG_LEVEL', schema: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']), default: 'info', doc: 'pino log level' },
} as const;

type Settings = typeof settings;
export type Config = { readonly [K in keyof Settings]: z.output<Settings[K]['schema']> } & {
  /** Absolute path of CHATWIRE_DATA_DIR. */
  readonly dataPath: string;
};

/** Cluster mode: both CHATWIRE_DATABASE_URL and CHATWIRE_REDIS_URL set (loadConfig refuses one without the other). */
export function clusterMode(config: Config): config is Config & { databaseUrl: string; redisUrl: string } {
  return config.databaseUrl !== undefined && config.redisUrl !== undefined;
}

export class ConfigError extends Error {
  override name = 'ConfigError';
}

/**
 * Reads every setting from `env` (process.env by default) and validates it.
 * `overrides` (used by tests and scripts) take precedence over the environment.
 * Throws ConfigError naming the variable when a value is bad.
 */
export function loadConfig(
  env: Record<string, string | undefined> = process.env,
  overrides: Partial<{ [K in keyof Settings]: z.input<Settings[K]['schema']> | z.output<Settings[K]['schema']> }> = {},
): Config {
  const out: Record<string, unknown> = {};
  const problems: string[] = [];
  for (const [key, setting] of Object.entries(settings) as [keyof Settings, Settings[keyof Settings]][]) {
    const override = overrides[key];
    const raw = override === undefined ? (env[setting.env] ?? setting.default) : Array.isArray(override) ? override.join(',') : String(override);
    const parsed = (setting.schema as z.ZodType).safeParse(raw);
    if (!parsed.success) {
      problems.push(`${setting.env}=${JSON.stringify(raw)}: ${parsed.error.issues[0]?.message ?? 'invalid'}`);
    } else {
      out[key] = parsed.data;
    }
  }
  if (problems.length > 0) throw new ConfigError(`invalid configuration: ${problems.join('; ')}`);
  // Cluster mode needs both services: one alone is a half-configured cluster, not a mode.
  if ((out.databaseUrl === undefined) !== (out.redisUrl === undefined)) {
    const [set, unset] = out.databaseUrl === undefined ? ['CHATWIRE_REDIS_URL', 'CHATWIRE_DATABASE_URL'] : ['CHATWIRE_DATABASE_URL', 'CHATWIRE_REDIS_URL'];
    throw new ConfigError(`invalid configuration: ${set} is set but ${unset} is not; cluster mode needs both (PostgreSQL and Redis), embedded mode neither`);
  }
  out.dataPath = path.resolve(out.dataDir as string);
  return Object.freeze(out) as Config;
}
