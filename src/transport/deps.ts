import type { Logger } from 'pino';
import type { Identity } from '../auth/identity.js';
import type { ChatService } from '../chat/chat-service.js';
import type { Config } from '../config.js';
import type { ConnectionAdmission } from '../limits/chat-limits.js';
import type { Metrics } from '../metrics/metrics.js';
import type { PendingAdmission } from './admission.js';
import type { BufferBudget } from './buffer-budget.js';
import type { MarketplaceLookups, SessionDeps } from './session.js';

/** The request a caller is identified from, as the `authenticate` hook sees it (src/auth/authenticate.ts). */
export interface AuthRequest {
  transport: 'ws' | 'socket.io' | 'http';
  headers: ReadonlyMap<string, string> | Readonly<Record<string, string | string[] | undefined>>;
  query: URLSearchParams;
}

export interface Authenticator {
  readonly mode: 'open' | 'jwt';
  /** Resolves the caller; rejects with AppError('unauthorized') for a missing, bad or expired token. */
  identify(input: { token?: string | undefined; user?: string | undefined; connectionId: string; address: string; request?: AuthRequest }): Promise<Identity>;
}

export interface ReadinessCheck {
  name: string;
  check(): Promise<void> | void;
  /**
   * A part the node can serve without (cluster mode's Redis): its failure leaves /readyz at 200 and shows as
   * `"<name>": "degraded"` in the body, with the reason under `degraded`.
   */
  optional?: boolean;
}

/** Everything the transport layer talks to; wired in app.ts. */
export interface TransportDeps {
  config: Config;
  /** The model provider the hello frame names: config.llm, or a custom provider's name. */
  providerName: string;
  /** This process's id in the hello frame, made once per chatwire instance (in a cluster each node has its own). */
  nodeId: string;
  metrics: Metrics;
  log: Logger;
  auth: Authenticator;
  chat: ChatService;
  marketplace: MarketplaceLookups;
  session: SessionDeps;
  /** The server-wide bound on bytes held for slow readers, which every socket reports to. */
  buffers: BufferBudget;
  /** Per-user connection cap (across nodes in a cluster: then opened answers with a Promise). */
  connections: {
    opened(userId: string): ConnectionAdmission | Promise<ConnectionAdmission>;
    closed(userId: string): void;
  };
  /** Connections not authenticated yet, bounded in total and per client address (and refused near the fd limit). */
  admission: PendingAdmission;
  /** Throws AppError('forbidden') for an origin that is not allowed. */
  checkOrigin(origin: string | undefined): void;
  /** IETF RateLimit-Policy / RateLimit fields for a user's HTTP responses; `null` for a caller not identified. */
  rateLimitHeaders(userId: string | null): Record<string, string>;
  /** Takes one HTTP request from the user's request bucket. */
  httpLimit(userId: string): { ok: true } | { ok: false; retryAfterMs: number; bucket: string };
  readiness: ReadinessCheck[];
  /** Refreshes gauges before /metrics is rendered. */
  beforeScrape(): void;
}
