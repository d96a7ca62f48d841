/**
 * The pieces of the load generator (scripts/load.ts) and the soak bench
 * (scripts/bench-soak.ts): chatwire started as a child process on loopback
 * with a seeded data dir, clients over /ws and socket.io that chat, cancel,
 * drop and resume, look up the marketplace, or stop reading; the open-loop
 * schedule that drives them; the statistics they keep; a /metrics sampler;
 * and the open-file limit check. The /ws clients run on chatwire's client
 * library (src/client); socket.io clients on socket.io-client. scripts/bench-chat.ts
 * shares `socketIoConn`, `wsConn` (for its echo baseline) and `openClients`.
 */
import fs from 'node:fs';
import type { Socket as NetSocket } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { io as ioClient, type Socket } from 'socket.io-client';
import WebSocket from 'ws';
import {
  type ChatStream,
  ChatwireError,
  type ChatwireClient,
  type ChatwireErrorCode,
  connect,
  type RequestMessage,
  type SendOptions,
  type WebSocketConstructor,
} from '../src/client/client.js';
import { Database } from '../src/db/database.js';
import { formatId } from '../src/db/marketplace-ids.js';
import { SEED_CATEGORIES, seedMarketplace } from '../src/db/marketplace-seed.js';
import { migrate } from '../src/db/migrate.js';
import { DATABASE_FILE_NAME } from '../src/db/data-file.js';
import { Ledger, WireStreams } from '../test/helpers/chat-ledger.js';
import { startChatwireIn, type Child } from './bench-support.js';

// ---------- the server ----------

export interface LoadServer extends Child {
  dataDir: string;
  dbFile: string;
  pid: number;
  /** SIGTERM, wait for the exit; resolves with the exit code. Keeps the data dir. */
  terminate(): Promise<number | null>;
  removeDataDir(): void;
}

/**
 * Seeds a fresh temp data dir with the marketplace, then starts chatwire on 127.0.0.1:0 with limits that do not shape the load.
 * The server and its data dir do not outlive this process.
 */
export async function startLoadServer(options: { seedRequests: number; env: Record<string, string> }): Promise<LoadServer> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-load-'));
  const dbFile = path.join(dataDir, DATABASE_FILE_NAME);
  if (options.seedRequests > 0) {
    const db = new Database(dbFile);
    try {
      migrate(db);
      seedMarketplace(db, {
        requests: options.seedRequests,
        consumers: Math.max(1, Math.ceil(options.seedRequests / 10)),
        providers: Math.max(1, Math.ceil(options.seedRequests / 50)),
      });
      db.raw.pragma('wal_checkpoint(TRUNCATE)');
    } finally {
      db.close();
    }
  }
  const child = await startChatwireIn(dataDir, options.env);
  const removeDataDir = () => fs.rmSync(dataDir, { recursive: true, force: true });
  // Whatever ends this process (an error included) ends the server it started and removes its data dir.
  process.on('exit', () => {
    if (child.child.exitCode === null && child.child.signalCode === null) child.child.kill('SIGKILL');
    removeDataDir();
  });
  const exited = new Promise<number | null>((resolve) => {
    if (child.child.exitCode !== null) resolve(child.child.exitCode);
    else child.child.once('exit', (code) => resolve(code));
  });
  return {
    ...child,
    dataDir,
    dbFile,
    pid: child.child.pid as number,
    terminate: async () => {
      if (child.child.exitCode === null && child.child.signalCode === null) child.child.kill('SIGTERM');
      const timer = setTimeout(() => child.child.kill('SIGKILL'), 30_000);
      const code = await exited;
      clearTimeout(timer);
      return code;
    },
    removeDataDir,
  };
}

/** The consumer ids of a data dir seeded with `seedRequests` requests (consumers may read only their own records). */
export function consumerIds(seedRequests: number): string[] {
  const n = Math.max(1, Math.ceil(seedRequests / 10));
  return Array.from({ length: Math.min(n, 100_000) }, (_, i) => formatId('consumer', i + 1));
}

// ---------- statistics ----------

/** Latency samples with their time, so a window (the last second, one minute) can be summarized. */
export class Samples {
  readonly at: number[] = [];
  readonly ms: number[] = [];
  add(ms: number, at = performance.now()): void {
    this.at.push(at);
    this.ms.push(ms);
  }
  /** Values recorded in [from, to) (performance.now() times). */
  between(from: number, to = Infinity): number[] {
    const out: number[] = [];
    // Samples are appended in time order: walk back from the end.
    for (let i = this.at.length - 1; i >= 0; i--) {
      const t = this.at[i] as number;
      if (t < from) break;
      if (t < to) out.push(this.ms[i] as number);
    }
    return out;
  }
  get count(): number {
    return this.ms.length;
  }
}

export class LoadStats {
  readonly ack = new Samples();
  readonly ttft = new Samples();
  readonly lookup = new Samples();
  readonly ledger = new Ledger();
  /** Errors by code: `error` replies to chats and lookups, and chat.error. */
  readonly errors: Record<string, number> = {};
  chatsSent = 0;
  chatsAcked = 0;
  cachedAcks = 0;
  chatsDone = 0;
  chatsCancelled = 0;
  chatsFailed = 0;
  deltas = 0;
  lookupsSent = 0;
  lookupsDone = 0;
  cancelsSent = 0;
  reconnects = 0;
  resumes = 0;
  /** Sends and lookups unanswered when their client dropped its connection on purpose (their outcome is unknown to it). */
  abandoned = 0;
  /** Connections closed by the server or the network, not by us. */
  dropped = 0;
  readonly dropCodes: Record<string, number> = {};

  error(code: string): void {
    this.errors[code] = (this.errors[code] ?? 0) + 1;
  }
}

// ---------- clients ----------

type Frame = {
  type: string;
  id?: string;
  taskId?: string;
  conversationId?: string;
  messageId?: string;
  status?: string;
  seq?: number;
  text?: string;
  code?: string;
  finishReason?: string;
  cached?: boolean;
  nextCursor?: string | null;
};

/** One raw connection, a `ws` socket or socket.io, the same to its user: frames out, frames in (socket.io replies and events alike). */
export interface Conn {
  /** Sends while the connection is open; a frame sent after it closed is dropped. */
  send(frame: Record<string, unknown>): void;
  terminate(): void;
  /** Stops reading from the socket (a reader that hangs); /ws only. */
  pause(): void;
  readonly open: boolean;
  closed: Promise<number>;
}

/**
 * A raw `ws` socket, JSON frames in and out. Only for what is not chatwire's protocol (bench-chat's echo
 * baseline server): chatwire's /ws clients go through src/client.
 */
export function wsConn<F>(url: string, onFrame: (f: F) => void): Promise<Conn> {
  const socket = new WebSocket(url, { perMessageDeflate: false });
  let open = false;
  const closed = new Promise<number>((resolve) => socket.once('close', (code) => resolve(code)));
  socket.on('message', (data) => onFrame(JSON.parse(data.toString()) as F));
  socket.on('error', () => {});
  return new Promise((resolve, reject) => {
    socket.once('open', () => {
      open = true;
      void closed.then(() => (open = false));
      resolve({
        send: (f) => {
          if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(f));
        },
        terminate: () => socket.terminate(),
        pause: () => (socket as unknown as { _socket: NetSocket })._socket.pause(),
        get open() {
          return open;
        },
        closed,
      });
    });
    socket.once('unexpected-response', (_req, res) => reject(new Error(`upgrade refused: ${res.statusCode}`)));
    socket.once('error', reject);
  });
}

export function socketIoConn<F extends { type: string }>(base: string, user: string, onFrame: (f: F) => void): Promise<Conn> {
  const socket: Socket = ioClient(base, { transports: ['websocket'], auth: { user }, reconnection: false, forceNew: true });
  let open = false;
  const closed = new Promise<number>((resolve) => socket.once('disconnect', () => resolve(1006)));
  // Replies go through the ack callback, server-initiated frames arrive as events named by their type.
  socket.onAny((event: string, payload: F) => onFrame({ ...payload, type: event }));
  return new Promise((resolve, reject) => {
    socket.once('connect', () => {
      open = true;
      void closed.then(() => (open = false));
      resolve({
        send: (f) => {
          const { type, ...payload } = f;
          if (socket.connected) socket.emit(type as string, payload, (reply: F) => onFrame(reply));
        },
        terminate: () => socket.disconnect(),
        pause: () => {
          throw new Error('pause is for /ws clients');
        },
        get open() {
          return open;
        },
        closed,
      });
    });
    socket.once('connect_error', reject);
  });
}

export type Transport = 'ws' | 'socket.io';

export interface ChatPlan {
  text: string;
  cache: 'use' | 'bypass';
  maxTokens?: number | undefined;
  /** Continue one of this client's conversations. */
  continueConversation?: boolean;
  /** Send chat.cancel right after the ack. */
  cancel?: boolean;
  /** After the first delta, drop the connection, reconnect, and resume every task in flight. */
  dropAndResume?: boolean;
}

interface PendingChat {
  sentAt: number;
  plan: ChatPlan;
}

interface RunningTask {
  sentAt: number;
  next: number;
  text: string;
  complete: boolean;
  plan: ChatPlan;
  gotFirst: boolean;
}

/** What load.ts and bench-soak.ts drive: one user's connection, over /ws or socket.io. */
export interface LoadClient {
  readonly user: string;
  readonly transport: Transport;
  /** Set when the server (or the network) closed the connection. */
  readonly closedByServer: number | null;
  /** Chats sent and not ended yet, acknowledged or not. */
  readonly inFlight: number;
  readonly open: boolean;
  /** Connected and not in the middle of a reconnect: a send now will be answered. */
  readonly ready: boolean;
  chat(plan: ChatPlan): void;
  /** One marketplace lookup: a requests.list page (sometimes the next page), or the caller's own requests or bookings. */
  lookup(): void;
  /** Sends a frame as is; its replies are not tracked. */
  sendRaw(frame: Record<string, unknown>): void;
  /** Stops reading (a reader that hangs mid-stream): what the server sends it piles up in the kernel, then in the server. /ws only. */
  hang(): void;
  /** The task ids this client has acknowledged and not seen end. */
  runningTaskIds(): string[];
  /** Drops the connection now, reconnects and resumes every task in flight (what a flaky network does). */
  disconnectAndResume(): Promise<void>;
  close(): Promise<void>;
}

export const LoadClient = {
  /** /ws clients run on chatwire's client library; socket.io clients on socket.io-client (the library speaks only /ws). */
  open(base: string, user: string, transport: Transport, stats: LoadStats, random: () => number): Promise<LoadClient> {
    return transport === 'ws' ? WsLoadClient.open(base, user, stats, random) : SocketIoLoadClient.open(base, user, stats, random);
  },
};

/** The lookup a load client sends next; `filters` is set for a requests.list page (its cursor is only valid with them). */
function nextLookup(
  random: () => number,
  user: string,
  lastPage: { filters: Record<string, unknown>; cursor: string } | null,
): {
  message: Record<string, unknown> & { type: 'requests.list' | 'consumer.requests' | 'consumer.bookings' };
  filters?: Record<string, unknown>;
  usedPage: boolean;
} {
  const r = random();
  if (r >= 0.8) return { message: { type: 'consumer.bookings', consumerId: user, limit: 10 }, usedPage: false };
  if (r >= 0.6) return { message: { type: 'consumer.requests', consumerId: user, limit: 10 }, usedPage: false };
  if (lastPage !== null && random() < 0.3)
    return { message: { type: 'requests.list', limit: 20, ...lastPage.filters, cursor: lastPage.cursor }, filters: lastPage.filters, usedPage: true };
  const filters: Record<string, unknown> = {};
  const s = random();
  if (s < 0.5) filters.status = 'open';
  else if (s < 0.6) filters.status = 'booked';
  if (random() < 0.4) filters.category = SEED_CATEGORIES[Math.floor(random() * SEED_CATEGORIES.length)];
  return { message: { type: 'requests.list', limit: 20, ...filters }, filters, usedPage: false };
}

/**
 * A socket.io load client on raw socket.io-client: chatwire's client library speaks only the /ws protocol.
 * It reconnects on purpose when a plan says so, and resumes its tasks itself.
 */
class SocketIoLoadClient implements LoadClient {
  readonly transport: Transport = 'socket.io';
  private conn!: Conn;
  private n = 0;
  private readonly pendingChats = new Map<string, PendingChat>();
  private readonly pendingLookups = new Map<string, { sentAt: number }>();
  private readonly tasks = new Map<string, RunningTask>();
  /** chat.resume request ids → their task. */
  private readonly pendingResumes = new Map<string, string>();
  private readonly conversations: string[] = [];
  private reconnecting = false;
  private closing = false;
  /** The last requests.list page's filters and next cursor: a cursor is only valid with the filters it came from. */
  private lastPage: { filters: Record<string, unknown>; cursor: string } | null = null;
  private readonly lookupFilters = new Map<string, Record<string, unknown>>();
  /** Set when the server (or the network) closed the connection. */
  closedByServer: number | null = null;

  private constructor(
    private readonly base: string,
    readonly user: string,
    private readonly stats: LoadStats,
    private readonly random: () => number,
  ) {}

  static async open(base: string, user: string, stats: LoadStats, random: () => number): Promise<LoadClient> {
    const c = new SocketIoLoadClient(base, user, stats, random);
    await c.connect();
    return c;
  }

  private async connect(): Promise<void> {
    this.conn = await socketIoConn(this.base, this.user, (f: Frame) => this.onFrame(f));
    const conn = this.conn;
    void conn.closed.then((code) => {
      if (this.closing || this.reconnecting || conn !== this.conn) return;
      this.closedByServer = code;
      this.stats.dropped++;
      this.stats.dropCodes[String(code)] = (this.stats.dropCodes[String(code)] ?? 0) + 1;
      this.abandonAll();
    });
  }

  /** Chats sent and not ended yet, acknowledged or not. */
  get inFlight(): number {
    return this.pendingChats.size + this.tasks.size;
  }

  get open(): boolean {
    return this.conn.open || this.reconnecting;
  }

  /** Connected and not in the middle of a reconnect: a send now will be answered. */
  get ready(): boolean {
    return this.conn.open && !this.reconnecting && !this.closing;
  }

  chat(plan: ChatPlan): void {
    const id = `c${this.n++}`;
    const frame: Record<string, unknown> = { type: 'chat.send', id, text: plan.text, cache: plan.cache };
    if (plan.maxTokens !== undefined) frame.params = { maxTokens: plan.maxTokens };
    if (plan.continueConversation && this.conversations.length > 0)
      frame.conversationId = this.conversations[Math.floor(this.random() * this.conversations.length)];
    this.pendingChats.set(id, { sentAt: performance.now(), plan });
    this.stats.chatsSent++;
    this.conn.send(frame);
  }

  lookup(): void {
    const id = `l${this.n++}`;
    const next = nextLookup(this.random, this.user, this.lastPage);
    if (next.usedPage) this.lastPage = null;
    if (next.filters !== undefined) this.lookupFilters.set(id, next.filters);
    const frame = { ...next.message, id };
    this.pendingLookups.set(id, { sentAt: performance.now() });
    this.stats.lookupsSent++;
    this.conn.send(frame);
  }

  /** Sends a frame as is; its replies are not tracked. */
  sendRaw(frame: Record<string, unknown>): void {
    this.conn.send(frame);
  }

  /** Stops reading (a reader that hangs mid-stream): what the server sends it piles up in the kernel, then in the server. */
  hang(): void {
    this.conn.pause();
  }

  /** The task ids this client has acknowledged and not seen end. */
  runningTaskIds(): string[] {
    return [...this.tasks.keys()];
  }

  async close(): Promise<void> {
    this.closing = true;
    this.conn.terminate();
    await this.conn.closed;
  }

  private abandonAll(): void {
    this.stats.abandoned += this.pendingChats.size + this.pendingLookups.size;
    this.pendingChats.clear();
    this.pendingLookups.clear();
    this.pendingResumes.clear();
    this.lookupFilters.clear();
    this.tasks.clear();
  }

  /** Drops the connection now, reconnects and resumes every task in flight (what a flaky network does). */
  disconnectAndResume(): Promise<void> {
    return this.dropAndResume();
  }

  /** Drops the connection as a flaky network would, reconnects, and resumes every task in flight from the next seq. */
  private async dropAndResume(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    this.stats.reconnects++;
    const old = this.conn;
    old.terminate();
    await old.closed;
    // Unacknowledged sends and lookups die with the connection: the client cannot know their outcome.
    this.stats.abandoned += this.pendingChats.size + this.pendingLookups.size;
    this.pendingChats.clear();
    this.pendingLookups.clear();
    this.lookupFilters.clear();
    try {
      await this.connect();
    } catch {
      this.reconnecting = false;
      this.closedByServer = -1;
      this.stats.dropped++;
      this.abandonAll();
      return;
    }
    this.reconnecting = false;
    for (const [taskId, t] of this.tasks) {
      this.stats.resumes++;
      const id = `r${this.n++}`;
      this.pendingResumes.set(id, taskId);
      this.conn.send({ type: 'chat.resume', id, taskId, fromSeq: t.next });
    }
  }

  private onFrame(f: Frame): void {
    const now = performance.now();
    const { stats } = this;
    switch (f.type) {
      case 'chat.ack': {
        const p = this.pendingChats.get(f.id as string);
        if (!p) return;
        this.pendingChats.delete(f.id as string);
        const taskId = f.taskId as string;
        stats.chatsAcked++;
        if (f.status === 'cached') stats.cachedAcks++;
        stats.ack.add(now - p.sentAt, now);
        stats.ledger.ack({ taskId, conversationId: f.conversationId as string, messageId: f.messageId as string, text: p.plan.text });
        if (!this.conversations.includes(f.conversationId as string)) {
          this.conversations.push(f.conversationId as string);
          if (this.conversations.length > 8) this.conversations.shift();
        }
        if (!this.tasks.has(taskId)) this.tasks.set(taskId, { sentAt: p.sentAt, next: 0, text: '', complete: true, plan: p.plan, gotFirst: false });
        if (p.plan.cancel) {
          stats.cancelsSent++;
          this.conn.send({ type: 'chat.cancel', taskId });
        }
        return;
      }
      case 'chat.delta': {
        const t = this.tasks.get(f.taskId as string);
        if (!t) return;
        stats.deltas++;
        if (f.seq !== t.next) {
          stats.ledger.seqGaps++;
          t.complete = false;
        }
        t.next = (f.seq as number) + 1;
        t.text += f.text as string;
        if (!t.gotFirst) {
          t.gotFirst = true;
          stats.ttft.add(now - t.sentAt, now);
          if (t.plan.dropAndResume) void this.dropAndResume();
        }
        return;
      }
      case 'chat.done':
      case 'chat.error': {
        const taskId = f.taskId as string;
        const t = this.tasks.get(taskId);
        if (!t) {
          if (stats.ledger.ended.has(taskId)) stats.ledger.duplicateEnds++;
          return;
        }
        this.tasks.delete(taskId);
        stats.ledger.end(taskId, {
          type: f.type,
          messageId: f.messageId,
          finishReason: f.finishReason,
          code: f.code,
          cached: f.cached,
          text: t.text,
          complete: t.complete,
        });
        if (f.type === 'chat.done') {
          stats.chatsDone++;
          if (f.finishReason === 'cancelled') stats.chatsCancelled++;
        } else {
          stats.chatsFailed++;
          stats.error(f.code as string);
        }
        return;
      }
      case 'requests.list':
      case 'consumer.requests':
      case 'consumer.bookings': {
        const p = this.pendingLookups.get(f.id as string);
        if (!p) return;
        this.pendingLookups.delete(f.id as string);
        stats.lookupsDone++;
        stats.lookup.add(now - p.sentAt, now);
        const filters = this.lookupFilters.get(f.id as string);
        this.lookupFilters.delete(f.id as string);
        if (filters !== undefined && typeof f.nextCursor === 'string') this.lastPage = { filters, cursor: f.nextCursor };
        return;
      }
      case 'error': {
        stats.error(f.code as string);
        const id = f.id;
        if (id === undefined) return;
        if (this.pendingChats.delete(id)) stats.ledger.refuse(f.code as string);
        else if (this.pendingLookups.delete(id)) this.lookupFilters.delete(id);
        else {
          // A resume refused (the task left retention): nothing more will come for it.
          const taskId = this.pendingResumes.get(id);
          this.pendingResumes.delete(id);
          if (taskId !== undefined) this.tasks.delete(taskId);
        }
        return;
      }
      case 'ok':
        if (f.id !== undefined) this.pendingResumes.delete(f.id);
        return;
    }
  }
}

/** Errors the client library raises itself: the server did not answer (the outcome is unknown to the client). */
const CLIENT_SIDE: ReadonlySet<ChatwireErrorCode> = new Set<ChatwireErrorCode>(['connection_lost', 'closed', 'aborted', 'timeout', 'bad_frame']);

/**
 * A /ws load client on chatwire's client library, so that the library runs under the load too. The library
 * reconnects and resumes by itself: a drop on purpose closes the current socket and lets it do so; a socket
 * the server (or the network) closed is counted as dropped and the client stays down, as a dropped load
 * client always has. The seq of each delta is checked on the wire (the library's `message` event), since
 * the library's streams hide seq and repair a gap with a resume.
 */
class WsLoadClient implements LoadClient {
  readonly transport: Transport = 'ws';
  closedByServer: number | null = null;
  private client!: ChatwireClient;
  /** The library's current socket (the WebSocket class given to it records each one): for drops, hangs and raw frames. */
  private socket: WebSocket | null = null;
  private readonly wire: WireStreams;
  private pendingChats = 0;
  private readonly tasks = new Map<string, { sentAt: number; plan: ChatPlan; gotFirst: boolean }>();
  private readonly conversations: string[] = [];
  private lastPage: { filters: Record<string, unknown>; cursor: string } | null = null;
  /** Set from a drop on purpose until the library is connected again; counts the failed attempts meanwhile. */
  private dropping: { attempts: number; reconnected: () => void } | null = null;
  private closing = false;
  private opened = false;

  private constructor(
    readonly user: string,
    private readonly stats: LoadStats,
    private readonly random: () => number,
  ) {
    this.wire = new WireStreams(stats.ledger);
  }

  static async open(base: string, user: string, stats: LoadStats, random: () => number): Promise<LoadClient> {
    const c = new WsLoadClient(user, stats, random);
    await c.connect(base);
    return c;
  }

  private async connect(base: string): Promise<void> {
    const record = (socket: WebSocket) => {
      this.socket = socket;
    };
    class RecordedWebSocket extends WebSocket {
      constructor(url: string, protocols?: string | string[]) {
        super(url, protocols, { perMessageDeflate: false });
        record(this);
      }
    }
    this.client = connect(`${base.replace(/^http/, 'ws')}/ws`, {
      user: this.user,
      WebSocket: RecordedWebSocket as unknown as WebSocketConstructor,
      reconnect: { initialDelayMs: 50, maxDelayMs: 1000 },
      heartbeatMs: 0,
      // An ack slower than this under load is a result to see, not a reason to give up on the chat.
      requestTimeoutMs: 600_000,
    });
    this.client.on('message', (f) => {
      if (f.type === 'chat.delta') this.stats.deltas++;
      this.wire.frame(f as Frame);
    });
    this.client.on('resumed', (streams) => (this.stats.resumes += streams.length));
    this.client.on('state', (s) => this.onState(s.state, s.code));
    await this.client.ready();
    this.opened = true;
  }

  private onState(state: string, code: number | undefined): void {
    if (state === 'open' && this.dropping) {
      this.dropping.reconnected();
      this.dropping = null;
    }
    if ((state !== 'reconnecting' && state !== 'connecting') || this.closing || this.closedByServer !== null) return;
    if (!this.opened) {
      // The first connection failed (an upgrade refused): open() rejects, as the handshake failed.
      this.client.close();
      return;
    }
    // The first loss after a drop on purpose is ours; a failed attempt to come back counts as a drop, as before.
    if (this.dropping && this.dropping.attempts++ === 0) return;
    this.closedByServer = this.dropping ? -1 : (code ?? 1006);
    this.stats.dropped++;
    this.stats.dropCodes[String(this.closedByServer)] = (this.stats.dropCodes[String(this.closedByServer)] ?? 0) + 1;
    this.dropping?.reconnected();
    this.dropping = null;
    this.client.close();
  }

  get inFlight(): number {
    return this.pendingChats + this.tasks.size;
  }

  get open(): boolean {
    return this.client.state !== 'closed';
  }

  get ready(): boolean {
    return this.client.state === 'open' && this.dropping === null && !this.closing;
  }

  chat(plan: ChatPlan): void {
    const options: SendOptions = { cache: plan.cache };
    if (plan.maxTokens !== undefined) options.params = { maxTokens: plan.maxTokens };
    if (plan.continueConversation && this.conversations.length > 0)
      options.conversationId = this.conversations[Math.floor(this.random() * this.conversations.length)] as string;
    const sentAt = performance.now();
    this.pendingChats++;
    this.stats.chatsSent++;
    this.client.chat.send(plan.text, options).then(
      (stream) => {
        this.pendingChats--;
        this.onAck(stream, plan, sentAt);
      },
      (err: unknown) => {
        this.pendingChats--;
        this.failed(err, (code) => this.stats.ledger.refuse(code));
      },
    );
  }

  /** A call that failed: a server error is counted by code; one the library raised (the socket went) is abandoned. */
  private failed(err: unknown, refused?: (code: string) => void): void {
    const code = err instanceof ChatwireError ? err.code : 'internal';
    if (CLIENT_SIDE.has(code)) {
      this.stats.abandoned++;
      return;
    }
    this.stats.error(code);
    refused?.(code);
  }

  private onAck(stream: ChatStream, plan: ChatPlan, sentAt: number): void {
    const now = performance.now();
    const { stats } = this;
    const { taskId, conversationId } = stream;
    stats.chatsAcked++;
    if (stream.ack.status === 'cached') stats.cachedAcks++;
    stats.ack.add(now - sentAt, now);
    stats.ledger.ack({ taskId, conversationId, messageId: stream.messageId, text: plan.text });
    if (!this.conversations.includes(conversationId)) {
      this.conversations.push(conversationId);
      if (this.conversations.length > 8) this.conversations.shift();
    }
    const task = { sentAt, plan, gotFirst: false };
    this.tasks.set(taskId, task);
    const first = () => {
      if (task.gotFirst) return;
      task.gotFirst = true;
      const at = performance.now();
      stats.ttft.add(at - sentAt, at);
      if (plan.dropAndResume) void this.disconnectAndResume();
    };
    // Deltas that came in the same read as the ack are in the stream already.
    if (stream.chunks.length > 0) first();
    else {
      const off = stream.on('delta', () => {
        off();
        first();
      });
    }
    if (plan.cancel) {
      stats.cancelsSent++;
      stream.cancel().catch(() => {});
    }
    stream.result.catch(() => {}).finally(() => this.onEnd(taskId));
  }

  /** The stream ended: record the terminal as it came on the wire (none came when the socket went first). */
  private onEnd(taskId: string): void {
    this.tasks.delete(taskId);
    const end = this.wire.takeEnd(taskId);
    if (end === undefined) return;
    this.stats.ledger.end(taskId, end);
    if (end.type === 'chat.done') {
      this.stats.chatsDone++;
      if (end.finishReason === 'cancelled') this.stats.chatsCancelled++;
    } else {
      this.stats.chatsFailed++;
      this.stats.error(end.code as string);
    }
  }

  lookup(): void {
    const next = nextLookup(this.random, this.user, this.lastPage);
    if (next.usedPage) this.lastPage = null;
    const sentAt = performance.now();
    this.stats.lookupsSent++;
    this.client.request(next.message as RequestMessage).then(
      (reply) => {
        const now = performance.now();
        this.stats.lookupsDone++;
        this.stats.lookup.add(now - sentAt, now);
        const cursor = (reply as { nextCursor?: unknown }).nextCursor;
        if (next.filters !== undefined && typeof cursor === 'string') this.lastPage = { filters: next.filters, cursor };
      },
      (err: unknown) => this.failed(err),
    );
  }

  /**
   * Writes past the library onto its socket: the dead readers resume replies this connection did not send,
   * which the library's API does not offer (its resumes are its own streams').
   */
  sendRaw(frame: Record<string, unknown>): void {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(frame));
  }

  hang(): void {
    (this.socket as unknown as { _socket: NetSocket })._socket.pause();
  }

  runningTaskIds(): string[] {
    return [...this.tasks.keys()];
  }

  async disconnectAndResume(): Promise<void> {
    if (!this.ready || !this.socket) return;
    this.stats.reconnects++;
    const back = new Promise<void>((resolve) => {
      this.dropping = { attempts: 0, reconnected: resolve };
    });
    // What a flaky network does: the socket is gone without a close handshake; the library reconnects and resumes.
    this.socket.terminate();
    await back;
  }

  async close(): Promise<void> {
    this.closing = true;
    const socket = this.socket;
    this.client.close();
    if (!socket || socket.readyState === WebSocket.CLOSED) return;
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    // A reader that hangs never answers a close handshake.
    socket.terminate();
    await closed;
  }
}

/** Opens `count` clients, `concurrency` handshakes at a time; reports progress. */
export async function openClients<T>(
  count: number,
  make: (i: number) => Promise<T>,
  options: { concurrency?: number; onProgress?: (opened: number) => void } = {},
): Promise<T[]> {
  const out: T[] = new Array(count);
  const concurrency = options.concurrency ?? 200;
  let next = 0;
  let opened = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, count) }, async () => {
      while (next < count) {
        const i = next++;
        out[i] = await make(i);
        opened++;
        if (opened % 500 === 0) options.onProgress?.(opened);
      }
    }),
  );
  return out;
}

// ---------- the closed chat loop of bench:chat and bench:cluster ----------

/** The frames a closed chat loop reads. */
export type LoopFrame = { type: string; id?: string; taskId?: string; seq?: number; code?: string; usage?: { completionTokens: number } };

/**
 * One client's closed chat loop, transport-agnostic, with pings on the side: it sends its next chat when the last
 * one is done (50 ms after a refusal), and records, while `measuring`, each ack's and pong's round trip, each
 * chat's time to its first delta, the chats, deltas and tokens delivered, and any delta out of seq order.
 */
export class ClosedChatLoop {
  measuring = false;
  stopping = false;
  readonly acks: number[] = [];
  readonly pings: number[] = [];
  readonly ttfts: number[] = [];
  chats = 0;
  deltas = 0;
  tokens = 0;
  lost = 0;
  inFlight = 0;
  readonly errors: Record<string, number> = {};
  private readonly nextSeq = new Map<string, number>();
  private readonly sentAt = new Map<string, number>();
  private readonly taskSentAt = new Map<string, number>();
  private n = 0;
  private pingTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly id: number,
    private readonly send: (m: Record<string, unknown>) => void,
    private readonly pingEveryMs: number,
  ) {}

  start(): void {
    this.sendChat();
    this.pingTimer = setInterval(() => {
      const id = `p${this.n++}`;
      this.sentAt.set(id, performance.now());
      this.send({ type: 'ping', id });
    }, this.pingEveryMs);
  }

  private sendChat(): void {
    if (this.stopping) return;
    const id = `c${this.n++}`;
    this.sentAt.set(id, performance.now());
    this.inFlight++;
    this.send({ type: 'chat.send', id, text: `client ${this.id} asks question ${this.n}`, cache: 'bypass' });
  }

  onFrame(m: LoopFrame): void {
    const now = performance.now();
    switch (m.type) {
      case 'pong': {
        const t = this.sentAt.get(m.id as string);
        this.sentAt.delete(m.id as string);
        if (t !== undefined && this.measuring) this.pings.push(now - t);
        break;
      }
      case 'chat.ack': {
        const t = this.sentAt.get(m.id as string);
        this.sentAt.delete(m.id as string);
        if (t !== undefined) {
          if (this.measuring) this.acks.push(now - t);
          this.taskSentAt.set(m.taskId as string, t);
        }
        if (!this.nextSeq.has(m.taskId as string)) this.nextSeq.set(m.taskId as string, 0);
        break;
      }
      case 'chat.delta': {
        const taskId = m.taskId as string;
        const expected = this.nextSeq.get(taskId) ?? 0;
        if (m.seq !== expected) this.lost++;
        this.nextSeq.set(taskId, (m.seq as number) + 1);
        if (this.measuring) this.deltas++;
        if (m.seq === 0) {
          const t = this.taskSentAt.get(taskId);
          if (t !== undefined && this.measuring) this.ttfts.push(now - t);
        }
        break;
      }
      case 'chat.done':
        this.nextSeq.delete(m.taskId as string);
        this.taskSentAt.delete(m.taskId as string);
        this.inFlight--;
        if (this.measuring) {
          this.chats++;
          this.tokens += m.usage?.completionTokens ?? 0;
        }
        this.sendChat();
        break;
      case 'chat.error':
      case 'error':
        this.errors[m.code as string] = (this.errors[m.code as string] ?? 0) + 1;
        if (m.type === 'chat.error' || (m.id ?? '').startsWith('c')) {
          this.inFlight--;
          setTimeout(() => this.sendChat(), 50);
        }
        break;
    }
  }

  stop(): void {
    this.stopping = true;
    clearInterval(this.pingTimer);
  }
}

// ---------- the schedule ----------

/** Picks clients in turn: the first one after the last picked that `fits`, or null when none does. */
export function roundRobin<T>(clients: readonly T[], fits: (c: T) => boolean): () => T | null {
  let next = 0;
  return () => {
    for (let k = 0; k < clients.length; k++) {
      const i = (next + k) % clients.length;
      const c = clients[i] as T;
      if (fits(c)) {
        next = (i + 1) % clients.length;
        return c;
      }
    }
    return null;
  };
}

/**
 * Open loop: every `tickMs`, issues the chats and lookups owed at the offered rates since the previous tick
 * (the schedule does not wait for replies). Returns stop().
 */
export function openLoop(rates: { chatsPerSecond: number; lookupsPerSecond: number }, issue: { chat(): void; lookup(): void }, tickMs = 10): () => void {
  let chatDebt = 0;
  let lookupDebt = 0;
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    const dt = (now - last) / 1000;
    last = now;
    chatDebt += rates.chatsPerSecond * dt;
    lookupDebt += rates.lookupsPerSecond * dt;
    for (; chatDebt >= 1; chatDebt--) issue.chat();
    for (; lookupDebt >= 1; lookupDebt--) issue.lookup();
  }, tickMs);
  return () => clearInterval(timer);
}

// ---------- server metrics ----------

export interface ServerSample {
  /** performance.now() of the scrape. */
  at: number;
  rssBytes: number;
  heapUsedBytes: number;
  /** V8 heap committed (used plus free space V8 keeps), and memory of Buffers and other external objects: main thread only. */
  heapTotalBytes: number;
  externalBytes: number;
  /** Event-loop delay since the previous scrape (prom-client resets its histogram on every collect). */
  eldP99Ms: number;
  eldMaxMs: number;
  connections: number;
  slowClientsClosed: number;
  workerFailures: number;
  /** From /proc/<pid>/status when the server's pid is known (Linux): anonymous memory (JS heaps, malloc: SQLite's page cache, socket buffers) and file-backed pages (LMDB's map, code). */
  rssAnonBytes?: number;
  rssFileBytes?: number;
}

function procStatus(pid: number): { rssAnonBytes: number; rssFileBytes: number } | undefined {
  try {
    const text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? NaN) * 1024;
    return { rssAnonBytes: kb('RssAnon'), rssFileBytes: kb('RssFile') + kb('RssShmem') };
  } catch {
    return undefined;
  }
}

/** The sum of a metric's samples over every label set, or of the one sample `name{labels}` when the labels are given. */
function metricValue(text: string, name: string): number {
  let sum = 0;
  let found = false;
  const exact = name.endsWith('}');
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `) || (!exact && line.startsWith(`${name}{`))) {
      sum += Number(line.slice(line.lastIndexOf(' ') + 1));
      found = true;
    }
  }
  return found ? sum : NaN;
}

export async function scrapeServer(port: number, pid?: number): Promise<ServerSample> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  return {
    ...(pid === undefined ? {} : procStatus(pid)),
    at: performance.now(),
    rssBytes: metricValue(text, 'process_resident_memory_bytes'),
    heapUsedBytes: metricValue(text, 'nodejs_heap_size_used_bytes'),
    heapTotalBytes: metricValue(text, 'nodejs_heap_size_total_bytes'),
    externalBytes: metricValue(text, 'nodejs_external_memory_bytes'),
    eldP99Ms: metricValue(text, 'chatwire_event_loop_delay_seconds{quantile="0.99"}') * 1000,
    eldMaxMs: metricValue(text, 'chatwire_event_loop_delay_seconds{quantile="1"}') * 1000,
    connections: metricValue(text, 'chatwire_connections'),
    slowClientsClosed: metricValue(text, 'chatwire_slow_clients_closed_total'),
    workerFailures: metricValue(text, 'chatwire_worker_failures_total'),
  };
}

/** Scrapes /metrics every `everyMs` into `samples`, until stop(). */
export function sampleServer(
  port: number,
  everyMs: number,
  pid?: number,
): { samples: ServerSample[]; latest(): ServerSample | undefined; stop(): Promise<void> } {
  const samples: ServerSample[] = [];
  let stopped = false;
  let inFlight: Promise<void> = Promise.resolve();
  const tick = () => {
    inFlight = scrapeServer(port, pid).then(
      (s) => void samples.push(s),
      () => {},
    );
  };
  tick();
  const timer = setInterval(() => {
    if (!stopped) tick();
  }, everyMs);
  return {
    samples,
    latest: () => samples.at(-1),
    stop: async () => {
      stopped = true;
      clearInterval(timer);
      await inFlight;
    },
  };
}

// ---------- the process itself ----------

/** The soft and hard open-file limits of this process (Linux /proc), or null where unknown. */
export function openFileLimits(): { soft: number; hard: number } | null {
  try {
    const line = fs
      .readFileSync('/proc/self/limits', 'utf8')
      .split('\n')
      .find((l) => l.startsWith('Max open files'));
    const m = line && /Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/.exec(line);
    if (!m) return null;
    const n = (s: string) => (s === 'unlimited' ? Infinity : Number(s));
    return { soft: n(m[1] as string), hard: n(m[2] as string) };
  } catch {
    return null;
  }
}

export const MiB = 2 ** 20;
