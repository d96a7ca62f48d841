import { SignJWT } from 'jose';
import type { Role } from '../protocol/index.js';
import { JWT_ALGORITHM } from './auth.js';
import { SubjectSchema } from './claims.js';

export interface SignTokenOptions {
  secret: string;
  sub: string;
  role?: Role;
  /** Lifetime in seconds (default 3600). Tokens it issues always carry `exp`. */
  ttlSec?: number;
  /** Wall clock in epoch ms (default Date.now). */
  now?: () => number;
  /** `aud` and `iss`, for a server that checks them (CHATWIRE_JWT_AUDIENCE / CHATWIRE_JWT_ISSUER). */
  audience?: string;
  issuer?: string;
}

/** Issues a token that createAuth accepts: HS256, `sub`, `role`, `iat`, `exp`, and `aud`/`iss` when given. For scripts/token.ts and tests. */
export async function signToken(options: SignTokenOptions): Promise<string> {
  const sub = SubjectSchema.parse(options.sub);
  const ttlSec = options.ttlSec ?? 3600;
  if (!Number.isInteger(ttlSec) || ttlSec < 1) throw new RangeError(`ttlSec must be an integer >= 1, got ${ttlSec}`);
  if (options.secret === '') throw new RangeError('the secret must not be empty');
  const iat = Math.floor((options.now ?? Date.now)() / 1000);
  const jwt = new SignJWT({ role: options.role ?? 'consumer' })
    .setProtectedHeader({ alg: JWT_ALGORITHM, typ: 'JWT' })
    .setSubject(sub)
    .setIssuedAt(iat)
    .setExpirationTime(iat + ttlSec);
  if (options.audience !== undefined) jwt.setAudience(options.audience);
  if (options.issuer !== undefined) jwt.setIssuer(options.issuer);
  return jwt.sign(new TextEncoder().encode(options.secret));
}
