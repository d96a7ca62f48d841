/**
 * The `authenticate` hook of createChatwire(): a host's own login (a cookie session, an API key) in place of
 * chatwire's JWT verifier. Every transport hands it the same view of the request, and its answer is checked here,
 * once, so that a host's bug (a number as the user id, an unknown role) never reaches the chat service.
 */
import type { IncomingHttpHeaders } from 'node:http';
import { z } from 'zod';
import { AppError, RoleSchema, type Role } from '../protocol/index.js';
import type { Authenticator, AuthRequest } from '../transport/deps.js';
import { createAuth } from './auth.js';
import { OpenUserIdSchema } from './claims.js';
import { parseSubprotocols, tokenFromAuthorization } from './credentials.js';
import type { Identity } from './identity.js';

export interface AuthenticateInput {
  /** The request's (or the upgrade's) headers, names in lower case; a repeated header's values joined with `, `. */
  readonly headers: Readonly<Record<string, string>>;
  /**
   * The request's (or the upgrade's) query. For socket.io: the handshake's query with the handshake's `auth` fields
   * merged in as query parameters (an `auth` field wins over a query parameter of the same name; values that are not
   * strings are written as String(value) would, objects as JSON).
   */
  readonly query: URLSearchParams;
  /** Which transport asks: the raw WebSocket, socket.io, or an HTTP route (`/v1/...`, SSE included). */
  readonly transport: 'ws' | 'socket.io' | 'http';
  /** The client's address: the peer, or what a trusted proxy (trustProxy) says in X-Forwarded-For. */
  readonly address: string;
}

/** Who the caller is (`role` defaults to `consumer`), or null to refuse it with 401. */
export type AuthenticateResult = { userId: string; role?: Role } | null;

export type Authenticate = (input: AuthenticateInput) => AuthenticateResult | Promise<AuthenticateResult>;

const ResultSchema = z.strictObject({ userId: OpenUserIdSchema, role: RoleSchema.optional() });

function lowerCaseHeaders(headers: AuthRequest['headers']): Record<string, string> {
  const out: Record<string, string> = {};
  if (headers instanceof Map) {
    for (const [k, v] of headers) out[k.toLowerCase()] = v;
    return out;
  }
  for (const [k, v] of Object.entries(headers as IncomingHttpHeaders)) {
    if (v !== undefined) out[k.toLowerCase()] = Array.isArray(v) ? v.join(', ') : v;
  }
  return out;
}

/** The query a socket.io handshake's hook sees: the handshake query, then its `auth` fields over it. */
export function socketIoQuery(query: Record<string, unknown>, auth: Record<string, unknown> | undefined): URLSearchParams {
  const out = new URLSearchParams();
  const text = (v: unknown) => (typeof v === 'object' && v !== null ? JSON.stringify(v) : String(v));
  for (const [k, v] of Object.entries(query)) {
    if (v === undefined) continue;
    if (Array.isArray(v)) for (const each of v) out.append(k, text(each));
    else out.set(k, text(v));
  }
  for (const [k, v] of Object.entries(auth ?? {})) {
    if (v !== undefined) out.set(k, text(v));
  }
  return out;
}

/**
 * An Authenticator over a host's hook. The hook's null is a 401; an AppError it throws keeps its code; any other
 * throw, or an answer of the wrong shape, is the host's bug: logged, and `internal` (500) for the caller.
 */
export function hookAuthenticator(hook: Authenticate, onBug: (err: unknown, what: string) => void): Authenticator {
  return {
    mode: 'jwt',
    async identify(input): Promise<Identity> {
      const request = input.request;
      if (request === undefined) throw new AppError('internal', 'this transport does not hand the authenticate hook its request');
      let answer: unknown;
      try {
        answer = await hook({ headers: lowerCaseHeaders(request.headers), query: request.query, transport: request.transport, address: input.address ?? '' });
      } catch (err) {
        if (err instanceof AppError) throw err;
        onBug(err, 'the authenticate hook threw');
        throw new AppError('internal', 'authentication failed', { cause: err });
      }
      if (answer === null) throw new AppError('unauthorized', 'not authenticated');
      const parsed = ResultSchema.safeParse(answer);
      if (!parsed.success) {
        onBug(parsed.error, 'the authenticate hook answered neither null nor { userId, role }');
        throw new AppError('internal', 'authentication failed');
      }
      return { userId: parsed.data.userId, role: parsed.data.role ?? 'consumer' };
    },
  };
}

export interface JwtAuthenticateOptions {
  jwtSecret: string;
  jwtRequireExp?: boolean | undefined;
  jwtAudience?: string | undefined;
  jwtIssuer?: string | undefined;
}

/**
 * chatwire's JWT verifier as an authenticate hook: the token from where each transport carries it (HTTP:
 * `Authorization: Bearer`, then `?token=`; /ws: `?token=`, then the `bearer.<token>` subprotocol; socket.io:
 * `auth.token`, then `?token=`), checked as chatwire checks it without a hook. For a host that accepts its own
 * sessions and chatwire's tokens both: `authenticate: async (r) => (await mySession(r)) ?? jwt(r)`. A bad token
 * throws the verifier's 401 (its message says what is wrong) rather than answering null.
 */
export function jwtAuthenticate(options: JwtAuthenticateOptions): Authenticate {
  const auth = createAuth({
    secret: options.jwtSecret,
    requireExp: options.jwtRequireExp ?? false,
    ...(options.jwtAudience === undefined ? {} : { audience: options.jwtAudience }),
    ...(options.jwtIssuer === undefined ? {} : { issuer: options.jwtIssuer }),
  });
  return async ({ headers, query, transport, address }) => {
    const fromQuery = query.get('token') ?? undefined;
    const token =
      transport === 'http'
        ? (tokenFromAuthorization(headers.authorization) ?? fromQuery)
        : transport === 'ws'
          ? (fromQuery ?? parseSubprotocols(headers['sec-websocket-protocol']).token)
          : fromQuery;
    return auth.identify(token === undefined ? { connectionId: '', address } : { token, connectionId: '', address });
  };
}
