import uWS, { type HttpRequest, type HttpResponse, type TemplatedApp, type WebSocketBehavior } from 'uWebSockets.js';
import { Server as SocketIOServer, type Socket } from 'socket.io';
import { tokenFromAuthorization } from '../auth/credentials.js';
import { socketIoQuery } from '../auth/authenticate.js';
import type { Identity } from '../auth/identity.js';
import type { Sink } from '../chat/task.js';
import { AppError, CLIENT_MESSAGE_BOUNDS, scanFrame, toAppError, toJson, type FrameBounds, type ServerMessage } from '../protocol/index.js';
import type { TransportDeps } from './deps.js';
import { echoableId, holdRefusal, Session, type Admission, type Reply } from './session.js';
import type { PendingSlot } from './admission.js';
import {
  callerAddress,
  FRAME_TOO_LARGE_CLOSE,
  frameReadCeiling,
  frameTooLarge,
  helloFrame,
  newConnectionId,
  softBackpressureLimit,
  takeUserSlot,
} from './connection.js';
import { refuseRequest } from './ws.js';

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

/** An engine.io message packet: text, or binary data (a socket.io attachment). */
interface EnginePacket {
  type: string;
  data?: unknown;
}

// A socket.io EVENT is the array [type, payload]: one level and two values more than the message itself.
const EVENT_BOUNDS: FrameBounds = Object.freeze({ depth: CLIENT_MESSAGE_BOUNDS.depth + 1, values: CLIENT_MESSAGE_BOUNDS.values + 2 });
// Before its CONNECT has been accepted a connection sends only that packet, whose auth object is flat: anything
// far deeper or larger is refused before socket.io decodes it.
const HANDSHAKE_BOUNDS: FrameBounds = Object.freeze({ depth: 4, values: 64 });

/** A socket.io EVENT packet of the main namespace (`2`, an optional ack id, the JSON array); null for anything else. */
function eventPacket(text: string): { ackId: string | undefined; json: string } | null {
  if (text.charCodeAt(0) !== 0x32) return null;
  let at = 1;
  while (at < text.length && text.charCodeAt(at) >= 0x30 && text.charCodeAt(at) <= 0x39) at++;
  if (text.charCodeAt(at) !== 0x5b) return null;
  return { ackId: at > 1 ? text.slice(1, at) : undefined, json: text.slice(at) };
}

/** A header as socket.io hands it over: a string, a list of them, or absent. */
function headerText(value: string | string[] | undefined): string | undefined {
  return Array.isArray(value) ? value.join(',') : value;
}

/** The uWS socket under a socket.io connection on the websocket transport; undefined on polling or once closed. */
function uwsSocketOf(socket: Socket): UwsSocketLike | undefined {
  const transport = socket.conn.transport as unknown as { name: string; socket?: UwsSocketLike };
  return transport.name === 'websocket' && socket.conn.readyState === 'open' ? transport.socket : undefined;
}

/** Runs `fn` with the connection's frames written in one syscall where its transport allows. */
function corked(socket: Socket, fn: () => void): void {
  const ws = uwsSocketOf(socket);
  if (typeof ws?.cork !== 'function') {
    fn();
    return;
  }
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
 * The packet `socket.emit(type, payload)` writes for a payload without binary data on the main namespace: an
 * EVENT packet of the socket.io protocol (v5), `2` and then the JSON array [type, payload]. Written straight to
 * the engine.io connection: socket.io's own emit walks the payload for binary, logs through `debug`, and builds and
 * encodes a packet object per message: a tenth of the main thread's time when streaming deltas. chatwire uses
 * only the main namespace, no outgoing listeners and no connection-state recovery, so nothing else is skipped.
 */
function eventPacketText(type: string, payload: unknown): string {
  return `2[${JSON.stringify(type)},${toJson(payload)}]`;
}

type HttpHandler = (res: HttpResponse, req: HttpRequest) => void;
type UpgradeHandler = NonNullable<WebSocketBehavior<unknown>['upgrade']>;

/**
 * Takes a place for a handshake that would start a new engine.io session, kept under `key` (the request object
 * engine.io keeps as `conn.request`), or refuses it on `res`: false when refused.
 */
function admitHandshake(deps: TransportDeps, slots: WeakMap<object, PendingSlot>, res: HttpResponse, key: object, forwardedFor: string | undefined): boolean {
  const peer = Buffer.from(res.getRemoteAddressAsText()).toString();
  const admitted = deps.admission.admit(callerAddress(deps, peer, forwardedFor));
  if (!admitted.ok) {
    refuseRequest(res, admitted.error, admitted.closeConnection);
    return false;
  }
  slots.set(key, admitted.slot);
  // A place is given back when the session authenticates, closes or is refused; this is the bound in case none
  // of those ever happens (a handshake aborted half-way): socket.io closes such a session by then anyway.
  setTimeout(() => admitted.slot.release(), deps.config.handshakeTimeoutMs + 1000).unref();
  return true;
}

/**
 * The uWS app as engine.io sees it: every request that would start a new session (no `sid`) first takes a place
 * among the connections waiting to authenticate, and past the bound is refused here, before engine.io builds
 * anything for it. The place is found again through the request object, which engine.io keeps as `conn.request`.
 */
function admittingApp(app: TemplatedApp, deps: TransportDeps, slots: WeakMap<object, PendingSlot>): TemplatedApp {
  const admit = (res: HttpResponse, req: HttpRequest): boolean => {
    if (req.getQuery('sid') !== undefined) return true;
    return admitHandshake(deps, slots, res, req, req.getHeader('x-forwarded-for') || undefined);
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
async function checkHandshakeCredentials(
  deps: TransportDeps,
  req: { headers: Record<string, string | string[] | undefined>; _query?: Record<string, string> },
): Promise<void> {
  const query = req._query ?? {};
  const token = query.token ?? tokenFromAuthorization(headerText(req.headers.authorization));
  const user = deps.auth.mode === 'open' ? query.user : undefined;
  if (token === undefined && user === undefined) return;
  const address = callerAddress(
    deps,
    String((req as { connection?: { remoteAddress?: string } }).connection?.remoteAddress ?? ''),
    headerText(req.headers['x-forwarded-for']),
  );
  await deps.auth.identify({
    token,
    user,
    connectionId: 'handshake',
    address,
    request: { transport: 'socket.io', headers: req.headers, query: socketIoQuery(query, undefined) },
  });
}

/**
 * Where socket.io is mounted: a uWS app (chatwire's own, attached with attachApp), or a function that mounts it
 * elsewhere: on a host's uWS app under a prefix (through `admitting`, behind the same admission, with `uwsOptions`),
 * or on a node:http server (node-http.ts).
 */
export type SocketIOMount = (
  io: SocketIOServer,
  admitting: (app: TemplatedApp) => TemplatedApp,
  uwsOptions: Record<string, unknown>,
  /** The same admission for a node:http request (the IncomingMessage as `key`), answered on `res` when refused. */
  admitRequest: (res: HttpResponse, key: object, forwardedFor: string | undefined) => boolean,
) => void;

/** Handles one message packet of a connected socket before socket.io decodes it (see onPacket in serveSocket). */
type PacketHandler = (packet: EnginePacket) => void;

/** What the steps of attachSocketIO share: the places held by handshakes, and each connected socket's packet handler. */
interface Shared {
  deps: TransportDeps;
  pendingSlots: WeakMap<object, PendingSlot>;
  packetHandlers: WeakMap<EngineConnection, PacketHandler>;
  framesIn: { inc(): void };
  framesOut: { inc(): void };
}

/** The socket.io server with chatwire's limits, CORS policy and handshake checks. */
function createServer(deps: TransportDeps): SocketIOServer {
  const { config } = deps;
  const allowedOrigins = config.allowedOrigins === '*' ? null : new Set(config.allowedOrigins);
  return new SocketIOServer({
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
}

function byteLength(data: unknown): number {
  return typeof data === 'string' ? Buffer.byteLength(data) : ((data as { byteLength?: number } | undefined)?.byteLength ?? 0);
}

function oversized(data: unknown, maxFrameBytes: number): boolean {
  // A string of n UTF-16 units is at most 3n bytes: most messages need no byte count at all.
  if (typeof data === 'string' && data.length * 3 <= maxFrameBytes) return false;
  return byteLength(data) > maxFrameBytes;
}

/** Answers a packet over the frame limit as /ws answers a frame: payload_too_large, then close 1009. */
function refuseOversized(shared: Shared, conn: EngineConnection, bytes: number): void {
  if (conn.readyState !== 'open') return;
  conn.write(`2["error",${toJson(frameTooLarge(bytes, shared.deps.config.maxFrameBytes))}]`);
  shared.framesOut.inc();
  const ws = conn.transport.name === 'websocket' ? conn.transport.socket : undefined;
  if (ws?.end) {
    // Written synchronously above (the transport was writable) or not at all: the close follows the error.
    try {
      ws.end(FRAME_TOO_LARGE_CLOSE.code, FRAME_TOO_LARGE_CLOSE.reason);
      return;
    } catch {
      // Closed under us: engine.io closes the connection below.
    }
  } else if (typeof ws?.bufferedAmount === 'number' && ws.close) {
    // The `ws` package's socket (node:http): its close frame goes out after the error, on the same socket.
    ws.close(FRAME_TOO_LARGE_CLOSE.code, FRAME_TOO_LARGE_CLOSE.reason);
    return;
  }
  conn.close();
}

/**
 * Every message packet is seen here before socket.io decodes it: over the frame limit it is refused as /ws
 * refuses one; on a connected socket it is charged to the user's bucket and, if an event, handled there (see
 * onPacket in serveSocket); before the CONNECT is accepted, one with more structure than a handshake has is refused.
 */
function screenPackets(io: SocketIOServer, shared: Shared): void {
  io.engine.on('connection', (conn: EngineConnection) => {
    const slot = shared.pendingSlots.get(conn.request);
    if (slot) conn.once('close', () => slot.release());
    let connecting = false;
    conn.on('packet', (packet: EnginePacket) => {
      if (packet.type !== 'message') return;
      if (oversized(packet.data, shared.deps.config.maxFrameBytes)) {
        // engine.io does nothing with a noop packet: socket.io never sees this message.
        packet.type = 'noop';
        shared.framesIn.inc();
        refuseOversized(shared, conn, byteLength(packet.data));
        return;
      }
      const handle = shared.packetHandlers.get(conn);
      if (handle) return handle(packet);
      // Before the socket is authenticated one CONNECT is all a client sends: socket.io would authenticate every
      // further one (a single polling POST can carry thousands), so any further packet closes the connection.
      const first = !connecting && typeof packet.data === 'string' && packet.data.charCodeAt(0) === 0x30;
      connecting = true;
      if (!first || !scanFrame(packet.data as string, HANDSHAKE_BOUNDS).ok) {
        packet.type = 'noop';
        conn.close();
      }
    });
  });
}

/** The refusal socket.io sends as connect_error: the error's code and message, and when to come back. */
function connectRefusal(err: unknown): { refusal: Error & { data: unknown }; retryAfterMs: number | undefined } {
  const e = toAppError(err);
  const refusal = new Error(e.message) as Error & { data: unknown };
  if (e.retryAfterMs === undefined) {
    refusal.data = { code: e.code, message: e.message };
    return { refusal, retryAfterMs: undefined };
  }
  refusal.data = { code: e.code, message: e.message, retryAfterMs: Math.ceil(e.retryAfterMs) };
  return { refusal, retryAfterMs: e.retryAfterMs };
}

/** socket.io's CONNECT: the credentials of its auth object (or the handshake's query) identify the user. */
function authenticateSockets(io: SocketIOServer, shared: Shared): void {
  const { deps, pendingSlots } = shared;
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
        address: callerAddress(deps, socket.handshake.address, headerText(socket.handshake.headers['x-forwarded-for'])),
        request: { transport: 'socket.io', headers: socket.handshake.headers, query: socketIoQuery(query, auth) },
      })
      .then(async (identity) => {
        // The client may have gone while the token was checked: socket.io then drops the socket without a
        // 'disconnect', so a slot counted now would never be freed.
        if (socket.conn.readyState !== 'open') throw new AppError('bad_request', 'the client went away');
        // Authenticated: no longer one of the connections waiting to.
        pendingSlots.get(socket.conn.request)?.release();
        const release = await takeUserSlot(deps, identity.userId);
        // Or while the slot was taken.
        if (socket.conn.readyState !== 'open') {
          release();
          throw new AppError('bad_request', 'the client went away');
        }
        // Also covers a close between next() and 'connection' (socket.io checks readyState a tick later).
        socket.conn.once('close', release);
        (socket.data as SocketState) = { connectionId, identity, release };
        next();
      })
      .catch((err: unknown) => {
        const { refusal, retryAfterMs } = connectRefusal(err);
        // socket.io sends the connect_error but keeps the engine.io connection open (until its connectTimeout,
        // 45 s): a refused client must not hold a half-open socket, so it is closed once the refusal is out
        // (socket.io writes it a tick after next(); close() still flushes anything queued).
        const refuse = () => {
          next(refusal);
          setImmediate(() => socket.conn.close());
        };
        if (retryAfterMs === undefined) refuse();
        else void holdRefusal(retryAfterMs).then(refuse);
      });
  });
}

/** A connected socket's writes: within its send-buffer budget, and closed past it, as on /ws. */
interface SocketWriter {
  readonly closed: boolean;
  /** Writes one packet; past the socket's budget the socket is closed instead. */
  write(packet: string): boolean;
  emit(m: ServerMessage): boolean;
  /** Bytes written and not yet sent. */
  held(): number;
  /** Marks the socket closed without closing it (a flood, a disconnect). */
  markClosed(): void;
  /** Gives back the socket's share of the server-wide send-buffer budget. */
  release(): void;
  updateBudget(bytes: number): void;
}

function createSocketWriter(shared: Shared, socket: Socket): SocketWriter {
  const { deps, framesOut } = shared;
  const { config, metrics } = deps;
  let closed = false;
  // Bytes of the packets written here that engine.io still holds in its writeBuffer (until a poll takes them;
  // at once on the websocket transport): it empties the buffer before it emits 'drain'.
  let queued = 0;
  socket.conn.on('drain', () => {
    queued = 0;
  });
  const held = () => {
    const ws = uwsSocketOf(socket);
    // uWS under chatwire's own app; the ws package's socket under a node:http server.
    return (ws?.getBufferedAmount?.() ?? ws?.bufferedAmount ?? 0) + queued;
  };
  const closeSlow = () => {
    if (closed) return;
    closed = true;
    metrics.slowClientsClosed.inc();
    buffered.release();
    socket.disconnect(true);
    // Discarded, not flushed: engine.io would otherwise keep what a poller never fetches until its ping timeout.
    socket.conn.close(true);
  };
  const buffered = deps.buffers.open(() => (closed ? 0 : held()), closeSlow);
  const write = (packet: string): boolean => {
    if (closed || socket.conn.readyState !== 'open') return false;
    const before = held();
    const bytes = Buffer.byteLength(packet);
    if (before > 0 && before + bytes > config.maxBackpressureBytes) {
      closeSlow();
      return false;
    }
    queued += bytes;
    socket.conn.write(packet);
    framesOut.inc();
    const after = held();
    if (after > config.maxBackpressureBytes) {
      closeSlow();
      return false;
    }
    buffered.update(after);
    return true;
  };
  return {
    get closed() {
      return closed;
    },
    write,
    emit: (m) => write(eventPacketText(m.type, m)),
    held,
    markClosed: () => {
      closed = true;
    },
    release: () => buffered.release(),
    updateBudget: (bytes) => buffered.update(bytes),
  };
}

/**
 * The sink the session streams through. engine.io's uWS transport has no drain event: while the socket is backed
 * up past the soft limit it is polled until it drains, then the session's subscriptions are pumped.
 */
function createSocketSink(shared: Shared, socket: Socket, writer: SocketWriter, pump: () => void): { sink: Sink; stop(): void } {
  const softLimit = softBackpressureLimit(shared.deps.config);
  let drainTimer: NodeJS.Timeout | undefined;
  const watchDrain = () => {
    if (drainTimer || writer.closed) return;
    drainTimer = setInterval(() => {
      const now = writer.closed ? 0 : writer.held();
      writer.updateBudget(now);
      if (writer.closed || now <= softLimit) {
        clearInterval(drainTimer);
        drainTimer = undefined;
        if (!writer.closed) pump();
      }
    }, DRAIN_POLL_MS);
  };
  const sink: Sink = {
    deliver: writer.emit,
    congested: () => {
      if (writer.closed) return true;
      if (writer.held() <= softLimit) return false;
      watchDrain();
      return true;
    },
    cork: (fn) => {
      if (writer.closed) fn();
      else corked(socket, fn);
    },
  };
  return {
    sink,
    stop: () => {
      if (drainTimer) clearInterval(drainTimer);
    },
  };
}

/** An EVENT's decoded JSON array handed to the session as the message it names: [type, payload]. */
function handleEvent(session: Session, json: string, reply: Reply): void {
  let args: unknown;
  try {
    args = JSON.parse(json);
  } catch {
    session.reject('frame is not valid JSON', reply);
    return;
  }
  if (!Array.isArray(args) || typeof args[0] !== 'string') {
    session.reject('an event is a JSON array of its name and one payload object', reply);
    return;
  }
  const payload: unknown = args[1] ?? {};
  if (args.length > 2) {
    session.reject('send one payload object per event', reply, echoableId(payload));
    return;
  }
  if (typeof payload !== 'object' || payload === null || Array.isArray(payload)) {
    session.reject('the payload must be a JSON object', reply);
    return;
  }
  session.handle({ ...(payload as Record<string, unknown>), type: args[0] }, reply);
}

/**
 * One message packet of a connection, before socket.io decodes it. An EVENT (every message of the protocol) is
 * charged, scanned, decoded and handled here, and socket.io never sees it; its reply is written as the ACK packet
 * socket.io would write. Anything else but a DISCONNECT (an attachment, an ACK, a packet for another namespace) is
 * charged and, if the rate allows, left to socket.io.
 */
/** A socket.io CONNECT packet for the main namespace: `0`, `0{...}` or `0/,...`. */
function connectsToMain(text: string): boolean {
  return text.charCodeAt(0) === 0x30 && (text.charCodeAt(1) !== 0x2f || text.startsWith('0/,') || text === '0/');
}

function createPacketHandler(shared: Shared, socket: Socket, writer: SocketWriter, session: Session): PacketHandler {
  /** The user's charge for one packet; past its rate the packet is dropped, and a flood closes the socket. */
  const admit = (packet: EnginePacket, reply: Reply, id?: string): boolean => {
    shared.framesIn.inc();
    const admission: Admission = session.admit(reply, id);
    if (admission === 'admitted') return true;
    packet.type = 'noop';
    if (admission === 'flooding') {
      writer.markClosed();
      socket.disconnect(true);
    }
    return false;
  };
  return (packet) => {
    if (writer.closed) {
      packet.type = 'noop';
      return;
    }
    const text = typeof packet.data === 'string' ? packet.data : '';
    const event = eventPacket(text);
    if (event === null) {
      if (text.charCodeAt(0) === 0x31) return;
      admit(packet, () => {});
      // Another CONNECT to `/` once connected: socket.io would run the authentication again for it.
      if (connectsToMain(text)) packet.type = 'noop';
      return;
    }
    packet.type = 'noop';
    const { ackId, json } = event;
    const reply: Reply = (m) => {
      if (ackId === undefined) writer.write(eventPacketText(m.type, m));
      else writer.write(`3${ackId}[${toJson(m)}]`);
    };
    const shape = scanFrame(json, EVENT_BOUNDS, 2);
    corked(socket, () => {
      if (!admit(packet, reply, shape.id)) return;
      if (!shape.ok) return session.reject(shape.reason, reply, shape.id);
      handleEvent(session, json, reply);
    });
  };
}

/** A connected, authenticated socket: its session, its packets, `hello` first. */
function serveSocket(shared: Shared, socket: Socket): void {
  const { deps, framesOut } = shared;
  const state = socket.data as SocketState;
  deps.metrics.connections.inc({ transport: 'socket.io' });
  const writer = createSocketWriter(shared, socket);
  const { sink, stop } = createSocketSink(shared, socket, writer, () => session.pump());
  const session = new Session(deps.session, state.identity, sink);
  shared.packetHandlers.set(socket.conn as unknown as EngineConnection, createPacketHandler(shared, socket, writer, session));

  // Only events with binary attachments get here (the packet handler takes every other event): none is a message
  // of the protocol. Their packets were charged there.
  socket.onAny((...args: unknown[]) => {
    if (writer.closed) return;
    const ack = typeof args.at(-1) === 'function' ? (args.pop() as (m: ServerMessage) => void) : undefined;
    session.reject(
      'events carry JSON, not binary data',
      (m) => {
        if (writer.closed) return;
        if (!ack) return void writer.write(eventPacketText(m.type, m));
        framesOut.inc();
        ack(m as ServerMessage);
      },
      echoableId(args[1]),
    );
  });

  socket.on('disconnect', () => {
    writer.markClosed();
    writer.release();
    stop();
    deps.metrics.connections.dec({ transport: 'socket.io' });
    state.release();
    session.close();
  });

  writer.emit(helloFrame(deps, state.connectionId, state.identity));
}

/**
 * socket.io on the same uWS app: event name = message type, the payload is
 * the message without `type`, the direct reply goes to the ack callback (or is
 * emitted as an event when the client gave none), server-initiated messages are
 * events named by their type.
 */
export function attachSocketIO(target: TemplatedApp | SocketIOMount, deps: TransportDeps): SocketIOServer {
  const { config, metrics, log } = deps;
  const shared: Shared = {
    deps,
    pendingSlots: new WeakMap(),
    packetHandlers: new WeakMap(),
    framesOut: metrics.framesOut.tally('socket.io'),
    framesIn: metrics.framesIn.tally('socket.io'),
  };
  const io = createServer(deps);
  const admitting = (uwsApp: TemplatedApp) => admittingApp(uwsApp, deps, shared.pendingSlots);
  // uWS's default send buffer limit (64 KiB) silently drops what a socket is sent past it: raised so that nothing
  // is dropped, and the socket closed past its budget instead (see createSocketWriter). No compression: see
  // docs/backpressure.md (its per-socket deflate state would cost more than a stalled reader's whole budget).
  const uwsOptions = { maxBackpressure: config.maxBackpressureBytes * 2, compression: uWS.DISABLED };
  const admitRequest = (res: HttpResponse, key: object, forwardedFor: string | undefined) => admitHandshake(deps, shared.pendingSlots, res, key, forwardedFor);
  if (typeof target === 'function') target(io, admitting, uwsOptions, admitRequest);
  else io.attachApp(admitting(target), uwsOptions as Parameters<SocketIOServer['attachApp']>[1]);
  io.engine.on('connection_error', (err: { req?: object }) => {
    if (err.req) shared.pendingSlots.get(err.req)?.release();
  });
  screenPackets(io, shared);
  authenticateSockets(io, shared);
  io.on('connection', (socket) => serveSocket(shared, socket));
  io.engine.on('connection_error', (err: { code: number; message: string }) => {
    log.debug({ code: err.code, message: err.message }, 'socket.io connection refused');
  });
  return io;
}
