import { randomBytes } from 'node:crypto';
import { errors, jwtVerify } from 'jose';
import { AppError } from '../protocol/index.js';
import { anonymousUserId } from './anonymous.js';
import { OpenUserIdSchema, TokenClaimsSchema } from './claims.js';
import type { Identity } from './identity.js';

/** The one algorithm accepted: a token naming any other (`none`, HS512, RS256...) is refused before its signature is looked at. */
export const JWT_ALGORITHM = 'HS256';

// A JWT with our few claims is a few hundred bytes; refusing huge ones keeps
// an attacker from making us base64-decode and HMAC megabytes per attempt.
const MAX_TOKEN_CHARS = 8192;
// RFC 7518 section 3.2: an HS256 key must be at least as long as the hash (256 bits).
const MIN_SECRET_BYTES = 32;

export interface AuthOptions {
  /** HS256 secret; absent = open mode. */
  secret?: string;
  /** Leeway for `exp` and `nbf`, in seconds (default 5): clocks of issuer and server drift. */
  clockToleranceSec?: number;
  /** Wall clock in epoch ms for `exp`/`nbf` checks (default Date.now). */
  now?: () => number;
  /**
   * Refuse tokens without `exp` (default false). The protocol requires only `sub`; `exp`, when present, is
   * always checked. A deployment whose issuer always sets `exp` can turn this on so that a token minted
   * without one by mistake never lives forever.
   */
  requireExp?: boolean;
  /** When set, a token's `aud` must name it (a string, or an array holding it): tokens minted for another service that shares the secret are refused. */
  audience?: string;
  /** When set, a token's `iss` must equal it. */
  issuer?: string;
  /**
   * When set, the longest lifetime a token may have, in seconds: `exp` minus `iat` (minus now when `iat` is absent
   * or in the future). A token without `exp` lives forever and is refused. Unset: any lifetime.
   */
  maxTtlSec?: number;
  /**
   * Open mode: the HMAC key that turns a client address into its anonymous user id (default: 32 random bytes, new
   * with each process, so anonymous ids, and with them anonymous conversations, last as long as the process).
   */
  anonymousKey?: Uint8Array;
  /**
   * Open mode: asked before an anonymous caller is let in; false refuses it with `overloaded` (503). The rate
   * limiter answers it, so that the anonymous users it keeps buckets for stay within a bound.
   */
  admitAnonymous?: (userId: string) => boolean;
}

export interface IdentifyInput {
  /** The bearer token, from whichever place the transport found it. */
  token?: string;
  /** `?user=` / `auth.user`: trusted only in open mode, ignored with a secret. */
  user?: string;
  connectionId: string;
  /**
   * The client's address (the peer, or what a trusted proxy says in X-Forwarded-For). In open mode the callers
   * without a user id from one address (one IPv6 /64) are one anonymous user; callers with no address given share one.
   */
  address?: string;
}

export interface Auth {
  readonly mode: 'open' | 'jwt';
  /** True when the secret is shorter than 32 bytes: still used, but main should warn at start. */
  readonly weakSecret: boolean;
  /** Resolves who is calling, or throws AppError('unauthorized'). Never logs or echoes the token. */
  identify(input: IdentifyInput): Promise<Identity>;
}

export function createAuth(options: AuthOptions = {}): Auth {
  const clockToleranceSec = options.clockToleranceSec ?? 5;
  if (!Number.isFinite(clockToleranceSec) || clockToleranceSec < 0) {
    throw new RangeError(`clockToleranceSec must be a number >= 0, got ${clockToleranceSec}`);
  }
  const now = options.now ?? Date.now;
  const maxTtlSec = options.maxTtlSec;
  if (maxTtlSec !== undefined && !(Number.isFinite(maxTtlSec) && maxTtlSec > 0)) {
    throw new RangeError(`maxTtlSec must be a number > 0, got ${maxTtlSec}`);
  }
  // A lifetime bound means nothing for a token that never expires.
  const requiredClaims = options.requireExp === true || maxTtlSec !== undefined ? ['sub', 'exp'] : ['sub'];
  const secret = options.secret;
  if (secret === undefined) {
    const anonymousKey = options.anonymousKey ?? randomBytes(32);
    const admit = options.admitAnonymous ?? (() => true);
    return { mode: 'open', weakSecret: false, identify: async (input) => identifyOpen(input, anonymousKey, admit) };
  }
  if (secret.trim() === '') throw new RangeError('the JWT secret must not be empty or whitespace only (leave it unset for open mode)');

  const secretBytes = new TextEncoder().encode(secret);
  // Imported once: jose would otherwise import the raw secret on every verification.
  const key = crypto.subtle.importKey('raw', secretBytes, { name: 'HMAC', hash: 'SHA-256' }, false, ['verify']);

  async function identifyJwt(input: IdentifyInput): Promise<Identity> {
    const token = input.token;
    if (token === undefined || token === '') throw unauthorized('missing token: send a bearer token');
    if (token.length > MAX_TOKEN_CHARS) throw unauthorized('token too large');
    let payload: unknown;
    try {
      ({ payload } = await jwtVerify(token, await key, {
        algorithms: [JWT_ALGORITHM],
        clockTolerance: clockToleranceSec,
        currentDate: new Date(now()),
        requiredClaims,
        ...(options.audience === undefined ? {} : { audience: options.audience }),
        ...(options.issuer === undefined ? {} : { issuer: options.issuer }),
      }));
    } catch (err) {
      throw unauthorized(describeJoseError(err, maxTtlSec), err);
    }
    if (maxTtlSec !== undefined) checkLifetime(payload as { exp: number; iat?: unknown }, maxTtlSec, now() / 1000, clockToleranceSec);
    const claims = TokenClaimsSchema.safeParse(payload);
    if (!claims.success) {
      const issue = claims.error.issues[0];
      const claim = issue?.path.map(String).join('.') || 'claims';
      throw unauthorized(claim === 'role' ? 'token role must be one of consumer, provider, staff' : `token claim ${claim} is invalid`);
    }
    return { userId: claims.data.sub, role: claims.data.role };
  }

  return { mode: 'jwt', weakSecret: secretBytes.length < MIN_SECRET_BYTES, identify: identifyJwt };
}

function identifyOpen(input: IdentifyInput, anonymousKey: Uint8Array, admit: (userId: string) => boolean): Identity {
  if (input.user === undefined || input.user === '') {
    // One user per address, not per connection: a new connection must not come with fresh buckets.
    const userId = anonymousUserId(anonymousKey, input.address ?? '');
    if (!admit(userId)) throw new AppError('overloaded', 'too many anonymous users right now; retry later');
    return { userId, role: 'consumer' };
  }
  const user = OpenUserIdSchema.safeParse(input.user);
  if (!user.success) throw unauthorized(`invalid user id: ${user.error.issues[0]?.message ?? 'invalid'} (1..128 characters)`);
  return { userId: user.data, role: 'consumer' };
}

/**
 * Refuses a token that lives longer than `maxTtlSec`. Its lifetime counts from `iat`, or from now when `iat` is
 * absent or in the future: a token minted with a far-future `iat` must not pass with a far-future `exp`. The clock
 * tolerance covers an issuer whose clock runs a little ahead.
 */
function checkLifetime(payload: { exp: number; iat?: unknown }, maxTtlSec: number, nowSec: number, toleranceSec: number): void {
  const issuedAt = typeof payload.iat === 'number' && payload.iat < nowSec ? payload.iat : nowSec;
  const lifetimeSec = payload.exp - issuedAt;
  // Not `lifetime > max`: a NaN (exp of 1e309 parses to Infinity, Infinity - Infinity is NaN) must fail too.
  if (!(lifetimeSec <= maxTtlSec + toleranceSec)) {
    throw unauthorized(
      `token lifetime too long: exp is more than ${maxTtlSec} s after ${issuedAt === nowSec ? 'now' : 'iat'}; this server accepts tokens valid for at most ${maxTtlSec} s`,
    );
  }
}

function unauthorized(message: string, cause?: unknown): AppError {
  return new AppError('unauthorized', message, cause === undefined ? {} : { cause });
}

/** A message a client can act on; jose's own messages are fine but the token itself never appears in them. */
function describeJoseError(err: unknown, maxTtlSec: number | undefined): string {
  if (err instanceof errors.JWTExpired) return 'token expired';
  if (err instanceof errors.JWTClaimValidationFailed) {
    if (err.claim === 'nbf') return 'token not yet valid (nbf is in the future)';
    if (err.reason === 'missing' && err.claim === 'exp' && maxTtlSec !== undefined)
      return `token has no exp claim: this server accepts tokens valid for at most ${maxTtlSec} s`;
    if (err.reason === 'missing') return `token has no ${err.claim} claim`;
    if (err.claim === 'aud') return 'token audience (aud) is not this service';
    if (err.claim === 'iss') return 'token issuer (iss) is not the one this service trusts';
    return `token claim ${err.claim} is invalid`;
  }
  if (err instanceof errors.JOSEAlgNotAllowed) return `token algorithm not allowed: only ${JWT_ALGORITHM} is accepted`;
  if (err instanceof errors.JWSSignatureVerificationFailed) return 'token signature is invalid';
  if (err instanceof errors.JWSInvalid || err instanceof errors.JWTInvalid) return 'malformed token';
  return 'invalid token';
}
