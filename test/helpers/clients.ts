import type { IncomingHttpHeaders } from 'node:http';
import { io as ioClient, type Socket } from 'socket.io-client';
import WebSocket from 'ws';
import type { ServerMessage } from '../../src/protocol/index.js';

const WAIT_MS = 10_000;

type Msg = ServerMessage & Record<string, unknown>;

/** A raw /ws client that records every frame and lets a test wait for the next matching one. */
export class WsClient {
  readonly received: Msg[] = [];
  /** Frames no next() has taken yet, in arrival order. */
  private unread: Msg[] = [];
  private waiters: (() => void)[] = [];
  closeCode: number | null = null;
  closeReason = '';
  readonly closed: Promise<number>;

  private constructor(readonly socket: WebSocket) {
    socket.on('message', (data, isBinary) => {
      const m = JSON.parse(isBinary ? '{}' : data.toString()) as Msg;
      this.received.push(m);
      this.unread.push(m);
      this.wake();
    });
    this.closed = new Promise((resolve) => {
      socket.on('close', (code, reason) => {
        this.closeCode = code;
        this.closeReason = reason.toString();
        this.wake();
        resolve(code);
      });
    });
    socket.on('error', () => this.wake());
  }

  static connect(url: string, options: { user?: string; token?: string; protocols?: string[]; headers?: Record<string, string> } = {}): Promise<WsClient> {
    const u = new URL(url);
    if (options.user) u.searchParams.set('user', options.user);
    if (options.token) u.searchParams.set('token', options.token);
    const socket = new WebSocket(u, options.protocols ?? [], { headers: options.headers });
    const client = new WsClient(socket);
    return new Promise((resolve, reject) => {
      socket.once('open', () => resolve(client));
      socket.once('unexpected-response', (_req, res) => reject(Object.assign(new Error(`upgrade refused: ${res.statusCode}`), { statusCode: res.statusCode })));
      socket.once('error', reject);
    });
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  send(message: unknown): void {
    this.socket.send(typeof message === 'string' ? message : JSON.stringify(message));
  }

  /** Takes the first unread frame that matches, waiting for it; frames that do not match stay unread for later calls. */
  async next(match: (m: Msg) => boolean = () => true, timeoutMs = WAIT_MS): Promise<Msg> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.unread.findIndex(match);
      if (i >= 0) return this.unread.splice(i, 1)[0] as Msg;
      if (this.closeCode !== null) throw new Error(`socket closed (${this.closeCode} ${this.closeReason}) while waiting`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no matching frame within ${timeoutMs} ms; got ${JSON.stringify(this.received.slice(-5))}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  nextOfType<T extends Msg['type']>(type: T, match: (m: Msg) => boolean = () => true): Promise<Extract<Msg, { type: T }> & Msg> {
    return this.next((m) => m.type === type && match(m)) as Promise<Extract<Msg, { type: T }> & Msg>;
  }

  /** Sends a request with an id and waits for the reply carrying that id. */
  async request(message: Record<string, unknown>): Promise<Msg> {
    const id = (message.id as string | undefined) ?? `r${Math.random().toString(36).slice(2, 10)}`;
    this.send({ ...message, id });
    return this.next((m) => (m as { id?: string }).id === id);
  }

  /** Collects a task's deltas until its chat.done / chat.error. */
  async collect(taskId: string): Promise<{ deltas: Msg[]; text: string; end: Msg }> {
    const deltas: Msg[] = [];
    for (;;) {
      const m = await this.next((x) => (x as { taskId?: string }).taskId === taskId && x.type !== 'chat.ack');
      if (m.type === 'chat.delta') deltas.push(m);
      else return { deltas, text: deltas.map((d) => d.text as string).join(''), end: m };
    }
  }

  close(): Promise<number> {
    if (this.closeCode === null) this.socket.close();
    return this.closed;
  }

  terminate(): Promise<number> {
    this.socket.terminate();
    return this.closed;
  }
}

export type RecordingSocket = Socket & { received: Msg[] };

/** A socket.io client on the same server; `received` records every server event from the start (hello comes at once). */
export async function connectSocketIO(base: string, auth: Record<string, unknown> = {}): Promise<RecordingSocket> {
  const socket = ioClient(base, { transports: ['websocket'], auth, reconnection: false, forceNew: true }) as RecordingSocket;
  socket.received = [];
  socket.onAny((event: string, payload: Msg) => socket.received.push({ ...payload, type: event } as Msg));
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', () => resolve());
    socket.once('connect_error', reject);
  });
  return socket;
}

export function emitWithAck(socket: Socket, event: string, payload: Record<string, unknown>): Promise<Msg> {
  return socket.timeout(WAIT_MS).emitWithAck(event, payload) as Promise<Msg>;
}

/** Reads an SSE response into events until it ends. */
export async function readSse(res: Response): Promise<{ event: string; id?: string; data: Msg }[]> {
  const text = await res.text();
  const events: { event: string; id?: string; data: Msg }[] = [];
  for (const block of text.split('\n\n')) {
    let event = 'message';
    let id: string | undefined;
    const data: string[] = [];
    for (const line of block.split('\n')) {
      if (line.startsWith('event: ')) event = line.slice(7);
      else if (line.startsWith('id: ')) id = line.slice(4);
      else if (line.startsWith('data: ')) data.push(line.slice(6));
    }
    if (data.length > 0)
      events.push(id === undefined ? { event, data: JSON.parse(data.join('\n')) as Msg } : { event, id, data: JSON.parse(data.join('\n')) as Msg });
  }
  return events;
}

export interface Refusal {
  status: number;
  body: string;
  headers: IncomingHttpHeaders;
}

/** Tries a /ws upgrade and resolves with the HTTP response that refused it; rejects if a socket opened. */
export function refusedUpgrade(url: string, protocols: string[] = [], headers: Record<string, string> = {}): Promise<Refusal> {
  const socket = new WebSocket(url, protocols, { headers });
  return new Promise((resolve, reject) => {
    socket.once('open', () => {
      socket.terminate();
      reject(new Error('the upgrade was accepted'));
    });
    socket.once('unexpected-response', (req, res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk: string) => {
        body += chunk;
      });
      res.on('end', () => {
        req.destroy();
        resolve({ status: res.statusCode ?? 0, body, headers: res.headers });
      });
    });
    socket.once('error', reject);
  });
}

/** Tries a socket.io handshake and resolves with its connect_error (and every event received, which must be none). */
export function refusedSocketIO(
  base: string,
  auth: Record<string, unknown>,
  extraHeaders: Record<string, string> = {},
): Promise<{ error: Error & { data?: unknown }; events: string[] }> {
  const socket = ioClient(base, { transports: ['websocket'], auth, extraHeaders, reconnection: false, forceNew: true });
  const events: string[] = [];
  socket.onAny((event: string) => events.push(event));
  return new Promise((resolve, reject) => {
    socket.once('connect', () => {
      socket.close();
      reject(new Error('the handshake was accepted'));
    });
    socket.once('connect_error', (error: Error & { data?: unknown }) => {
      socket.close();
      resolve({ error, events });
    });
  });
}

/**
 * A socket.io client spoken by hand over engine.io's websocket transport (protocol 4, socket.io protocol 5), for what
 * socket.io-client hides: the close code, and whether the server closes the connection itself. Answers pings.
 */
export class RawSocketIO {
  readonly packets: string[] = [];
  /** The close code, once the connection has closed. */
  readonly closed: Promise<number>;
  private waiters: (() => void)[] = [];

  private constructor(readonly socket: WebSocket) {
    socket.on('message', (data) => {
      const packet = data.toString();
      if (packet === '2') socket.send('3');
      this.packets.push(packet);
      for (const wake of this.waiters.splice(0)) wake();
    });
    this.closed = new Promise((resolve) => socket.once('close', (code) => resolve(code)));
  }

  /** Opens the engine.io connection and sends socket.io's CONNECT with `auth`. */
  static async connect(base: string, auth: Record<string, unknown> = {}): Promise<RawSocketIO> {
    const socket = new WebSocket(`${base.replace(/^http/, 'ws')}/socket.io/?EIO=4&transport=websocket`);
    // Listening from the start: the open packet can arrive in the same read as the upgrade's answer.
    const client = new RawSocketIO(socket);
    await new Promise((resolve, reject) => {
      socket.once('open', resolve);
      socket.once('error', reject);
    });
    await client.next((p) => p.startsWith('0'));
    socket.send(`40${JSON.stringify(auth)}`);
    return client;
  }

  /** The first packet (received so far or later) that matches; rejects if the connection closes first. */
  async next(match: (packet: string) => boolean): Promise<string> {
    let closed = false;
    void this.closed.then(() => {
      closed = true;
      for (const wake of this.waiters.splice(0)) wake();
    });
    for (;;) {
      const found = this.packets.find(match);
      if (found !== undefined) return found;
      if (closed) throw new Error(`closed before a matching packet; got ${JSON.stringify(this.packets.map((p) => p.slice(0, 120)))}`);
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }

  /** Emits an event on the main namespace. */
  emit(event: string, payload: unknown): void {
    this.socket.send(`42${JSON.stringify([event, payload])}`);
  }

  /** The payloads of the events named `event` received so far. */
  events(event: string): Record<string, unknown>[] {
    return this.packets
      .filter((p) => p.startsWith('42'))
      .map((p) => JSON.parse(p.slice(2)) as [string, Record<string, unknown>])
      .filter(([name]) => name === event)
      .map(([, payload]) => payload);
  }
}
