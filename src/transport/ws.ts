import uWS, { type HttpRequest, type HttpResponse, type TemplatedApp, type WebSocket, type us_socket_context_t } from 'uWebSockets.js';
import { parseSubprotocols } from '../auth/credentials.js';
import type { Identity } from '../auth/identity.js';
import type { Sink } from '../chat/task.js';
import { AppError, CLIENT_MESSAGE_BOUNDS, PROTOCOL_VERSION, scanFrame, toAppError, toJson, type ErrorMessage, type OutgoingMessage } from '../protocol/index.js';
import { randomBase64url } from '../random-id.js';
import { captureRequest, errorBody, STATUS_TEXT } from './http-io.js';
import { FLOOD_CLOSE_CODE, holdRefusal, Session, errorMessage, type Admission } from './session.js';
import type { BufferedSocket } from './buffer-budget.js';
import { clientAddress } from './client-address.js';
import type { TransportDeps } from './deps.js';

interface SocketData {
  connectionId: string;
  identity: Identity;
  session: Session | null;
  closed: boolean;
  /** Its share of the server-wide send-buffer budget, from open to close. */
  buffered: BufferedSocket | null;
}

/**
 * The largest frame uWS reads whole for us (its maxPayloadLength): four times our limit, so that a frame over the
 * limit but under this gets payload_too_large and close 1009 instead of uWS's abrupt drop (1006) of anything past
 * its own limit. Not more: uWS holds a frame's bytes as they arrive, and an engine.io connection exists before any
 * credentials are checked, so this is memory anyone can make a connection hold.
 */
export function frameReadCeiling(maxFrameBytes: number): number {
  return 4 * maxFrameBytes;
}

/** The error reply to a frame over the limit (the socket is closed with 1009 after it): /ws and socket.io alike. */
export function frameTooLarge(bytes: number, maxFrameBytes: number): ErrorMessage {
  return errorMessage(new AppError('payload_too_large', `frame of ${bytes} bytes is over the ${maxFrameBytes}-byte limit`), undefined);
}

export function newConnectionId(): string {
  return randomBase64url(9);
}

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

/** The raw `/ws` endpoint: JSON text frames, `hello` first, the session does the rest. */
export function attachWebSocket(
  app: TemplatedApp,
  deps: TransportDeps,
  track: { open(ws: WebSocket<unknown>): void; close(ws: WebSocket<unknown>): void },
): void {
  const budget = deps.buffers;
  const { config, metrics, log } = deps;
  const softLimit = Math.min(64 * 1024, Math.floor(config.maxBackpressureBytes / 4));
  // Bound once: a labelled inc() per frame would hash the labels every time.
  const framesOut = metrics.framesOut.tally('ws');
  const framesIn = metrics.framesIn.tally('ws');

  function closeSlow(ws: WebSocket<SocketData>, reason: string): void {
    const data = ws.getUserData();
    if (data.closed) return;
    metrics.slowClientsClosed.inc();
    data.closed = true;
    data.buffered?.release();
    ws.end(1013, reason);
  }

  function send(ws: WebSocket<SocketData>, message: OutgoingMessage): boolean {
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

  app.ws<SocketData>('/ws', {
    maxPayloadLength: frameReadCeiling(config.maxFrameBytes),
    maxBackpressure: config.maxBackpressureBytes * 2,
    closeOnBackpressureLimit: 0,
    idleTimeout: config.idleTimeoutSec,
    sendPingsAutomatically: true,
    compression: uWS.DISABLED,

    upgrade: (res: HttpResponse, req: HttpRequest, context: us_socket_context_t) => {
      const info = captureRequest(req, res);
      const key = info.headers.get('sec-websocket-key') ?? '';
      const protocols = parseSubprotocols(info.headers.get('sec-websocket-protocol'));
      const extensions = info.headers.get('sec-websocket-extensions') ?? '';
      const origin = info.headers.get('origin');
      let aborted = false;
      res.onAborted(() => {
        aborted = true;
      });
      const connectionId = newConnectionId();
      const address = clientAddress(info.remoteAddress, info.headers.get('x-forwarded-for'), config.trustProxy);
      // A place among the connections waiting to authenticate, held while the token is checked.
      const pending = deps.admission.admit(address);
      if (!pending.ok) {
        refuseRequest(res, pending.error, pending.closeConnection);
        return;
      }
      void (async () => {
        try {
          let identity: Identity;
          try {
            deps.checkOrigin(origin);
            identity = await deps.auth.identify({
              token: info.query.get('token') ?? protocols.token,
              user: info.query.get('user') ?? undefined,
              connectionId,
              address,
              request: { transport: 'ws', headers: info.headers, query: info.query },
            });
          } finally {
            pending.slot.release();
          }
          const admitted = deps.connections.opened(identity.userId);
          if (!admitted.ok) throw admitted.error;
          if (aborted) {
            deps.connections.closed(identity.userId);
            return;
          }
          const data: SocketData = { connectionId, identity, session: null, closed: false, buffered: null };
          res.cork(() => res.upgrade(data, key, protocols.protocol ?? '', extensions, context));
        } catch (err) {
          if (aborted) return;
          const e = toAppError(err);
          if (e.code === 'internal') log.error({ err }, 'websocket upgrade failed');
          if (e.retryAfterMs !== undefined) {
            await holdRefusal(e.retryAfterMs);
            if (aborted) return;
          }
          refuseRequest(res, e);
        }
      })();
    },

    open: (ws) => {
      const data = ws.getUserData();
      track.open(ws as WebSocket<unknown>);
      metrics.connections.inc({ transport: 'ws' });
      data.buffered = budget.open(
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
      send(ws, {
        type: 'hello',
        connectionId: data.connectionId,
        userId: data.identity.userId,
        protocol: PROTOCOL_VERSION,
        provider: deps.providerName,
        model: config.model,
        limits: { maxFrameBytes: config.maxFrameBytes, messagesPerSecond: config.messagesPerSecond, chatsPerMinute: config.chatsPerMinute },
      });
    },

    message: (ws, message, isBinary) => {
      const data = ws.getUserData();
      if (data.closed || !data.session) return;
      framesIn.inc();
      const reply = (m: OutgoingMessage) => {
        send(ws, m);
      };
      if (message.byteLength > config.maxFrameBytes) {
        send(ws, frameTooLarge(message.byteLength, config.maxFrameBytes));
        data.closed = true;
        ws.end(1009, 'frame too large');
        return;
      }
      const session = data.session;
      // Charged before anything is decoded; the scan bounds what JSON.parse may be handed (see scanFrame).
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
    },

    drain: (ws) => {
      const data = ws.getUserData();
      if (data.closed) return;
      data.buffered?.update(ws.getBufferedAmount());
      data.session?.pump();
    },

    close: (ws) => {
      const data = ws.getUserData();
      data.closed = true;
      data.buffered?.release();
      track.close(ws as WebSocket<unknown>);
      metrics.connections.dec({ transport: 'ws' });
      deps.connections.closed(data.identity.userId);
      data.session?.close();
    },
  });
}
