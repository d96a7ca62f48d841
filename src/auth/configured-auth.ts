import type { Logger } from 'pino';
import type { Config } from '../config.js';
import { createAuth, type Auth } from './auth.js';

/**
 * The auth the settings ask for: verified tokens with CHATWIRE_JWT_SECRET, else open mode, whose anonymous callers
 * are admitted by `admitAnonymous` (the rate limits' cap on anonymous users).
 */
export function createConfiguredAuth(config: Config, admitAnonymous: (userId: string) => boolean): Auth {
  return createAuth(
    config.jwtSecret === undefined
      ? { admitAnonymous }
      : { secret: config.jwtSecret, requireExp: config.jwtRequireExp, audience: config.jwtAudience, issuer: config.jwtIssuer, maxTtlSec: config.jwtMaxTtlSec },
  );
}

/**
 * Says at start-up what the token settings mean for this server: open mode (no secret) trusts `?user=`, a short
 * secret is guessable, and the other token settings do nothing without a secret. Silent when the host's own
 * `authenticate` hook identifies callers, since then no token setting is used.
 */
export function warnAboutAuthSettings(config: Config, auth: Auth, log: Logger, hostAuthenticates: boolean): void {
  if (hostAuthenticates) return;
  if (auth.mode !== 'open') {
    if (auth.weakSecret) log.warn('CHATWIRE_JWT_SECRET is shorter than 32 bytes; use a longer random secret');
    return;
  }
  log.warn('open mode: no CHATWIRE_JWT_SECRET, so ?user= is trusted as the user id; set a secret in production');
  const unused = [
    config.jwtRequireExp ? 'CHATWIRE_JWT_REQUIRE_EXP' : null,
    config.jwtAudience !== undefined ? 'CHATWIRE_JWT_AUDIENCE' : null,
    config.jwtIssuer !== undefined ? 'CHATWIRE_JWT_ISSUER' : null,
    config.jwtMaxTtlSec !== undefined ? 'CHATWIRE_JWT_MAX_TTL_SEC' : null,
  ].filter((name) => name !== null);
  if (unused.length > 0) log.warn({ settings: unused }, 'these token settings do nothing without CHATWIRE_JWT_SECRET');
}
