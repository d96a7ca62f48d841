/**
 * chatwire as a library: `createChatwire(options)` validates the options at once and returns a handle that serves
 * chatwire in one of three ways (its own uWS app, a host's uWS app, a host's node:http server), all driving the
 * same chat service, and lets server-side code chat on a user's behalf. docs/embedding.md is its manual.
 */
import { Server as NodeHttpServer } from 'node:http';
import { pino, type Logger } from 'pino';
import type { TemplatedApp } from 'uWebSockets.js';
import { createApp, type App } from './app.js';
import { hookAuthenticator, type Authenticate } from './auth/authenticate.js';
import type { Config } from './config.js';
import { resolveProviderOption, type ProviderChoice, type ProviderOption } from './llm/custom-provider.js';
import { configFromOptions, OptionsError, type SettingOptions } from './options.js';
import { createChatHandle, type ChatHandle } from './chat-handle.js';
import type { Authenticator, TransportDeps } from './transport/deps.js';
import { normalizePrefix } from './transport/mount-paths.js';
import { attachToNodeServer } from './transport/node-http.js';
import { startHttpServer, type HttpServer } from './transport/server.js';
import { attachToUwsApp } from './transport/uws-mount.js';

type LogFn = { (obj: object, msg?: string): void; (msg: string): void };

/** A pino-compatible logger: pino itself, or anything with its level methods (each called as pino's are). */
export interface ChatwireLogger {
  fatal?: LogFn;
  error: LogFn;
  warn: LogFn;
  info: LogFn;
  debug?: LogFn;
  trace?: LogFn;
}

export interface ChatwireOptions extends SettingOptions {
  /** Identifies every caller in place of the JWT verifier (docs/embedding.md, "authenticate"). */
  authenticate?: Authenticate | undefined;
  /** A custom model provider in place of `llm`: a module the worker threads load, or an object (docs/embedding.md, "provider"). */
  provider?: ProviderOption | undefined;
  /** Where chatwire logs; default: nowhere, unless `logLevel` is given (then pino on stdout at that level). */
  logger?: ChatwireLogger | undefined;
}

export interface AttachOptions {
  /** A path every chatwire path goes under, e.g. `/chat` for `/chat/ws`, `/chat/socket.io/`, `/chat/v1/...`; default none. */
  prefix?: string;
}

export interface Chatwire {
  /** The resolved settings (defaults filled in). */
  readonly config: Config;
  /** Server-side chats, on a user's behalf; available once started. */
  readonly chat: ChatHandle;
  /** Opens storage and the model workers; listen() and attach() call it. */
  start(): Promise<void>;
  /** Serves on chatwire's own uWebSockets.js app; resolves, once listening, to the bound port. */
  listen(options?: { port?: number; host?: string }): Promise<number>;
  /** Serves on a node:http (or https) server or a uWebSockets.js app the host already has, under `prefix`. */
  attach(target: NodeHttpServer | TemplatedApp, options?: AttachOptions): Promise<void>;
  /** Stops chatwire and releases what it opened (never the host's server); chats in flight are cancelled and stored. */
  close(): Promise<void>;
}

const HOOKS = ['authenticate', 'provider', 'logger'] as const;
const LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace'] as const;

/** The host's logger as the pino Logger chatwire's parts take: they call only its level methods. */
function asPino(logger: ChatwireLogger): Logger {
  const out: Record<string, unknown> = { level: 'trace' };
  for (const level of LEVELS) {
    const fn = logger[level];
    out[level] = typeof fn === 'function' ? fn.bind(logger) : () => {};
  }
  return out as unknown as Logger;
}

function resolveHooks(options: ChatwireOptions): { log: Logger; auth?: Authenticator; provider?: ProviderChoice } {
  const problems: string[] = [];
  const { authenticate, provider, logger } = options;
  if (authenticate !== undefined && typeof authenticate !== 'function')
    problems.push('invalid option authenticate: expected a function ({ headers, query }) => { userId, role } | null');
  if (
    logger !== undefined &&
    (typeof logger !== 'object' ||
      logger === null ||
      !['error', 'warn', 'info'].every((l) => typeof (logger as unknown as Record<string, unknown>)[l] === 'function'))
  ) {
    problems.push('invalid option logger: expected a pino-compatible logger (info, warn and error methods at least)');
  }
  const choice = provider === undefined ? undefined : resolveProviderOption(provider);
  if (typeof choice === 'string') problems.push(`invalid option provider: ${choice}`);
  if (problems.length > 0) throw new OptionsError(problems.join('; '));
  const log = logger !== undefined ? asPino(logger) : pino({ level: options.logLevel ?? 'silent', base: { service: 'chatwire' } });
  const out: { log: Logger; auth?: Authenticator; provider?: ProviderChoice } = { log };
  if (authenticate !== undefined) out.auth = hookAuthenticator(authenticate, (err, what) => log.error({ err }, what));
  if (choice !== undefined && typeof choice !== 'string') out.provider = choice;
  return out;
}

function isUwsApp(target: unknown): target is TemplatedApp {
  const t = target as Record<string, unknown> | null;
  return typeof t === 'object' && t !== null && typeof t.ws === 'function' && typeof t.any === 'function' && typeof t.on !== 'function';
}

function isNodeServer(target: unknown): target is NodeHttpServer {
  const t = target as Record<string, unknown> | null;
  return (
    target instanceof NodeHttpServer ||
    (typeof t === 'object' && t !== null && typeof t.on === 'function' && typeof t.listeners === 'function' && typeof t.address === 'function')
  );
}

export function createChatwire(options: ChatwireOptions = {}): Chatwire {
  const settings = Object.fromEntries(Object.entries(options).filter(([k]) => !(HOOKS as readonly string[]).includes(k)));
  const config = configFromOptions(settings);
  const hooks = resolveHooks(options);
  const mounts: HttpServer[] = [];
  // One server for createApp: every mount, the first taken at start and the rest as they come.
  const allMounts: HttpServer = {
    port: 0,
    stopListening: () => {
      for (const m of mounts) m.stopListening();
    },
    closeConnections: (code, reason) => {
      for (const m of mounts) m.closeConnections(code, reason);
    },
    close: async () => {
      for (const m of mounts) await m.close();
    },
  };
  let deps: TransportDeps | undefined;
  let starting: Promise<App> | undefined;
  let chat: ChatHandle | undefined;
  let closed = false;

  const start = async (): Promise<TransportDeps> => {
    if (closed) throw new Error('this chatwire is closed: create another');
    starting ??= createApp(config, {
      ...hooks,
      serve: async (d) => {
        deps = d;
        return allMounts;
      },
    });
    await starting;
    return deps as TransportDeps;
  };

  return {
    config,
    get chat(): ChatHandle {
      if (deps === undefined) throw new Error('chatwire is not started: await listen(), attach() or start() first');
      chat ??= createChatHandle(deps.chat, hooks.log);
      return chat;
    },
    async start() {
      await start();
    },
    async listen(listenOptions = {}) {
      const d = await start();
      const server = await startHttpServer(d, listenOptions.host ?? config.host, listenOptions.port ?? config.port);
      mounts.push(server);
      return server.port;
    },
    async attach(target, attachOptions = {}) {
      const prefix = normalizePrefix(attachOptions.prefix);
      if (prefix === null) throw new OptionsError(`invalid option prefix: expected a path like /chat, got ${JSON.stringify(attachOptions.prefix)}`);
      if (!isUwsApp(target) && !isNodeServer(target)) throw new TypeError('attach() takes a node:http server or a uWebSockets.js app');
      const d = await start();
      mounts.push(isUwsApp(target) ? attachToUwsApp(target, d, prefix) : attachToNodeServer(target, d, prefix));
    },
    async close() {
      if (closed) return;
      closed = true;
      if (starting === undefined) return;
      const app = await starting.catch(() => null);
      await app?.close();
    },
  };
}
