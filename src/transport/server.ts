import uWS, { type WebSocket, type us_listen_socket } from 'uWebSockets.js';
import type { Server as SocketIOServer } from 'socket.io';
import type { TransportDeps } from './deps.js';
import { attachHttpRoutes } from './http-routes.js';
import { attachSocketIO } from './socketio.js';
import { attachWebSocket, endSockets } from './ws.js';

export interface HttpServer {
  readonly port: number;
  /** Stops accepting connections; open sockets stay until closeConnections(). */
  stopListening(): void;
  /** Closes every open WebSocket, socket.io socket and SSE stream. */
  closeConnections(code?: number, reason?: string): void;
  close(): Promise<void>;
}

/**
 * uWebSockets.js silently falls back to a slow pure-JS shim when its native
 * binary does not load; the shim has no SSLApp. Refuse to run on it.
 */
export function assertNativeUws(): void {
  if (typeof (uWS as unknown as { SSLApp?: unknown }).SSLApp !== 'function') {
    throw new Error('uWebSockets.js native binary failed to load (no SSLApp): refusing to run on the fallback shim');
  }
}

/** listen(host, port, options, cb): in the native module, missing from its types (which give options only without a host). */
type ListenWithOptions = (host: string, port: number, options: number, cb: (socket: us_listen_socket | false) => void) => void;
/** uWS.LIBUS_LISTEN_EXCLUSIVE_PORT (the types declare it only inside a const enum the module does not export). */
const LIBUS_LISTEN_EXCLUSIVE_PORT = 1;

/** One uWS app serving /ws, socket.io and HTTP on one port. */
export async function startHttpServer(deps: TransportDeps, host: string, port: number): Promise<HttpServer> {
  assertNativeUws();
  const app = uWS.App();
  const sockets = new Set<WebSocket<unknown>>();
  attachWebSocket(app, deps, { open: (ws) => sockets.add(ws), close: (ws) => sockets.delete(ws) });
  const io: SocketIOServer = attachSocketIO(app, deps);
  const http = attachHttpRoutes(app, deps);

  const listenSocket = await new Promise<us_listen_socket>((resolve, reject) => {
    // Exclusive: uWS otherwise listens with SO_REUSEPORT, and a second process on the same port (an old build,
    // another data dir, open mode) would silently take a share of the connections instead of failing here.
    (app as unknown as { listen: ListenWithOptions }).listen(host, port, LIBUS_LISTEN_EXCLUSIVE_PORT, (socket) => {
      if (socket) resolve(socket);
      else reject(new Error(`could not listen on ${host}:${port} (in use or not permitted)`));
    });
  });
  const boundPort = uWS.us_socket_local_port(listenSocket as unknown as uWS.us_socket);
  let listening = true;
  let closed = false;

  const server: HttpServer = {
    port: boundPort,
    stopListening() {
      if (!listening) return;
      listening = false;
      uWS.us_listen_socket_close(listenSocket);
    },
    closeConnections(code = 1001, reason = 'server shutting down') {
      http.closeStreams();
      endSockets(sockets, code, reason);
      io.disconnectSockets(true);
    },
    async close() {
      if (closed) return;
      closed = true;
      server.stopListening();
      server.closeConnections();
      await new Promise<void>((resolve) => {
        io.close(() => resolve());
      }).catch(() => {});
      (app as unknown as { close(): void }).close();
    },
  };
  return server;
}
