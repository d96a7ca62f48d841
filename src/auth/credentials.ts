/**
 * Where a bearer token can travel besides `?token=` (the transport reads the
 * query itself): the WebSocket subprotocol list and the Authorization header.
 */

/** The subprotocol a client offers to speak protocol version 1; the server echoes it back. */
export const SUBPROTOCOL = 'chatwire.v1';
const BEARER_PREFIX = 'bearer.';

export interface OfferedSubprotocols {
  /** The token of a `bearer.<token>` entry, if one was offered. */
  token: string | undefined;
  /**
   * What to send back in Sec-WebSocket-Protocol: `chatwire.v1` when offered,
   * else nothing. Never the bearer entry: that would copy the token into the
   * response (and into every proxy log). Browsers fail a handshake whose
   * offered protocols get no answer, so a browser client sending a token this
   * way must offer `chatwire.v1` with it.
   */
  protocol: typeof SUBPROTOCOL | undefined;
}

/** Reads a Sec-WebSocket-Protocol value such as `chatwire.v1, bearer.eyJ...`. */
export function parseSubprotocols(header: string | undefined): OfferedSubprotocols {
  let token: string | undefined;
  let protocol: typeof SUBPROTOCOL | undefined;
  if (header !== undefined) {
    for (const raw of header.split(',')) {
      const entry = raw.trim();
      if (entry === SUBPROTOCOL) protocol = SUBPROTOCOL;
      else if (token === undefined && entry.startsWith(BEARER_PREFIX) && entry.length > BEARER_PREFIX.length) {
        token = entry.slice(BEARER_PREFIX.length);
      }
    }
  }
  return { token, protocol };
}

/** The token of an `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 9110 section 11.1). */
export function tokenFromAuthorization(header: string | undefined): string | undefined {
  if (header === undefined) return undefined;
  const match = /^Bearer +(\S+) *$/i.exec(header.trim());
  return match?.[1];
}
