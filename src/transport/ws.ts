import uWS, { type HttpRequest, type HttpResponse, type TemplatedApp, type WebSocket, type us_socket_context_t } from 'uWebSockets.js';
import { parseSubprotocols } from '../auth/credentials.js';
import type { Identity } from '../auth/identity.js';
import type { Sink } from '../chat/task.js';
import { CLIENT_MESSAGE_BOUNDS, scanFrame, toAppError, toJson, type OutgoingMessage } from '../protocol/index.js';
import { captureRequest, errorBody, STATUS_TEXT, type RequestInfo } from './http-io.js';
import { FLOOD_CLOSE_CODE, holdRefusal, Session, type Admission, type Reply } from './session.js';
import type { BufferedSocket } from './buffer-budget.js';
import {
  callerAddress,
  FRAME_TOO_LARGE_CLOSE,
  frameReadCeiling,
  frameTooLarge,
  helloFrame,
  identifyPending,
  newConnectionId,
  softBackpressureLimit,
  takeUserSlot,
} from './connection.js';
import type { PendingSlot } from './admission.js';
import type { TransportDeps } from './deps.js';

// Where they were first written; connection.ts holds them for every transport now.
export { frameReadCeiling, frameTooLarge, newConnectionId };

interface SocketData {
  connectionId: string;
  identity: Identity;
  session: Session | null;
  closed: boolean;
  /** Frees the user's connection slot; idempotent. */
  releaseSlot: () => void;
  /** Its share of the server-wide send-buffer budget, from open to close. */
  buffered: BufferedSocket | null;
}

type Socket = WebSocket<SocketData>;

/** Answers an HTTP request (an upgrade, a socket.io handshake) with an error, before anything is built for it. */
export function refuseRequest(res: HttpResponse, err: unknown, closeConnection = false): void {
  const { status, body, retryAfterMs } = errorBody(err);
  res.cork(() => {
    res.writeStatus(STATUS_TEXT[status] ?? `${status} Error`);
    res.writeHeader('content-type', 'application/json');
    if (status === 401) res.writeHeader('www-authenticate', 'Bearer');
    if (retryAfterMs !== undefined) res.writeHeader('retry-after', String(Math.max(1, Math.ceil(retryAfterMs / 1000))));
    res.end(body, closeConnection);
  });
}

/** Writes to a /ws socket within its send-buffer budget; a reader past it is closed (1013) instead. */
function createWsWriter(deps: TransportDeps) {
  const { config, metrics } = deps;
  // Bound once: a labelled inc() per frame would hash the labels every time.
  const framesOut = metrics.framesOut.tally('ws');

  function closeSlow(ws: Socket, reason: string): void {
    const data = ws.getUserData();
    if (data.closed) return;
    metrics.slowClientsClosed.inc();
    data.closed = true;
    data.buffered?.release();
    ws.end(1013, reason);
  }

  function send(ws: Socket, message: OutgoingMessage): boolean {
    const data = ws.getUserData();
    if (data.closed) return false;
    const json = toJson(message);
    const held = ws.getBufferedAmount();
    // A reader already backed up that this frame would take past its budget is closed instead of sent it: what
    // it holds stays within the budget however large the frames (a reader not backed up is sent any one frame).
    if (held > 0 && held + Buffer.byteLength(json) > config.maxBackpressureBytes) {
      closeSlow(ws, 'slow reader: send buffer over the limit');
      return false;
    }
    const status = ws.send(json, false);
    framesOut.inc();
    // 1: written through; 0: buffered (check how much); 2: dropped over uWS's own limit.
    const buffered = ws.getBufferedAmount();
    if (status === 2 || buffered > config.maxBackpressureBytes) {
      // The reader is not keeping up even with replies: close rather than buffer without bound.
      closeSlow(ws, 'slow reader: send buffer over the limit');
      return false;
    }
    data.buffered?.update(buffered);
    return true;
  }

  return { send, closeSlow };
}

/**
 * The upgrade: a place among the connections waiting to authenticate is taken at once (or the request refused),
 * the caller identified while it holds it, and the socket opened with its user's connection slot.
 */
function createUpgrade(deps: TransportDeps) {
  return (res: HttpResponse, req: HttpRequest, context: us_socket_context_t): void => {
    const info = captureRequest(req, res);
    const upgrade = { aborted: false };
    res.onAborted(() => {
      upgrade.aborted = true;
    });
    const address = callerAddress(deps, info.remoteAddress, info.headers.get('x-forwarded-for'));
    const pending = deps.admission.admit(address);
    if (!pending.ok) {
      refuseRequest(res, pending.error, pending.closeConnection);
      return;
    }
    void authenticateUpgrade(deps, info, address, pending.slot)
      .then((data) => {
        if (upgrade.aborted) return data.releaseSlot();
        const protocols = parseSubprotocols(info.headers.get('sec-websocket-protocol'));
        const key = info.headers.get('sec-websocket-key') ?? '';
        const extensions = info.headers.get('sec-websocket-extensions') ?? '';
        res.cork(() => res.upgrade(data, key, protocols.protocol ?? '', extensions, context));
      })
      .catch((err: unknown) => refuseUpgrade(deps, res, upgrade, err));
  };
}

/** Checks the upgrade's origin and credentials and takes the user's connection slot: the socket's data, or throws. */
async function authenticateUpgrade(deps: TransportDeps, info: RequestInfo, address: string, slot: PendingSlot): Promise<SocketData> {
  const connectionId = newConnectionId();
  const protocols = parseSubprotocols(info.headers.get('sec-websocket-protocol'));
  try {
    deps.checkOrigin(info.headers.get('origin'));
  } catch (err) {
    slot.release();
    throw err;
  }
  const identity = await identifyPending(deps, slot, {
    token: info.query.get('token') ?? protocols.token,
    user: info.query.get('user') ?? undefined,
    connectionId,
    address,
    request: { transport: 'ws', headers: info.headers, query: info.query },
  });
  const releaseSlot = await takeUserSlot(deps, identity.userId);
  return { connectionId, identity, session: null, closed: false, releaseSlot, buffered: null };
}

/** A refused upgrade; one that says when to come back is answered then (see holdRefusal). */
async function refuseUpgrade(deps: TransportDeps, res: HttpResponse, upgrade: { aborted: boolean }, err: unknown): Promise<void> {
  if (upgrade.aborted) return;
  const e = toAppError(err);
  if (e.code === 'internal') deps.log.error({ err }, 'websocket upgrade failed');
  if (e.retryAfterMs !== undefined) {
    await holdRefusal(e.retryAfterMs);
    if (upgrade.aborted) return;
  }
  refuseRequest(res, e);
}

/**
 * One frame from a client: refused past the size limit (then closed), charged before anything is decoded (the
 * scan bounds what JSON.parse may be handed, see scanFrame), then handed to the session; a flood closes the socket.
 */
function receiveFrame(
  deps: TransportDeps,
  ws: Socket,
  session: Session,
  frame: { message: ArrayBuffer; isBinary: boolean },
  send: (ws: Socket, m: OutgoingMessage) => boolean,
): void {
  const { config } = deps;
  const { message, isBinary } = frame;
  const data = ws.getUserData();
  const reply: Reply = (m) => {
    send(ws, m);
  };
  if (message.byteLength > config.maxFrameBytes) {
    send(ws, frameTooLarge(message.byteLength, config.maxFrameBytes));
    data.closed = true;
    ws.end(FRAME_TOO_LARGE_CLOSE.code, FRAME_TOO_LARGE_CLOSE.reason);
    return;
  }
  const text = isBinary ? '' : Buffer.from(message).toString('utf8');
  const shape = isBinary ? undefined : scanFrame(text, CLIENT_MESSAGE_BOUNDS);
  let admission = 'admitted' as Admission;
  ws.cork(() => {
    admission = session.admit(reply, shape?.id);
    if (admission !== 'admitted') return;
    if (shape === undefined) return session.reject('frames must be JSON text, not binary', reply);
    if (!shape.ok) return session.reject(shape.reason, reply, shape.id);
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch {
      return session.reject('frame is not valid JSON', reply);
    }
    session.handle(value, reply);
  });
  if (admission === 'flooding') {
    data.closed = true;
    ws.end(FLOOD_CLOSE_CODE, 'rate limit ignored: wait retryAfterMs after rate_limited');
  }
}

/** Closes every open /ws socket with `code` (a shutdown, an unmount). */
export function endSockets(sockets: Set<WebSocket<unknown>>, code: number, reason: string): void {
  for (const ws of [...sockets]) {
    try {
      ws.end(code, reason);
    } catch {
      // Already closed: uWS throws on a closed socket, and its close handler removes it from the set.
    }
  }
}

/** The raw `/ws` endpoint: JSON text frames, `hello` first, the session does the rest. */
export function attachWebSocket(
  app: TemplatedApp,
  deps: TransportDeps,
  track: { open(ws: WebSocket<unknown>): void; close(ws: WebSocket<unknown>): void },
): void {
  const { config, metrics } = deps;
  const softLimit = softBackpressureLimit(config);
  const framesIn = metrics.framesIn.tally('ws');
  const { send, closeSlow } = createWsWriter(deps);

  const open = (ws: Socket): void => {
    const data = ws.getUserData();
    track.open(ws as WebSocket<unknown>);
    metrics.connections.inc({ transport: 'ws' });
    data.buffered = deps.buffers.open(
      () => (data.closed ? 0 : ws.getBufferedAmount()),
      () => closeSlow(ws, 'slow reader: server send buffers full'),
    );
    const sink: Sink = {
      deliver: (m) => send(ws, m),
      congested: () => data.closed || ws.getBufferedAmount() > softLimit,
      cork: (fn) => {
        if (data.closed) fn();
        else ws.cork(fn);
      },
    };
    data.session = new Session(deps.session, data.identity, sink);
    send(ws, helloFrame(deps, data.connectionId, data.identity));
  };

  const close = (ws: Socket): void => {
    const data = ws.getUserData();
    data.closed = true;
    data.buffered?.release();
    track.close(ws as WebSocket<unknown>);
    metrics.connections.dec({ transport: 'ws' });
    data.releaseSlot();
    data.session?.close();
  };

  app.ws<SocketData>('/ws', {
    maxPayloadLength: frameReadCeiling(config.maxFrameBytes),
    maxBackpressure: config.maxBackpressureBytes * 2,
    closeOnBackpressureLimit: 0,
    idleTimeout: config.idleTimeoutSec,
    sendPingsAutomatically: true,
    compression: uWS.DISABLED,
    upgrade: createUpgrade(deps),
    open,
    message: (ws, message, isBinary) => {
      const data = ws.getUserData();
      if (data.closed || !data.session) return;
      framesIn.inc();
      receiveFrame(deps, ws, data.session, { message, isBinary }, send);
    },
    drain: (ws) => {
      const data = ws.getUserData();
      if (data.closed) return;
      data.buffered?.update(ws.getBufferedAmount());
      data.session?.pump();
    },
    close,
  });
}
