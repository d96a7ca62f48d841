import type { Logger } from 'pino';
import type { ChatCache } from '../chat/ports.js';
import { cacheKey, isCacheable } from './cache-key.js';
import type { ResponseCache } from './response-cache.js';

export interface ChatCacheOptions {
  cache: ResponseCache;
  /** The provider's name and fingerprint (upstream, model file): a reply is never served for another backend. */
  provider: string;
  backend: string;
  /** The model name stored with each reply. */
  model: string;
  log: Logger;
}

/**
 * The response cache in the shape the chat service asks for: keys only for reproducible requests, and writes
 * that never hold up or fail a chat (a failed write is logged).
 */
export function createChatCache(options: ChatCacheOptions): ChatCache {
  const { cache, provider, backend, model, log } = options;
  return {
    keyOf: (request) =>
      isCacheable({ provider, temperature: request.temperature })
        ? cacheKey({ provider, backend, model: request.model, temperature: request.temperature, maxTokens: request.maxTokens, messages: request.messages })
        : null,
    // An LMDB read is synchronous (memory-mapped): answered at once.
    get: (key) => Promise.resolve(cache.get(key)),
    put: (key, reply) => {
      cache.put(key, { ...reply, model, createdAt: Date.now() }).catch((err: unknown) => log.warn({ err }, 'writing the response cache failed'));
    },
  };
}

/** /readyz: the cache answers (its environment is open and readable). */
export function cacheReadiness(cache: ResponseCache): { name: string; check(): void } {
  return { name: 'cache', check: () => void cache.stats() };
}
