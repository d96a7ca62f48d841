/**
 * Which paths chatwire answers when it is mounted on a host's server (attach), under a prefix such as `/chat`.
 * Everything else is the host's. Under a non-empty prefix every path below it is chatwire's (an unknown one gets
 * chatwire's JSON 404); with an empty prefix only chatwire's own paths are. The browser page (`/`, its script and
 * icon) is served only by listen(): it connects to the origin's `/ws`, which under a prefix is not chatwire's.
 */

/**
 * The routes of attachHttpRoutes that a mount serves besides /v1/... and /api/chat/...: health, metrics, the client
 * library, the API description, the AI SDK chat stream.
 */
const NAMED = new Set(['/ws', '/v1', '/healthz', '/readyz', '/metrics', '/client.js', '/openapi.json', '/api/chat']);

/** The path prefixes whose every path is chatwire's on a mount. */
const OWNED_PREFIXES = ['/v1/', '/api/chat/'];

/** A prefix as given (`/chat`, `/chat/`, `` or `/`) normalised to `/chat` or ``; null when it is not a path. */
export function normalizePrefix(prefix: string | undefined): string | null {
  if (prefix === undefined || prefix === '' || prefix === '/') return '';
  if (typeof prefix !== 'string' || !/^(\/[A-Za-z0-9._~!$&'()*+,;=:@-]+)+\/?$/.test(prefix)) return null;
  return prefix.endsWith('/') ? prefix.slice(0, -1) : prefix;
}

/** The path below the prefix (`/chat/v1/chat` → `/v1/chat`), or null when the path is not under it. */
export function innerPath(prefix: string, path: string): string | null {
  if (prefix === '') return path;
  if (path === prefix) return '/';
  return path.startsWith(prefix + '/') ? path.slice(prefix.length) : null;
}

/** Whether chatwire answers `inner` (a path below the prefix); socket.io's own path is engine.io's to check. */
export function ownsPath(prefix: string, inner: string): boolean {
  if (prefix !== '') return true;
  return NAMED.has(inner) || OWNED_PREFIXES.some((p) => inner.startsWith(p));
}

/** Whether a route of attachHttpRoutes is served on a mount: everything but the browser page's files. */
export function mountsRoute(pattern: string): boolean {
  return pattern.includes('*') || pattern.includes(':') || NAMED.has(pattern) || OWNED_PREFIXES.some((p) => pattern.startsWith(p));
}
