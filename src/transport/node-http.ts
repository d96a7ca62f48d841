/**
 * chatwire on a Node `http.Server` the host already has (Express, Fastify, plain node:http).
 *
 * Design: one set of routes and socket handlers, two servers under them. attachHttpRoutes (http-routes.ts) and
 * attachWebSocket (ws.ts) are written against the few uWebSockets.js calls they make (app.get/post/options/any/ws,
 * HttpResponse's writeStatus/writeHeader/write/end/cork/onData/onAborted/onWritable/upgrade, HttpRequest's getters,
 * WebSocket's send/end/cork/getBufferedAmount/getUserData). This file presents node:http requests, raw upgrade
 * sockets and `ws` WebSockets through exactly those calls (NodeApp, NodeResponse, UpgradeResponse, NodeRequest,
 * NodeSocket), so the same route and socket code serves both, with no second copy of it. socket.io is attached
 * with `io.attach(server, { path: prefix + '/socket.io' })`.
 *
 * The host's server stays the host's: chatwire takes the 'request' and 'upgrade' events only for its own paths
 * (mount-paths.ts) and hands every other one to the listeners the server had when attach ran, in their order;
 * close() puts those listeners back as they were and never closes the server. A listener the host adds after
 * attach sees every request, chatwire's included, as with any two listeners: attach after the server has its
 * request handler (`http.createServer(app)`).
 *
 * A uWS call the route or socket code starts to use must be added here too; the adapter classes are typed against
 * uWS's own signatures (Surface<...>) so that theirs and uWS's cannot drift apart.
 */
import type { IncomingMessage, Server as HttpServerNode, ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import type { Server as SocketIOServer } from 'socket.io';
import type { HttpRequest, HttpResponse, TemplatedApp, WebSocket as UwsWebSocket, WebSocketBehavior } from 'uWebSockets.js';
import { WebSocket, WebSocketServer } from 'ws';
import { AppError } from '../protocol/index.js';
import type { TransportDeps } from './deps.js';
import { attachHttpRoutes } from './http-routes.js';
import { innerPath, mountsRoute, ownsPath } from './mount-paths.js';
import type { HttpServer } from './server.js';
import { attachSocketIO, type SocketIOMount } from './socketio.js';
import { attachWebSocket, refuseRequest } from './ws.js';

/** The named calls of a uWS interface, with the same parameters; what they return for chaining is not used. */
type Surface<T, K extends keyof T> = { [P in K]: T[P] extends (...args: infer A) => infer R ? (...args: A) => R extends object ? unknown : R : T[P] };
type Handler = (res: HttpResponse, req: HttpRequest) => void | Promise<void>;
type Method = 'GET' | 'POST' | 'OPTIONS' | 'ANY';
type RecognizedString = Parameters<HttpResponse['write']>[0];

function toBuffer(value: RecognizedString | undefined): Buffer | string {
  if (value === undefined) return '';
  if (typeof value === 'string') return value;
  if (value instanceof ArrayBuffer) return Buffer.from(value);
  return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
}

function toText(value: RecognizedString): string {
  const b = toBuffer(value);
  return typeof b === 'string' ? b : b.toString('utf8');
}

function arrayBufferOf(data: Buffer): ArrayBuffer {
  return data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength) as ArrayBuffer;
}

function addressText(address: string | undefined): ArrayBuffer {
  return arrayBufferOf(Buffer.from(address ?? ''));
}

/** A request's path split from its query. */
function splitUrl(url: string | undefined): { path: string; query: string } {
  const u = url ?? '/';
  const q = u.indexOf('?');
  return q < 0 ? { path: u, query: '' } : { path: u.slice(0, q), query: u.slice(q + 1) };
}

/** uWS's HttpRequest over an IncomingMessage: the path below the prefix, the matched parameters. */
class NodeRequest implements Surface<HttpRequest, 'getHeader' | 'getParameter' | 'getUrl' | 'getMethod' | 'getCaseSensitiveMethod' | 'getQuery' | 'forEach'> {
  constructor(
    private readonly req: IncomingMessage,
    private readonly path: string,
    private readonly query: string,
    private readonly params: string[],
  ) {}
  getHeader(key: RecognizedString): string {
    const v = this.req.headers[toText(key).toLowerCase()];
    return Array.isArray(v) ? v.join(', ') : (v ?? '');
  }
  getParameter(index: number): string {
    return this.params[index] ?? '';
  }
  getUrl(): string {
    return this.path;
  }
  getMethod(): string {
    return (this.req.method ?? 'GET').toLowerCase();
  }
  getCaseSensitiveMethod(): string {
    return this.req.method ?? 'GET';
  }
  getQuery(): string;
  getQuery(key: string): string;
  getQuery(key?: string): string {
    return key === undefined ? this.query : (new URLSearchParams(this.query).get(key) ?? '');
  }
  forEach(cb: (key: string, value: string) => void): void {
    for (const [k, v] of Object.entries(this.req.headers)) if (v !== undefined) cb(k, Array.isArray(v) ? v.join(', ') : v);
  }
}

/** Completes an upgrade that the /ws handler accepted. */
type Accept = (res: UpgradeResponse, userData: unknown, protocol: string) => void;

type ResponseCalls = 'writeStatus' | 'writeHeader' | 'write' | 'end' | 'cork' | 'onAborted' | 'onData' | 'onWritable' | 'getRemoteAddressAsText';

/** uWS's HttpResponse over a ServerResponse: status and headers are held until the first write or end. */
export class NodeResponse implements Surface<HttpResponse, ResponseCalls> {
  private status = 200;
  private statusMessage: string | undefined;
  private readonly headers: [string, string][] = [];
  private finished = false;
  private readonly abortHandlers: (() => void)[] = [];

  constructor(
    private readonly req: IncomingMessage,
    private readonly res: ServerResponse,
  ) {
    res.once('close', () => {
      if (this.finished) return;
      this.finished = true;
      for (const h of this.abortHandlers) h();
    });
  }
  writeStatus(status: RecognizedString): this {
    const text = toText(status);
    const code = Number.parseInt(text, 10);
    this.status = Number.isFinite(code) ? code : 200;
    const message = text.slice(String(code).length).trim();
    this.statusMessage = message === '' ? undefined : message;
    return this;
  }
  writeHeader(key: RecognizedString, value: RecognizedString): this {
    this.headers.push([toText(key), toText(value)]);
    return this;
  }
  private flushHead(): void {
    if (this.res.headersSent) return;
    this.res.statusCode = this.status;
    if (this.statusMessage !== undefined) this.res.statusMessage = this.statusMessage;
    for (const [k, v] of this.headers) this.res.appendHeader(k, v);
  }
  write(chunk: RecognizedString): boolean {
    if (this.finished) return false;
    this.flushHead();
    return this.res.write(toBuffer(chunk));
  }
  /** `closeConnection`, as uWS's: the connection is closed after this answer, not kept alive (see Responder.send). */
  end(body?: RecognizedString, closeConnection?: boolean): this {
    if (this.finished) return this;
    this.finished = true;
    this.flushHead();
    if (closeConnection === true) {
      if (!this.res.headersSent) this.res.setHeader('connection', 'close');
      this.res.once('finish', () => this.req.socket.destroySoon());
    }
    this.res.end(toBuffer(body));
    return this;
  }
  cork(cb: () => void): this {
    this.res.cork();
    try {
      cb();
    } finally {
      this.res.uncork();
    }
    return this;
  }
  onAborted(handler: () => void): this {
    this.abortHandlers.push(handler);
    return this;
  }
  onData(handler: (chunk: ArrayBuffer, isLast: boolean) => void): this {
    this.req.on('data', (chunk: Buffer) => handler(arrayBufferOf(chunk), false));
    this.req.once('end', () => handler(new ArrayBuffer(0), true));
    return this;
  }
  onWritable(handler: (offset: number) => boolean): this {
    this.res.once('drain', () => handler(0));
    return this;
  }
  getRemoteAddressAsText(): ArrayBuffer {
    return addressText(this.req.socket.remoteAddress);
  }
}

/** uWS's HttpResponse for an upgrade request: a refusal written as raw HTTP on the socket, or the upgrade itself. */
class UpgradeResponse implements Surface<HttpResponse, ResponseCalls | 'upgrade'> {
  private status = '200 OK';
  private readonly headers: [string, string][] = [];
  private finished = false;
  private readonly abortHandlers: (() => void)[] = [];

  constructor(
    private readonly req: IncomingMessage,
    private readonly socket: Duplex,
    private readonly head: Buffer,
    private readonly accept: Accept,
  ) {
    socket.once('close', () => {
      if (this.finished) return;
      this.finished = true;
      for (const h of this.abortHandlers) h();
    });
    socket.on('error', () => {});
  }
  get raw(): { req: IncomingMessage; socket: Duplex; head: Buffer } {
    return { req: this.req, socket: this.socket, head: this.head };
  }
  writeStatus(status: RecognizedString): this {
    this.status = toText(status);
    return this;
  }
  writeHeader(key: RecognizedString, value: RecognizedString): this {
    this.headers.push([toText(key), toText(value)]);
    return this;
  }
  write(): boolean {
    return false;
  }
  end(body?: RecognizedString): this {
    if (this.finished) return this;
    this.finished = true;
    const payload = Buffer.from(toBuffer(body));
    const lines = [`HTTP/1.1 ${this.status}`, ...this.headers.map(([k, v]) => `${k}: ${v}`), `content-length: ${payload.length}`, 'connection: close'];
    this.socket.end(Buffer.concat([Buffer.from(lines.join('\r\n') + '\r\n\r\n'), payload]));
    return this;
  }
  cork(cb: () => void): this {
    cb();
    return this;
  }
  onAborted(handler: () => void): this {
    this.abortHandlers.push(handler);
    return this;
  }
  onData(): this {
    return this;
  }
  onWritable(): this {
    return this;
  }
  getRemoteAddressAsText(): ArrayBuffer {
    return addressText(this.req.socket.remoteAddress);
  }
  upgrade<UserData>(userData: UserData, _key: RecognizedString, protocol: RecognizedString): void {
    if (this.finished) return;
    this.finished = true;
    this.accept(this, userData, toText(protocol));
  }
}

type SocketCalls = 'send' | 'end' | 'cork' | 'getBufferedAmount';

/** uWS's WebSocket over a `ws` WebSocket and the raw socket under it (for cork and drain, which `ws` does not expose). */
class NodeSocket<UserData> implements Surface<UwsWebSocket<UserData>, SocketCalls> {
  lastHeard = Date.now();

  constructor(
    readonly ws: WebSocket,
    private readonly raw: Duplex,
    private readonly userData: UserData,
    private readonly maxBackpressure: number,
  ) {}
  /** uWS's answer: 1 written, 0 buffered, 2 dropped (the buffer was past maxBackpressure). */
  send(message: RecognizedString, isBinary?: boolean): number {
    if (this.ws.readyState !== WebSocket.OPEN) return 2;
    if (this.maxBackpressure > 0 && this.ws.bufferedAmount > this.maxBackpressure) return 2;
    this.ws.send(toBuffer(message), { binary: isBinary === true });
    return this.ws.bufferedAmount > 0 ? 0 : 1;
  }
  end(code?: number, shortMessage?: RecognizedString): void {
    this.ws.close(code, shortMessage === undefined ? undefined : toText(shortMessage));
  }
  cork(cb: () => void): this {
    this.raw.cork();
    try {
      cb();
    } finally {
      this.raw.uncork();
    }
    return this;
  }
  getBufferedAmount(): number {
    return this.ws.bufferedAmount;
  }
  getUserData(): UserData {
    return this.userData;
  }
}

interface Route {
  method: Method;
  segments: string[];
  /** 0 static, 1 with parameters, 2 wildcard: uWS's order of precedence. */
  rank: number;
  handler: Handler;
}

function compile(method: Method, pattern: string, handler: Handler): Route {
  const rank = pattern.endsWith('/*') ? 2 : pattern.includes('/:') ? 1 : 0;
  return { method, segments: pattern.split('/'), rank, handler };
}

/** The route's parameters when it matches `path`, else null. */
function match(route: Route, path: string): string[] | null {
  const got = path.split('/');
  const want = route.segments;
  if (route.rank === 2) return want.slice(0, -1).every((s, i) => s === got[i]) && got.length >= want.length - 1 ? [] : null;
  if (got.length !== want.length) return null;
  const params: string[] = [];
  for (let i = 0; i < want.length; i++) {
    const seg = want[i] as string;
    if (seg.startsWith(':')) {
      if (got[i] === '') return null;
      params.push(decodeSegment(got[i] as string));
    } else if (seg !== got[i]) return null;
  }
  return params;
}

function decodeSegment(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

/** The uWS app calls the routes and the /ws handler make, recorded into a router that node:http requests go through. */
class NodeApp {
  readonly routes: Route[] = [];
  wsBehavior: WebSocketBehavior<unknown> | undefined;

  private add(method: Method, pattern: RecognizedString, handler: Handler): this {
    const p = toText(pattern);
    if (mountsRoute(p)) this.routes.push(compile(method, p, handler));
    return this;
  }
  get(pattern: RecognizedString, handler: Handler): this {
    return this.add('GET', pattern, handler);
  }
  post(pattern: RecognizedString, handler: Handler): this {
    return this.add('POST', pattern, handler);
  }
  options(pattern: RecognizedString, handler: Handler): this {
    return this.add('OPTIONS', pattern, handler);
  }
  any(pattern: RecognizedString, handler: Handler): this {
    return this.add('ANY', pattern, handler);
  }
  ws<T>(pattern: RecognizedString, behavior: WebSocketBehavior<T>): this {
    if (toText(pattern) !== '/ws') throw new Error(`node-http: only /ws is served, not ${toText(pattern)}`);
    this.wsBehavior = behavior as WebSocketBehavior<unknown>;
    return this;
  }

  /** The best route for a request, uWS's way: static before parametric before wildcard, a method's own before `any`. */
  route(method: string, path: string): { handler: Handler; params: string[] } | null {
    let best: { route: Route; params: string[] } | null = null;
    for (const route of this.routes) {
      if (route.method !== 'ANY' && route.method !== method) continue;
      const params = match(route, path);
      if (params === null) continue;
      const better = best === null || route.rank < best.route.rank || (route.rank === best.route.rank && best.route.method === 'ANY' && route.method !== 'ANY');
      if (better) best = { route, params };
    }
    return best === null ? null : { handler: best.route.handler, params: best.params };
  }
}

type Listener = (...args: never[]) => void;
const EVENTS = ['request', 'upgrade', 'close', 'listening'] as const;

function snapshot(server: HttpServerNode): Record<(typeof EVENTS)[number], Listener[]> {
  const out = {} as Record<(typeof EVENTS)[number], Listener[]>;
  for (const e of EVENTS) out[e] = server.listeners(e) as Listener[];
  return out;
}

/** Puts each event's listeners back to `saved`, keeping (after them) any listener added since that is not in `drop`. */
function restore(server: HttpServerNode, saved: ReturnType<typeof snapshot>, drop: Set<Listener>): void {
  for (const e of EVENTS) {
    const later = (server.listeners(e) as Listener[]).filter((l) => !saved[e].includes(l) && !drop.has(l));
    server.removeAllListeners(e);
    for (const l of [...saved[e], ...later]) server.on(e, l as (...args: unknown[]) => void);
  }
}

type ChosenProtocol = IncomingMessage & { chosenProtocol?: string };

/** The `ws` side of the /ws handler: upgrades it accepts become NodeSockets driving its behavior, under uWS's idle timeout. */
function webSocketSide(behavior: WebSocketBehavior<unknown>, sockets: Set<NodeSocket<unknown>>) {
  const wss = new WebSocketServer({
    noServer: true,
    clientTracking: false,
    perMessageDeflate: false,
    ...(behavior.maxPayloadLength === undefined ? {} : { maxPayload: behavior.maxPayloadLength }),
    handleProtocols: (_offered, req) => (req as ChosenProtocol).chosenProtocol || false,
  });
  const open = (ws: WebSocket, raw: Duplex, userData: unknown) => {
    const socket = new NodeSocket(ws, raw, userData, behavior.maxBackpressure ?? 0);
    const uws = socket as unknown as UwsWebSocket<unknown>;
    ws.on('message', (data: Buffer | ArrayBuffer | Buffer[], isBinary: boolean) => {
      socket.lastHeard = Date.now();
      const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data);
      void behavior.message?.(uws, arrayBufferOf(buf), isBinary);
    });
    ws.on('pong', () => (socket.lastHeard = Date.now()));
    ws.on('error', () => {});
    raw.on('drain', () => behavior.drain?.(uws));
    ws.once('close', (code: number, reason: Buffer) => behavior.close?.(uws, code, arrayBufferOf(reason)));
    void behavior.open?.(uws);
  };
  // uWS's idleTimeout with sendPingsAutomatically: a socket silent for half the timeout is pinged, for all of it closed.
  const idleMs = (behavior.idleTimeout ?? 120) * 1000;
  const idleSweep = setInterval(
    () => {
      const now = Date.now();
      for (const s of sockets) {
        const silent = now - s.lastHeard;
        if (silent > idleMs) s.ws.terminate();
        else if (silent > idleMs / 2) s.ws.ping();
      }
    },
    Math.max(1000, idleMs / 4),
  );
  idleSweep.unref();
  return {
    accept(res: UpgradeResponse, userData: unknown, protocol: string): void {
      const { req, socket, head } = res.raw;
      (req as ChosenProtocol).chosenProtocol = protocol;
      // `ws` may still refuse the handshake without calling back (the socket gone meanwhile): then open and close
      // never run, and the user's connection slot taken at authentication is given back here instead.
      let opened = false;
      socket.once('close', () => {
        if (!opened) (userData as { releaseSlot?: () => void }).releaseSlot?.();
      });
      wss.handleUpgrade(req, socket, head, (ws) => {
        opened = true;
        open(ws, socket, userData);
      });
    },
    close(): void {
      clearInterval(idleSweep);
      wss.close();
      for (const s of [...sockets]) s.ws.terminate();
    },
  };
}

/**
 * The checks `ws` makes in handleUpgrade, where a failure is answered 400 without calling back: made before the
 * upgrade is admitted and authenticated, so that one never holds a place or a user slot it cannot use.
 */
function validHandshake(req: IncomingMessage, socket: Duplex): boolean {
  const key = req.headers['sec-websocket-key'];
  const version = Number(req.headers['sec-websocket-version']);
  return (
    req.method === 'GET' &&
    String(req.headers.upgrade ?? '').toLowerCase() === 'websocket' &&
    typeof key === 'string' &&
    /^[+/0-9A-Za-z]{22}==$/.test(key) &&
    (version === 13 || version === 8) &&
    socket.readable &&
    socket.writable
  );
}

type AdmitRequest = Parameters<SocketIOMount>[3];

interface Engine {
  handleRequest(req: IncomingMessage, res: ServerResponse): void;
  handleUpgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void;
}

/** The server's 'request' and 'upgrade' listeners: chatwire's paths here, every other one to the host's listeners. */
function dispatchers(
  server: HttpServerNode,
  host: ReturnType<typeof snapshot>,
  prefix: string,
  app: NodeApp,
  engine: Engine,
  accept: Accept,
  admit: AdmitRequest,
) {
  const ioPath = `${prefix}/socket.io/`;
  // A socket.io request that would start a session takes a place among those waiting to authenticate, as on uWS.
  const admitted = (req: IncomingMessage, query: string, res: () => NodeResponse | UpgradeResponse) => {
    if (new URLSearchParams(query).has('sid')) return true;
    const forwarded = req.headers['x-forwarded-for'];
    return admit(res() as unknown as HttpResponse, req, Array.isArray(forwarded) ? forwarded.join(', ') : forwarded);
  };
  const onRequest = (req: IncomingMessage, res: ServerResponse) => {
    const { path, query } = splitUrl(req.url);
    if (path.startsWith(ioPath)) {
      if (admitted(req, query, () => new NodeResponse(req, res))) engine.handleRequest(req, res);
      return;
    }
    const inner = innerPath(prefix, path);
    const found = inner !== null && ownsPath(prefix, inner) ? app.route(req.method ?? 'GET', inner) : null;
    if (found === null) {
      for (const l of host.request) (l as (req: IncomingMessage, res: ServerResponse) => void).call(server, req, res);
      return;
    }
    void found.handler(
      new NodeResponse(req, res) as unknown as HttpResponse,
      new NodeRequest(req, inner as string, query, found.params) as unknown as HttpRequest,
    );
  };
  const onUpgrade = (req: IncomingMessage, socket: Duplex, head: Buffer) => {
    const { path, query } = splitUrl(req.url);
    if (path.startsWith(ioPath)) {
      if (admitted(req, query, () => new UpgradeResponse(req, socket, head, accept))) engine.handleUpgrade(req, socket, head);
      return;
    }
    if (innerPath(prefix, path) === '/ws') {
      const res = new UpgradeResponse(req, socket, head, accept);
      if (!validHandshake(req, socket)) return refuseRequest(res as unknown as HttpResponse, new AppError('bad_request', 'not a valid WebSocket handshake'));
      void app.wsBehavior?.upgrade?.(res as unknown as HttpResponse, new NodeRequest(req, '/ws', query, []) as unknown as HttpRequest, {} as never);
      return;
    }
    // Not chatwire's: the host's upgrade listeners, or, when it has none, what node:http does then (drop it).
    if (host.upgrade.length === 0 && server.listenerCount('upgrade') === 1) socket.destroy();
    for (const l of host.upgrade) (l as (req: IncomingMessage, socket: Duplex, head: Buffer) => void).call(server, req, socket, head);
  };
  return { onRequest, onUpgrade };
}

/** Mounts chatwire on a node:http server under `prefix` (normalised, see mount-paths.ts). */
export function attachToNodeServer(server: HttpServerNode, deps: TransportDeps, prefix: string): HttpServer {
  const hostListeners = snapshot(server);
  const app = new NodeApp();
  const sockets = new Set<NodeSocket<unknown>>();
  attachWebSocket(app as unknown as TemplatedApp, deps, {
    open: (ws) => sockets.add(ws as unknown as NodeSocket<unknown>),
    close: (ws) => sockets.delete(ws as unknown as NodeSocket<unknown>),
  });
  const http = attachHttpRoutes(app as unknown as TemplatedApp, deps);
  // destroyUpgrade: false: engine.io would otherwise end every upgrade that is not its own after a second, the host's too.
  let admitRequest: AdmitRequest = () => true;
  const io: SocketIOServer = attachSocketIO((s, _admitting, _uwsOptions, admit) => {
    admitRequest = admit;
    s.attach(server, { path: `${prefix}/socket.io`, destroyUpgrade: false });
  }, deps);
  // engine.io took the server's listeners over for its own dispatch: put them back, this file dispatches instead.
  restore(server, hostListeners, new Set(EVENTS.flatMap((e) => (server.listeners(e) as Listener[]).filter((l) => !hostListeners[e].includes(l)))));
  const ws = webSocketSide(app.wsBehavior as WebSocketBehavior<unknown>, sockets);
  const { onRequest, onUpgrade } = dispatchers(server, hostListeners, prefix, app, io.engine as unknown as Engine, ws.accept, admitRequest);
  server.removeAllListeners('request');
  server.on('request', onRequest);
  server.removeAllListeners('upgrade');
  server.on('upgrade', onUpgrade);
  let mounted = true;
  let closed = false;

  const unmount = () => {
    if (!mounted) return;
    mounted = false;
    restore(server, hostListeners, new Set<Listener>([onRequest as Listener, onUpgrade as Listener]));
  };
  const closeConnections = (code = 1001, reason = 'server shutting down') => {
    http.closeStreams();
    for (const s of [...sockets]) s.end(code, reason);
    io.local.disconnectSockets(true);
  };
  return {
    get port() {
      const address = server.address();
      return typeof address === 'object' && address !== null ? address.port : 0;
    },
    stopListening: unmount,
    closeConnections,
    async close() {
      if (closed) return;
      closed = true;
      unmount();
      closeConnections();
      // Not io.close(): it would close the host's server.
      io.engine.close();
      ws.close();
    },
  };
}
