import { createHash } from 'node:crypto';

/** Everything about a model call that decides its output (the cache mode is not part of it). */
export interface CacheKeyInput {
  provider: string;
  /** What besides the request decides the reply: the upstream or the model file (backendFingerprint in src/llm/backend.ts). */
  backend: string;
  model: string;
  temperature?: number | undefined;
  maxTokens?: number | undefined;
  system?: string | undefined;
  messages: { role: 'system' | 'user' | 'assistant'; content: string }[];
}

/**
 * The normal form of a message text for the cache key: Unicode NFC, every run
 * of white space (spaces, tabs, CR, LF, and Unicode spaces such as U+00A0)
 * folded to one space, then trimmed. Case and punctuation are kept: they can
 * change what a model answers.
 */
export function normalizeText(s: string): string {
  return s.normalize('NFC').replace(/\s+/gu, ' ').trim();
}

/**
 * The cache key of a request: sha256 (hex) of its provider, backend
 * fingerprint, model, output params, system prompt and normalized messages
 * (roles kept, order kept).
 * See docs/cache.md for the rule.
 */
export function cacheKey(input: CacheKeyInput): string {
  return digest('chatwire-cache-v2', input, normalizeText);
}

/** The same key over the exact text, without normalization: the benchmark's baseline. */
export function rawCacheKey(input: CacheKeyInput): string {
  return digest('chatwire-cache-raw-v2', input, (s) => s);
}

/**
 * Only reproducible requests are cached: temperature 0 on any provider, or
 * the dev provider, whose reply is a pure function of its input whatever the
 * temperature. An unset temperature means the provider's default (1 for
 * OpenAI), so it is not reproducible.
 */
export function isCacheable(input: { provider: string; temperature?: number | undefined }): boolean {
  return input.provider === 'dev' || input.temperature === 0;
}

function digest(version: string, input: CacheKeyInput, text: (s: string) => string): string {
  // A JSON array is an unambiguous encoding: every string is quoted and
  // escaped, so no two different inputs serialize alike (plain concatenation
  // would let "a|b" + "c" collide with "a" + "b|c"). The version tag keeps raw
  // and normalized keys apart and lets a future rule change start afresh.
  // An unset param stays null, distinct from any value, because its default
  // is the provider's to choose.
  const canonical = JSON.stringify([
    version,
    input.provider,
    input.backend,
    input.model,
    input.temperature ?? null,
    input.maxTokens ?? null,
    input.system === undefined ? null : text(input.system),
    input.messages.map((m) => [m.role, text(m.content)]),
  ]);
  return createHash('sha256').update(canonical, 'utf8').digest('hex');
}
