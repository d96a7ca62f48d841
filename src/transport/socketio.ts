import type { HttpRequest, HttpResponse, TemplatedApp, WebSocketBehavior } from 'uWebSockets.js';
import { Server as SocketIOServer, type Socket } from 'socket.io';
import { tokenFromAuthorization } from '../auth/credentials.js';
import { socketIoQuery } from '../auth/authenticate.js';
import type { Identity } from '../auth/identity.js';
import type { Sink } from '../chat/task.js';
import { AppError, JsonText, PROTOCOL_VERSION, toAppError, toJson, type OutgoingMessage, type ServerMessage } from '../protocol/index.js';
import { clientAddress } from './client-address.js';
import type { TransportDeps } from './deps.js';
import { echoableId, holdRefusal, Session } from './session.js';
import type { PendingSlot } from './admission.js';
import { frameReadCeiling, frameTooLarge, newConnectionId, refuseRequest } from './ws.js';

interface SocketState {
  connectionId: string;
  identity: Identity;
  /** Frees the per-user connection slot; idempotent. */
  release(): void;
}

// While a socket.io socket is backed up we poll for it to drain: engine.io's uWS transport has no drain event.
const DRAIN_POLL_MS = 25;

/** The socket under engine.io's websocket transport: uWS's, or, on a node:http server, the `ws` package's. */
interface UwsSocketLike {
  getBufferedAmount?: () => number;
  cork?: (fn: () => void) => void;
  end?: (code: number, reason: string) => void;
  /** The `ws` package's: bytes not yet written out, and a close with a code. */
  bufferedAmount?: number;
  close?: (code?: number, reason?: string) => void;
}

/** What chatwire uses of an engine.io connection (engine.io's own types do not expose its transport's socket). */
interface EngineConnection {
  readyState: string;
  /** The handshake request. */
  request: object;
  once(event: 'close', listener: () => void): void;
  transport: { name: string; socket?: UwsSocketLike };
  on(event: 'packet', listener: (packet: { type: string; data?: unknown }) => void): void;
  write(data: string): void;
  close(): void;
}

/** The uWS socket under a socket.io connection on the websocket transport; undefined on polling or once closed. */
/** A header as socket.io hands it over: a string, a list of them, or absent. */
function headerText(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value.join(',') : value;
}

function uwsSocketOf(socket: Socket): UwsSocketLike | undefined {
  const transport = socket.conn.transport as unknown as { name: string; socket?: UwsSocketLike };
  return transport.name === 'websocket' && socket.conn.readyState === 'open' ? transport.socket : undefined;
}

/** Runs `fn` with the connection's frames written in one syscall where its transport allows. */
function corked(socket: Socket, fn: () => void): void {
  const ws = uwsSocketOf(socket);
  if (typeof ws?.cork !== 'function') return fn();
  let ran = false;
  try {
    ws.cork(() => {
      ran = true;
      fn();
    });
  } catch (err) {
    // A socket closed under us throws on entry: then write uncorked (engine.io drops it).
    if (ran) throw err;
    fn();
  }
}

/**
 * Writes what `socket.emit(type, payload)` writes for a payload without binary data on the main namespace,
 * straight to the engine.io connection: an EVENT packet of the socket.io protocol (v5), `2` and then the JSON
 * array [type, payload]. socket.io's own emit walks the payload for binary, logs through `debug`, and builds and
 * encodes a packet object per message: a tenth of the main thread's time when streaming deltas. chatwire uses
 * only the main namespace, no outgoing listeners and no connection-state recovery, so nothing else is skipped.
 */
function writeEvent(socket: Socket, type: string, payload: unknown): void {
  if (socket.conn.readyState !== 'open') return;
  socket.conn.write(`2[${JSON.stringify(type)},${toJson(payload)}]`);
}

function bufferedBytes(socket: Socket): number {
  const ws = uwsSocketOf(socket);
  const wsBuffered = ws?.getBufferedAmount?.() ?? ws?.bufferedAmount ?? 0;
  // Packets engine.io holds itself (polling, or a websocket mid-send), counted at a nominal size.
  const queued = (socket.conn as unknown as { writeBuffer?: unknown[] }).writeBuffer?.length ?? 0;
  return wsBuffered + queued * 256;
}

type HttpHandler = (res: HttpResponse, req: HttpRequest) => void;
type UpgradeHandler = NonNullable<WebSocketBehavior<unknown>['upgrade']>;

/**
 * The uWS app as engine.io sees it: every request that would start a new session (no `sid`) first takes a place
 * among the connections waiting to authenticate, and past the bound is refused here, before engine.io builds
 * anything for it. The place is found again through the request object, which engine.io keeps as `conn.request`.
 */
function admittingApp(app: TemplatedApp, deps: TransportDeps, slots: WeakMap<object, PendingSlot>): TemplatedApp {
  const { config } = deps;
  // A place is given back when the session authenticates, closes or is refused; this is the bound in case none
  // of those ever happens (a handshake aborted half-way): socket.io closes such a session by then anyway.
  const backstopMs = config.handshakeTimeoutMs + 1000;
  const admit = (res: HttpResponse, req: HttpRequest): boolean => {
    if (req.getQuery('sid') !== undefined) return true;
    const peer = Buffer.from(res.getRemoteAddressAsText()).toString();
    const address = clientAddress(peer, req.getHeader('x-forwarded-for') || undefined, config.trustProxy);
    const admitted = deps.admission.admit(address);
    if (!admitted.ok) {
      refuseRequest(res, admitted.error, admitted.closeConnection);
      return false;
    }
    slots.set(req, admitted.slot);
    setTimeout(() => admitted.slot.release(), backstopMs).unref();
    return true;
  };
  const wrapped = {
    any(pattern: string, handler: HttpHandler) {
      app.any(pattern, (res, req) => {
        if (admit(res, req)) handler(res, req);
      });
      return wrapped;
    },
    ws(pattern: string, behavior: WebSocketBehavior<unknown>) {
      const upgrade = behavior.upgrade as UpgradeHandler;
      app.ws(pattern, {
        ...behavior,
        upgrade: (res, req, context) => {
          if (admit(res, req)) upgrade(res, req, context);
        },
      });
      return wrapped;
    },
  };
  return wrapped as unknown as TemplatedApp;
}

/**
 * Credentials in the handshake request itself (`?token=`, `Authorization`, `?user=` in open mode) are checked
 * there: a bad one is refused (403, engine.io's only refusal) before a session exists. Without any, the session
 * gets the handshake timeout to bring them in socket.io's CONNECT.
 */
async function checkHandshakeCredentials(deps: TransportDeps, req: { headers: Record<string, string | string[] | undefined>; _query?: Record<string, string> }): Promise<void> {
  const query = req._query ?? {};
  const token = query.token ?? tokenFromAuthorization(headerText(req.headers.authorization));
  const user = deps.auth.mode === 'open' ? query.user : undefined;
  if (token === undefined && user === undefined) return;
  const address = clientAddress(String((req as { connection?: { remoteAddress?: string } }).connection?.remoteAddress ?? ''), headerText(req.headers['x-forwarded-for']), deps.config.trustProxy);
  await deps.auth.identify({ token, user, connectionId: 'handshake', address, request: { transport: 'socket.io', headers: req.headers, query: socketIoQuery(query, undefined) } });
}

/**
 * socket.io on the same uWS app: event name = message type, the payload is
 * the message without `type`, the direct reply goes to the ack callback (or is
 * emitted as an event when the client gave none), server-initiated messages are
 * events named by their type.
 */
export function attachSocketIO(target: TemplatedApp | ((io: SocketIOServer, admitting: (app: TemplatedApp) => TemplatedApp) => void), deps: TransportDeps): SocketIOServer {
  const { config, metrics, log } = deps;
  const allowedOrigins = config.allowedOrigins === '*' ? null : new Set(config.allowedOrigins);
  const softLimit = Math.min(64 * 1024, Math.floor(config.maxBackpressureBytes / 4));
  const framesOut = metrics.framesOut.tally('socket.io');
  const framesIn = metrics.framesIn.tally('socket.io');
  const io = new SocketIOServer({
    // Read frames and polling bodies past our limit whole (up to the ceiling /ws has): refuseOversized answers
    // them with payload_too_large and 1009, as /ws does, where engine.io's own limit at our limit would drop them.
    maxHttpBufferSize: frameReadCeiling(config.maxFrameBytes),
    pingInterval: 25_000,
    pingTimeout: 20_000,
    serveClient: false,
    // A session that has not completed socket.io's CONNECT with valid credentials by then is closed (default 45 s).
    connectTimeout: config.handshakeTimeoutMs,
    // An origin that is not allowed gets no CORS header at all (a static list would still grant credentials).
    cors: { origin: (origin, grant) => grant(null, origin !== undefined && (allowedOrigins === null || allowedOrigins.has(origin))), credentials: true },
    allowRequest: (req, callback) => {
      try {
        deps.checkOrigin(req.headers.origin);
      } catch (err) {
        callback(toAppError(err).message, false);
        return;
      }
      checkHandshakeCredentials(deps, req as unknown as Parameters<typeof checkHandshakeCredentials>[1]).then(
        () => callback(null, true),
        (err: unknown) => callback(toAppError(err).message, false),
      );
    },
  });
  const pendingSlots = new WeakMap<object, PendingSlot>();
  const admitting = (uwsApp: TemplatedApp) => admittingApp(uwsApp, deps, pendingSlots);
  // A function mounts it elsewhere: on a host's uWS app under a prefix (behind the same admission), or on a
  // node:http server (node-http.ts).
  if (typeof target === 'function') target(io, admitting);
  else io.attachApp(admitting(target));
  io.engine.on('connection_error', (err: { req?: object }) => {
    if (err.req) pendingSlots.get(err.req)?.release();
  });

  // A message over the frame limit, seen before socket.io decodes it: refused as /ws refuses one.
  io.engine.on('connection', (conn: EngineConnection) => {
    const slot = pendingSlots.get(conn.request);
    if (slot) conn.once('close', () => slot.release());
    conn.on('packet', (packet: { type: string; data?: unknown }) => {
      if (packet.type !== 'message') return;
      const data = packet.data;
      // A string of n UTF-16 units is at most 3n bytes: most messages need no byte count at all.
      if (typeof data === 'string' && data.length * 3 <= config.maxFrameBytes) return;
      const bytes = typeof data === 'string' ? Buffer.byteLength(data) : ((data as { byteLength?: number } | undefined)?.byteLength ?? 0);
      if (bytes <= config.maxFrameBytes) return;
      // engine.io does nothing with a noop packet: socket.io never sees this message.
      packet.type = 'noop';
      framesIn.inc();
      refuseOversized(conn, bytes);
    });
  });

  function refuseOversized(conn: EngineConnection, bytes: number): void {
    if (conn.readyState !== 'open') return;
    conn.write(`2["error",${toJson(frameTooLarge(bytes, config.maxFrameBytes))}]`);
    framesOut.inc();
    const ws = conn.transport.name === 'websocket' ? conn.transport.socket : undefined;
    if (ws?.end) {
      // Written synchronously above (the transport was writable) or not at all: the close follows the error.
      try {
        ws.end(1009, 'frame too large');
        return;
      } catch {
        // Closed under us: engine.io closes the connection below.
      }
    } else if (typeof ws?.bufferedAmount === 'number' && ws.close) {
      // The `ws` package's socket (node:http): its close frame goes out after the error, on the same socket.
      ws.close(1009, 'frame too large');
      return;
    }
    conn.close();
  }

  io.use((socket, next) => {
    const auth = (socket.handshake.auth ?? {}) as Record<string, unknown>;
    const query = socket.handshake.query as Record<string, unknown>;
    const connectionId = newConnectionId();
    const token = typeof auth.token === 'string' ? auth.token : typeof query.token === 'string' ? query.token : undefined;
    const user = typeof auth.user === 'string' ? auth.user : typeof query.user === 'string' ? query.user : undefined;
    deps.auth
      .identify({
        token,
        user,
        connectionId,
        address: clientAddress(socket.handshake.address, headerText(socket.handshake.headers['x-forwarded-for']), config.trustProxy),
        request: { transport: 'socket.io', headers: socket.handshake.headers, query: socketIoQuery(query, auth) },
      })
      .then((identity) => {
        // The client may have gone while the token was checked: socket.io then drops the socket without a
        // 'disconnect', so a slot counted now would never be freed.
        if (socket.conn.readyState !== 'open') throw new AppError('bad_request', 'the client went away');
        // Authenticated: no longer one of the connections waiting to.
        pendingSlots.get(socket.conn.request)?.release();
        const admitted = deps.connections.opened(identity.userId);
        if (!admitted.ok) throw admitted.error;
        let held = true;
        const release = () => {
          if (!held) return;
          held = false;
          deps.connections.closed(identity.userId);
        };
        // Also covers a close between next() and 'connection' (socket.io checks readyState a tick later).
        socket.conn.once('close', release);
        (socket.data as SocketState) = { connectionId, identity, release };
        next();
      })
      .catch((err: unknown) => {
        const e = toAppError(err);
        const refusal = new Error(e.message) as Error & { data: unknown };
        // socket.io sends the connect_error but keeps the engine.io connection open (until its connectTimeout,
        // 45 s): a refused client must not hold a half-open socket, so it is closed once the refusal is out
        // (socket.io writes it a tick after next(); close() still flushes anything queued).
        const refuse = () => {
          next(refusal);
          setImmediate(() => socket.conn.close());
        };
        if (e.retryAfterMs === undefined) {
          refusal.data = { code: e.code, message: e.message };
          refuse();
          return;
        }
        refusal.data = { code: e.code, message: e.message, retryAfterMs: Math.ceil(e.retryAfterMs) };
        void holdRefusal(e.retryAfterMs).then(refuse);
      });
  });

  io.on('connection', (socket) => {
    const state = socket.data as SocketState;
    let closed = false;
    let drainTimer: NodeJS.Timeout | undefined;
    metrics.connections.inc({ transport: 'socket.io' });

    const emit = (m: ServerMessage): boolean => {
      if (closed) return false;
      writeEvent(socket, m.type, m);
      framesOut.inc();
      if (bufferedBytes(socket) > config.maxBackpressureBytes) {
        metrics.slowClientsClosed.inc();
        closed = true;
        socket.disconnect(true);
        return false;
      }
      return true;
    };
    const watchDrain = () => {
      if (drainTimer || closed) return;
      drainTimer = setInterval(() => {
        if (closed || bufferedBytes(socket) <= softLimit) {
          clearInterval(drainTimer);
          drainTimer = undefined;
          if (!closed) session.pump();
        }
      }, DRAIN_POLL_MS);
    };
    const sink: Sink = {
      deliver: emit,
      congested: () => {
        if (closed) return true;
        if (bufferedBytes(socket) <= softLimit) return false;
        watchDrain();
        return true;
      },
      cork: (fn) => {
        if (closed) fn();
        else corked(socket, fn);
      },
    };
    const session = new Session(deps.session, state.identity, sink);

    socket.onAny((event: string, ...args: unknown[]) => {
      // Events already decoded when the socket was closed for flooding must not count as more floods.
      if (closed) return;
      framesIn.inc();
      const ack = typeof args.at(-1) === 'function' ? (args.pop() as (m: ServerMessage) => void) : undefined;
      const reply = (m: OutgoingMessage) => {
        if (closed) return;
        framesOut.inc();
        // socket.io encodes an ack's arguments itself: a serialized page is parsed back for it.
        if (ack) ack(m instanceof JsonText ? (JSON.parse(m.json) as ServerMessage) : m);
        else writeEvent(socket, m.type, m);
      };
      const payload = args[0] ?? {};
      // Malformed events go through the session too: they count against the user's rate like any other.
      const verdict =
        args.length > 1
          ? session.reject('send one payload object per event', reply, echoableId(payload))
          : typeof payload !== 'object' || payload === null || Array.isArray(payload)
            ? session.reject('the payload must be a JSON object', reply)
            : session.handle({ ...(payload as Record<string, unknown>), type: event }, reply);
      if (verdict === 'flooding') {
        closed = true;
        socket.disconnect(true);
      }
    });

    socket.on('disconnect', () => {
      closed = true;
      if (drainTimer) clearInterval(drainTimer);
      metrics.connections.dec({ transport: 'socket.io' });
      state.release();
      session.close();
    });

    emit({
      type: 'hello',
      connectionId: state.connectionId,
      userId: state.identity.userId,
      protocol: PROTOCOL_VERSION,
      provider: deps.providerName,
      model: config.model,
      limits: { maxFrameBytes: config.maxFrameBytes, messagesPerSecond: config.messagesPerSecond, chatsPerMinute: config.chatsPerMinute },
    });
  });

  io.engine.on('connection_error', (err: { code: number; message: string }) => {
    log.debug({ code: err.code, message: err.message }, 'socket.io connection refused');
  });
  return io;
}
