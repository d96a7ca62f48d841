/**
 * The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers-11,
 * structured-field Lists; see docs/rate-limits.md):
 *
 *   RateLimit-Policy: "messages";q=50;w=1, "chats";q=60;w=60, "tokens";q=20000;w=60;chatwire-unit="model-tokens"
 *   RateLimit: "messages";r=49;t=1, "chats";r=12;t=1, "tokens";r=20000;t=1
 *
 * q = quota, w = window in seconds, r = units available now, t = the draft's
 * "effective window": seconds within which the client can use no more than r.
 */

export interface PolicyField {
  /** Policy name, an sf-string (ours are fixed ASCII words, nothing to escape). */
  name: string;
  /** Quota: units per window (the bucket's capacity). */
  quota: number;
  /** Window in whole seconds, at least 1 (the draft allows no sub-second precision). */
  windowSec: number;
  /** A unit the draft's registry lacks, sent as a vendor parameter. */
  unit?: string;
}

export interface LimitField {
  name: string;
  /** Units available now (a non-negative integer). */
  remaining: number;
  /** Seconds within which no more than `remaining` may be used (a non-negative integer). */
  windowSec: number;
}

export function rateLimitPolicyField(policies: readonly PolicyField[]): string {
  return policies.map((p) => `"${p.name}";q=${p.quota};w=${p.windowSec}${p.unit === undefined ? '' : `;chatwire-unit="${p.unit}"`}`).join(', ');
}

export function rateLimitField(limits: readonly LimitField[]): string {
  return limits.map((l) => `"${l.name}";r=${l.remaining};t=${l.windowSec}`).join(', ');
}

/** `Retry-After` in whole seconds, rounded up: rounding down would send the client back too early. */
export function retryAfterSeconds(retryAfterMs: number): number {
  return Math.max(0, Math.ceil(retryAfterMs / 1000));
}
