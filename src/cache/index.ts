/** The response cache: what the chat service and main wiring import. */
export { cacheKey, isCacheable, normalizeText, rawCacheKey, type CacheKeyInput } from './cache-key.js';
export {
  CachedReplySchema,
  openResponseCache,
  type CachedReply,
  type CacheLog,
  type CacheStats,
  type ResponseCache,
  type ResponseCacheHooks,
  type ResponseCacheOptions,
} from './response-cache.js';
