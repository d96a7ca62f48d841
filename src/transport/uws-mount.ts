/**
 * chatwire on a uWebSockets.js app the host already has: the same routes and /ws handler as listen()'s own app
 * (server.ts), registered under a prefix through a thin view of the host's app, and socket.io attached with
 * `io.attachApp(app, { path: prefix + '/socket.io' })`. Handlers see paths below the prefix, as they would on
 * chatwire's own app. uWS has no call that removes a route: after close(), chatwire's routes on the host's app
 * answer 404 (and its upgrades, socket.io's too, are refused with 404) instead.
 */
import type { HttpRequest, HttpResponse, TemplatedApp, WebSocket, WebSocketBehavior } from 'uWebSockets.js';
import type { TransportDeps } from './deps.js';
import { attachHttpRoutes } from './http-routes.js';
import { mountsRoute } from './mount-paths.js';
import type { HttpServer } from './server.js';
import { attachSocketIO } from './socketio.js';
import { attachWebSocket, endSockets } from './ws.js';

type Handler = (res: HttpResponse, req: HttpRequest) => void | Promise<void>;

/** The request as the handler would see it on chatwire's own app: getUrl() below the prefix. */
function below(prefix: string, req: HttpRequest): HttpRequest {
  if (prefix === '') return req;
  const url = req.getUrl().slice(prefix.length) || '/';
  // The request's own getters, called on it (uWS checks their receiver); only getUrl differs.
  const view: Partial<HttpRequest> = { getUrl: () => url };
  for (const name of ['getHeader', 'getParameter', 'getMethod', 'getCaseSensitiveMethod', 'getQuery', 'forEach', 'setYield'] as const) {
    (view as Record<string, unknown>)[name] = (req[name] as (...args: unknown[]) => unknown).bind(req);
  }
  return view as HttpRequest;
}

function notFound(res: HttpResponse): void {
  res.cork(() => res.writeStatus('404 Not Found').writeHeader('content-type', 'text/plain').end('not found'));
}

/** The calls attachHttpRoutes and attachWebSocket make, registered on the host's app under the prefix. */
function prefixedApp(app: TemplatedApp, prefix: string, gate: { open: boolean }): TemplatedApp {
  const wrap =
    (handler: Handler): Handler =>
    (res, req) =>
      gate.open ? handler(res, below(prefix, req)) : notFound(res);
  const patterns = (pattern: string): string[] => {
    // A catch-all under an empty prefix would take the host's own unknown paths: keep it to chatwire's /v1.
    if (pattern === '/*' && prefix === '') return ['/v1', '/v1/*'];
    return [prefix + pattern];
  };
  const route = (method: 'get' | 'post' | 'options' | 'any') => (pattern: string, handler: Handler) => {
    if (mountsRoute(pattern)) for (const p of patterns(pattern)) app[method](p, wrap(handler));
    return view;
  };
  const view = {
    get: route('get'),
    post: route('post'),
    options: route('options'),
    any: route('any'),
    ws<T>(pattern: string, behavior: WebSocketBehavior<T>) {
      const upgrade = behavior.upgrade;
      app.ws<T>(prefix + pattern, {
        ...behavior,
        upgrade: (res, req, context) => (gate.open && upgrade ? upgrade(res, below(prefix, req), context) : notFound(res)),
      });
      return view;
    },
  };
  return view as unknown as TemplatedApp;
}

/** The host's app as socket.io's engine registers on it (`any` and `ws` on its own path): behind the same gate. */
function gatedApp(app: TemplatedApp, gate: { open: boolean }): TemplatedApp {
  const view = {
    any(pattern: string, handler: Handler) {
      app.any(pattern, (res, req) => (gate.open ? handler(res, req) : notFound(res)));
      return view;
    },
    ws<T>(pattern: string, behavior: WebSocketBehavior<T>) {
      const upgrade = behavior.upgrade;
      app.ws<T>(pattern, { ...behavior, upgrade: (res, req, context) => (gate.open && upgrade ? upgrade(res, req, context) : notFound(res)) });
      return view;
    },
    // socket.io publishes its broadcasts through the app (chatwire sends none, but socket.io keeps the call).
    publish: app.publish.bind(app),
  };
  return view as unknown as TemplatedApp;
}

export function attachToUwsApp(app: TemplatedApp, deps: TransportDeps, prefix: string): HttpServer {
  const gate = { open: true };
  const view = prefixedApp(app, prefix, gate);
  const sockets = new Set<WebSocket<unknown>>();
  attachWebSocket(view, deps, { open: (ws) => sockets.add(ws), close: (ws) => sockets.delete(ws) });
  const http = attachHttpRoutes(view, deps);
  const io = attachSocketIO((s, admitting, uwsOptions) => s.attachApp(admitting(gatedApp(app, gate)), { ...uwsOptions, path: `${prefix}/socket.io` }), deps);
  let closed = false;
  const server: HttpServer = {
    port: 0,
    stopListening() {
      gate.open = false;
    },
    closeConnections(code = 1001, reason = 'server shutting down') {
      http.closeStreams();
      endSockets(sockets, code, reason);
      io.local.disconnectSockets(true);
    },
    async close() {
      if (closed) return;
      closed = true;
      server.stopListening();
      server.closeConnections();
      // Attached with attachApp, socket.io has no http server of its own to close: this closes only its engine.
      await io.close();
    },
  };
  return server;
}
