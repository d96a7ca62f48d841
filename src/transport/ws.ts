import crypto from 'node:crypto';
import uWS, { type HttpRequest, type HttpResponse, type TemplatedApp, type WebSocket, type us_socket_context_t } from 'uWebSockets.js';
import { parseSubprotocols } from '../auth/credentials.js';
import type { Identity } from '../auth/identity.js';
import type { Sink } from '../chat/task.js';
import { AppError, PROTOCOL_VERSION, toAppError, type ServerMessage } from '../protocol/index.js';
import { captureRequest, errorBody, STATUS_TEXT } from './http-io.js';
import { Session, errorMessage } from './session.js';
import type { TransportDeps } from './deps.js';

interface SocketData {
  connectionId: string;
  identity: Identity;
  session: Session | null;
  closed: boolean;
}

// A frame above our limit but below this still arrives whole, so we can answer 1009 instead of uWS's abrupt drop.
const PAYLOAD_HEADROOM = 4;

export function newConnectionId(): string {
  return crypto.randomBytes(9).toString('base64url');
}

function refuse(res: HttpResponse, err: unknown): void {
  const { status, body } = errorBody(err);
  res.cork(() => {
    res.writeStatus(STATUS_TEXT[status] ?? `${status} Error`);
    res.writeHeader('content-type', 'application/json');
    res.end(body);
  });
}

/** The raw `/ws` endpoint: JSON text frames, `hello` first, the session does the rest. */
export function attachWebSocket(app: TemplatedApp, deps: TransportDeps, track: { open(ws: WebSocket<unknown>): void; close(ws: WebSocket<unknown>): void }): void {
  const { config, metrics, log } = deps;
  const softLimit = Math.min(64 * 1024, Math.floor(config.maxBackpressureBytes / 4));

  function send(ws: WebSocket<SocketData>, message: ServerMessage): boolean {
    const data = ws.getUserData();
    if (data.closed) return false;
    const status = ws.send(JSON.stringify(message), false);
    metrics.framesOut.inc({ transport: 'ws' });
    if (status === 2 || ws.getBufferedAmount() > config.maxBackpressureBytes) {
      // The reader is not keeping up even with replies: close rather than buffer without bound.
      metrics.slowClientsClosed.inc();
      data.closed = true;
      ws.end(1013, 'slow reader: send buffer over the limit');
      return false;
    }
    return true;
  }

  app.ws<SocketData>('/ws', {
    maxPayloadLength: config.maxFrameBytes * PAYLOAD_HEADROOM,
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
      void (async () => {
        try {
          deps.checkOrigin(origin);
          const identity = await deps.auth.identify({
            token: info.query.get('token') ?? protocols.token,
            user: info.query.get('user') ?? undefined,
            connectionId,
          });
          const admitted = deps.connections.opened(identity.userId);
          if (!admitted.ok) throw admitted.error;
          if (aborted) {
            deps.connections.closed(identity.userId);
            return;
          }
          const data: SocketData = { connectionId, identity, session: null, closed: false };
          res.cork(() => res.upgrade(data, key, protocols.protocol ?? '', extensions, context));
        } catch (err) {
          if (aborted) return;
          const e = toAppError(err);
          if (e.code === 'internal') log.error({ err }, 'websocket upgrade failed');
          refuse(res, e);
        }
      })();
    },

    open: (ws) => {
      const data = ws.getUserData();
      track.open(ws as WebSocket<unknown>);
      metrics.connections.inc({ transport: 'ws' });
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
        provider: config.llm,
        model: config.model,
        limits: { maxFrameBytes: config.maxFrameBytes, messagesPerSecond: config.messagesPerSecond, chatsPerMinute: config.chatsPerMinute },
      });
    },

    message: (ws, message, isBinary) => {
      const data = ws.getUserData();
      if (data.closed || !data.session) return;
      metrics.framesIn.inc({ transport: 'ws' });
      const reply = (m: ServerMessage) => {
        send(ws, m);
      };
      if (message.byteLength > config.maxFrameBytes) {
        send(ws, errorMessage(new AppError('payload_too_large', `frame of ${message.byteLength} bytes is over the ${config.maxFrameBytes}-byte limit`), undefined));
        data.closed = true;
        ws.end(1009, 'frame too large');
        return;
      }
      if (isBinary) {
        reply(errorMessage(new AppError('bad_request', 'frames must be JSON text, not binary'), undefined));
        return;
      }
      // The ArrayBuffer is only valid during this callback: decode it now.
      let value: unknown;
      try {
        value = JSON.parse(Buffer.from(message).toString('utf8'));
      } catch {
        reply(errorMessage(new AppError('bad_request', 'frame is not valid JSON'), undefined));
        return;
      }
      ws.cork(() => data.session?.handle(value, reply));
    },

    drain: (ws) => {
      const data = ws.getUserData();
      if (!data.closed) data.session?.pump();
    },

    close: (ws) => {
      const data = ws.getUserData();
      data.closed = true;
      track.close(ws as WebSocket<unknown>);
      metrics.connections.dec({ transport: 'ws' });
      deps.connections.closed(data.identity.userId);
      data.session?.close();
    },
  });
}
