/**
 * The Redis connection of a cluster-mode node: one connection for commands and
 * one for subscriptions (the node bus, src/cluster/bus.ts), every key under one
 * prefix, and a health state that the rest of the node reads to decide between
 * the shared (Redis) and the local way of doing a thing.
 *
 * Redis is survivable, not required: commands fail fast while it is down (no
 * offline queue, one try), the connections reconnect forever in the background,
 * and `up` turns true again on their own once it answers. Callers that get an
 * error fall back to their local state; nothing waits for Redis to come back.
 */
import { Redis } from 'ioredis';

export type RedisState = 'up' | 'down';

export interface RedisHub {
  /** Commands: fails fast while Redis is down. */
  readonly command: Redis;
  /** The one subscriber connection of this node (used by the bus only). */
  readonly subscriber: Redis;
  /** `<prefix><name>`: every key and channel chatwire uses goes through here. */
  key(name: string): string;
  readonly prefix: string;
  /** True while the command connection is ready. */
  readonly up: boolean;
  /** Called on every change of state (up → down, down → up). */
  onState(listener: (state: RedisState) => void): () => void;
  /** Resolves when the command connection is ready, or rejects after `timeoutMs`. */
  ready(timeoutMs: number): Promise<void>;
  close(): Promise<void>;
}

export interface OpenRedisOptions {
  /** Key and channel prefix; default 'chatwire:'. */
  prefix?: string;
  /** Longest wait between reconnect attempts; default 2000 ms. */
  maxReconnectDelayMs?: number;
  /** A command with no answer within this fails (and counts as Redis down for its caller); default 2000 ms. */
  commandTimeoutMs?: number;
}

export function openRedis(url: string, options: OpenRedisOptions = {}): RedisHub {
  const prefix = options.prefix ?? 'chatwire:';
  const maxDelay = options.maxReconnectDelayMs ?? 2000;
  const settings = {
    lazyConnect: false,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    commandTimeout: options.commandTimeoutMs ?? 2000,
    connectTimeout: 2000,
    retryStrategy: (attempt: number) => Math.min(50 * 2 ** Math.min(attempt, 10), maxDelay),
    // A subscriber that reconnects subscribes again to its channels.
    autoResubscribe: true,
  };
  // Auto-pipelining: the commands of one event-loop turn (every chat's bucket scripts, notices, cache reads) leave in
  // one write and their replies come back in one read, instead of a socket write and a read per command; a node's
  // CPU per chat was dominated by those. Replies and errors stay per command, in the order the commands were sent.
  const command = new Redis(url, { ...settings, connectionName: 'chatwire', enableAutoPipelining: true });
  // The subscriber queues its SUBSCRIBE commands until it is ready: they are not requests a caller waits on. No ready
  // check: ioredis sends a SUBSCRIBE as soon as the socket connects, and the INFO of a ready check sent after it fails
  // (subscriber mode), which cut the connection and lost what was published until it was back.
  const subscriber = new Redis(url, {
    ...settings,
    enableOfflineQueue: true,
    maxRetriesPerRequest: null,
    enableReadyCheck: false,
    connectionName: 'chatwire-bus',
  });
  const listeners = new Set<(state: RedisState) => void>();
  let up = false;
  const setState = (next: boolean) => {
    if (next === up) return;
    up = next;
    for (const listener of [...listeners]) listener(next ? 'up' : 'down');
  };
  command.on('ready', () => setState(true));
  command.on('close', () => setState(false));
  command.on('end', () => setState(false));
  // ioredis emits 'error' on every failed reconnect; the state change is what callers act on.
  command.on('error', () => {});
  subscriber.on('error', () => {});
  let closed = false;
  return {
    command,
    subscriber,
    prefix,
    key: (name) => `${prefix}${name}`,
    get up() {
      return up;
    },
    onState(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    ready(timeoutMs) {
      if (up) return Promise.resolve();
      return new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => {
          off();
          reject(new Error(`Redis at ${redact(url)} did not answer within ${timeoutMs} ms`));
        }, timeoutMs);
        const off = this.onState((state) => {
          if (state !== 'up') return;
          clearTimeout(timer);
          off();
          resolve();
        });
      });
    },
    async close() {
      if (closed) return;
      closed = true;
      listeners.clear();
      await Promise.allSettled([command.quit(), subscriber.quit()]);
      command.disconnect();
      subscriber.disconnect();
    },
  };
}

/** The URL without its password, for messages. */
export function redact(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    return u.toString();
  } catch {
    return 'the configured URL';
  }
}
