/**
 * chatwire's client library: one dependency-free ES module for browsers
 * (served at /client.js, loaded without a bundler) and Node (pass the `ws`
 * package as `WebSocket`).
 *
 * Types come from the zod schemas in src/protocol through `import type`,
 * which tsc erases: the compiled module imports nothing at run time. Frames
 * are not validated against the schemas here (the server validates what it
 * receives and is the author of what it sends); the client checks only what
 * its own bookkeeping relies on (a frame is a JSON object with a `type`, a
 * delta has an integer `seq` and a string `text`) and reports anything else
 * as a `bad_frame` error event instead of throwing.
 */
import type {
  ChatAck,
  ChatDone,
  ChatSend,
  ClientMessage,
  ClientMessageType,
  ErrorCode,
  ErrorDetail,
  Hello,
  HistoryMessage,
  ServerMessage,
  TaskInfo,
} from '../protocol/index.js';

// ---------- errors ----------

/** Errors the client raises itself, next to the server's codes. */
export type ClientErrorCode = 'connection_lost' | 'closed' | 'aborted' | 'timeout' | 'bad_frame';
export type ChatwireErrorCode = ErrorCode | ClientErrorCode;

/**
 * Whether retrying the same call can succeed. The server's half must match
 * src/protocol/errors.ts (test/unit/client-errors.test.ts checks it); the
 * `satisfies` makes a new server code a compile error here until it is added.
 */
export const RETRYABLE = {
  bad_request: false,
  unauthorized: false,
  forbidden: false,
  not_found: false,
  payload_too_large: false,
  rate_limited: true,
  idempotency_conflict: false,
  overloaded: true,
  node_lost: true,
  upstream_error: true,
  upstream_timeout: true,
  worker_failed: true,
  internal: false,
  // A chat.send written to a socket that died before its ack: it may or may not have been stored.
  connection_lost: true,
  closed: false,
  aborted: false,
  timeout: true,
  bad_frame: false,
} as const satisfies Record<ChatwireErrorCode, boolean>;

export class ChatwireError extends Error {
  readonly code: ChatwireErrorCode;
  readonly retryable: boolean;
  /** For `rate_limited`: how long to wait before the same call can succeed. */
  readonly retryAfterMs: number | undefined;
  /** For `bad_request`: the failing paths. */
  readonly details: ErrorDetail[] | undefined;

  constructor(
    code: ChatwireErrorCode,
    message: string,
    options: { retryable?: boolean; retryAfterMs?: number | undefined; details?: ErrorDetail[] | undefined } = {},
  ) {
    super(message);
    this.name = 'ChatwireError';
    this.code = code;
    this.retryable = options.retryable ?? RETRYABLE[code];
    this.retryAfterMs = options.retryAfterMs;
    this.details = options.details;
  }
}

// ---------- a small typed emitter ----------

type Listener<T> = (value: T) => void;

// A listener that throws must not break the client's bookkeeping: report it
// the way the platform reports an uncaught error (window.onerror, or Node's
// uncaughtException) and carry on.
function report(err: unknown): void {
  const g = globalThis as { reportError?: (e: unknown) => void };
  if (typeof g.reportError === 'function') g.reportError(err);
  else
    setTimeout(() => {
      throw err;
    });
}

export class Emitter<E> {
  private readonly listeners = new Map<keyof E, Set<Listener<never>>>();

  /** Adds a listener; returns the function that removes it. */
  on<K extends keyof E>(event: K, listener: Listener<E[K]>): () => void {
    let set = this.listeners.get(event);
    if (!set) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener as Listener<never>);
    return () => set.delete(listener as Listener<never>);
  }

  protected emit<K extends keyof E>(event: K, value: E[K]): void {
    for (const listener of [...(this.listeners.get(event) ?? [])]) {
      try {
        (listener as Listener<E[K]>)(value);
      } catch (err) {
        report(err);
      }
    }
  }
}

// ---------- chat streams ----------

export type ChatResult = Omit<ChatDone, 'type' | 'taskId'> & { text: string };

export interface StreamEvents {
  /** One delta, in order, never repeated, whatever reconnects happened. */
  delta: { text: string; seq: number };
  done: ChatResult;
  error: ChatwireError;
}

/** What the client does with a stream's frames; handed out once, at construction. */
interface StreamControl {
  stream: ChatStream;
  /** The seq the stream expects next: the `fromSeq` of a resume. */
  nextSeq(): number;
  /** Whether frames are being replayed after a gap; terminals are ignored until the resume is answered. */
  resyncing: boolean;
  delta(seq: number, text: string): 'ok' | 'old' | 'gap';
  done(m: ChatDone): void;
  fail(err: ChatwireError): void;
}

/**
 * One chat.send after its ack: the deltas as an async iterator of strings
 * and as events, the final result as a promise, and cancel(). Every iterator
 * starts from the first delta, so it can be taken at any time.
 */
export class ChatStream extends Emitter<StreamEvents> implements AsyncIterable<string> {
  readonly taskId: string;
  readonly conversationId: string;
  /** The stored user message. */
  readonly messageId: string;
  readonly ack: ChatAck;
  readonly chunks: string[] = [];
  text = '';
  status: 'streaming' | 'done' | 'error' = 'streaming';
  error: ChatwireError | null = null;
  /** Resolves with the whole reply at chat.done; rejects with a ChatwireError at chat.error. */
  readonly result: Promise<ChatResult>;
  private waiters: (() => void)[] = [];

  constructor(ack: ChatAck, cancel: (taskId: string) => Promise<void>, adopt: (control: StreamControl) => void) {
    super();
    this.ack = ack;
    this.taskId = ack.taskId;
    this.conversationId = ack.conversationId;
    this.messageId = ack.messageId;
    this.cancel = () => (this.status === 'streaming' ? cancel(this.taskId) : Promise.resolve());
    let settle!: { resolve(r: ChatResult): void; reject(e: ChatwireError): void };
    this.result = new Promise<ChatResult>((resolve, reject) => {
      settle = { resolve, reject };
    });
    // Awaiting the result is optional: an unobserved failure must not be an unhandled rejection.
    this.result.catch(() => {});
    const wake = () => {
      const w = this.waiters;
      this.waiters = [];
      for (const f of w) f();
    };
    const control: StreamControl = {
      stream: this,
      resyncing: false,
      nextSeq: () => this.chunks.length,
      delta: (seq, text) => {
        if (this.status !== 'streaming' || seq < this.chunks.length) return 'old';
        if (seq > this.chunks.length) return 'gap';
        this.chunks.push(text);
        this.text += text;
        wake();
        this.emit('delta', { text, seq });
        return 'ok';
      },
      done: (m) => {
        if (this.status !== 'streaming') return;
        this.status = 'done';
        const { type: _type, taskId: _taskId, ...rest } = m;
        const result: ChatResult = { ...rest, text: this.text };
        settle.resolve(result);
        wake();
        this.emit('done', result);
      },
      fail: (err) => {
        if (this.status !== 'streaming') return;
        this.status = 'error';
        this.error = err;
        settle.reject(err);
        wake();
        this.emit('error', err);
      },
    };
    adopt(control);
  }

  /** Stops generation: the stream ends with finishReason `cancelled` and the text so far. */
  readonly cancel: () => Promise<void>;

  [Symbol.asyncIterator](): AsyncIterator<string> {
    let i = 0;
    return {
      next: async (): Promise<IteratorResult<string>> => {
        for (;;) {
          if (i < this.chunks.length) return { value: this.chunks[i++] as string, done: false };
          if (this.status === 'done') return { value: undefined, done: true };
          if (this.error) throw this.error;
          await new Promise<void>((resolve) => this.waiters.push(resolve));
        }
      },
      return: async (): Promise<IteratorResult<string>> => {
        i = Number.POSITIVE_INFINITY;
        return { value: undefined, done: true };
      },
    };
  }
}

// ---------- the client ----------

/** The parts of a WebSocket the client uses: the browser's and the `ws` package's both fit. */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (event: never) => void): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => object;

export type ConnectionState = 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface ClientEvents {
  /** Every change of connection state; `delayMs` is the wait before the next attempt while reconnecting. */
  state: { state: ConnectionState; attempt: number; delayMs?: number; code?: number; reason?: string };
  hello: Hello;
  /** After a reconnect: the unfinished streams that are being resumed. */
  resumed: ChatStream[];
  /** An error not tied to a call: a frame the client could not read, an error reply without an id. */
  error: ChatwireError;
  /**
   * A chat of this user was started on another connection (another tab, device, or over HTTP). `stream` follows its
   * reply from the start when it is in the conversation given to chat.follow(), else it is null.
   */
  started: { message: ReplyOf<'chat.started'>; stream: ChatStream | null };
  /** Every frame from the server, after the client's own handling. */
  message: ServerMessage;
}

export interface ConnectOptions {
  /** JWT (or a function giving a fresh one at each connect), sent as the subprotocol `bearer.<token>`. */
  token?: string | (() => string | Promise<string>);
  /** Open mode: the user id, sent as `?user=`. */
  user?: string;
  /** The WebSocket class; globalThis.WebSocket by default (Node 20: pass the `ws` package's). */
  WebSocket?: WebSocketConstructor;
  /** Backoff between attempts: a random wait in [d/2, d], d = initialDelayMs · 2^attempt up to maxDelayMs. false: do not reconnect. */
  reconnect?: false | { initialDelayMs?: number; maxDelayMs?: number };
  /** A socket silent this long gets a ping; silent twice as long, it is dropped and replaced. 0: off. Default 20000. */
  heartbeatMs?: number;
  /** How long a written request waits for its reply. Default 30000. */
  requestTimeoutMs?: number;
}

export interface RateLimitWait {
  error: ChatwireError;
  /** The wait before the next attempt, and when that is (Date.now() clock). */
  retryAfterMs: number;
  retryAt: number;
  attempt: number;
}

export type SendOptions = Omit<ChatSend, 'type' | 'id' | 'text'> & {
  /** On `rate_limited`, wait `retryAfterMs` and send again, for at most maxWaitMs in all (default 60000). */
  retryOnRateLimit?: boolean | { maxWaitMs?: number };
  /** Called before each such wait (for a countdown). */
  onRateLimited?: (wait: RateLimitWait) => void;
  /** Aborts a send that is waiting or queued, and cancels the task once it runs. */
  signal?: AbortSignal;
};

type ReplyOf<T extends ServerMessage['type']> = Extract<ServerMessage, { type: T }>;
/** The direct reply to each client message. */
export interface Replies {
  'chat.send': ReplyOf<'chat.ack'>;
  'chat.cancel': ReplyOf<'ok'>;
  'chat.resume': ReplyOf<'ok'>;
  'task.get': ReplyOf<'task'>;
  'conversation.history': ReplyOf<'conversation.history'>;
  'requests.list': ReplyOf<'requests.list'>;
  'consumer.requests': ReplyOf<'consumer.requests'>;
  'consumer.bookings': ReplyOf<'consumer.bookings'>;
  'conversations.list': ReplyOf<'conversations.list'>;
  ping: ReplyOf<'pong'>;
}
const REPLY_TYPE: { [K in ClientMessageType]: Replies[K]['type'] } = {
  'chat.send': 'chat.ack',
  'chat.cancel': 'ok',
  'chat.resume': 'ok',
  'task.get': 'task',
  'conversation.history': 'conversation.history',
  'requests.list': 'requests.list',
  'consumer.requests': 'consumer.requests',
  'consumer.bookings': 'consumer.bookings',
  'conversations.list': 'conversations.list',
  ping: 'pong',
};

/** Messages sent with `request()`: every read, plus cancel; chat.send has its own call. */
export type RequestMessage = Omit<Extract<ClientMessage, { type: Exclude<ClientMessageType, 'chat.send' | 'chat.resume'> }>, 'id'>;

export interface ChatwireClient {
  readonly state: ConnectionState;
  /** The `hello` of the current connection (null while not connected). */
  readonly hello: Hello | null;
  readonly chat: {
    /**
     * Resolves at the ack (the model has not run yet) with the reply's stream. Every send carries a clientMessageId
     * (options.clientMessageId, else a random one) and is sent again with it after a reconnect: the server answers a
     * repeat with the first ack, so a retry never stores or runs the chat twice.
     */
    send(text: string, options?: SendOptions): Promise<ChatStream>;
    /**
     * The conversation being shown (null: none): chats of this user started elsewhere in it are followed from their
     * first delta, as the `started` event's stream.
     */
    follow(conversationId: string | null): void;
  };
  /** Resolves with the next (or current) connection's hello; rejects once the client is closed. */
  ready(): Promise<Hello>;
  history(conversationId: string, options?: { before?: string; limit?: number }): Promise<{ messages: HistoryMessage[]; hasMore: boolean }>;
  task(taskId: string): Promise<TaskInfo>;
  /** Any read (or chat.cancel): sent when connected, re-sent after a reconnect, resolved with the typed reply. */
  request<M extends RequestMessage>(message: M): Promise<Replies[M['type']]>;
  on<K extends keyof ClientEvents>(event: K, listener: Listener<ClientEvents[K]>): () => void;
  /** Skips the backoff wait (e.g. when the browser comes back online). */
  reconnectNow(): void;
  close(): void;
}

interface Pending {
  message: Record<string, unknown> & { type: ClientMessageType };
  onReply(m: ServerMessage): void;
  onError(err: ChatwireError): void;
  /** Safe to send again after a reconnect if it was written and not answered. */
  idempotent: boolean;
  written: boolean;
  timer: ReturnType<typeof setTimeout> | undefined;
}

const OPEN = 1;
const SUBPROTOCOL = 'chatwire.v1';

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function errorFromFrame(m: Record<string, unknown>): ChatwireError {
  const code = (typeof m.code === 'string' && m.code in RETRYABLE ? m.code : 'internal') as ChatwireErrorCode;
  const options: { retryable?: boolean; retryAfterMs?: number; details?: ErrorDetail[] } = {};
  if (typeof m.retryable === 'boolean') options.retryable = m.retryable;
  if (typeof m.retryAfterMs === 'number') options.retryAfterMs = m.retryAfterMs;
  if (Array.isArray(m.details)) options.details = m.details as ErrorDetail[];
  return new ChatwireError(code, typeof m.message === 'string' ? m.message : code, options);
}

function socketUrl(url: string, user: string | undefined): string {
  const base = (globalThis as { location?: { href: string } }).location?.href;
  const u = new URL(url, base);
  if (u.protocol === 'http:' || u.protocol === 'https:') {
    u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
    if (u.pathname === '/') u.pathname = '/ws';
  }
  if (user !== undefined) u.searchParams.set('user', user);
  return u.toString();
}

/** 128 random bits, base64url: a clientMessageId no other send of the user will have. */
function newClientMessageId(): string {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  let binary = '';
  for (const b of bytes) binary += String.fromCharCode(b);
  return btoa(binary).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function abortError(): ChatwireError {
  return new ChatwireError('aborted', 'aborted by the caller');
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortError());
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortError());
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

class Client extends Emitter<ClientEvents> implements ChatwireClient {
  state: ConnectionState = 'connecting';
  hello: Hello | null = null;
  readonly chat = {
    send: (text: string, options?: SendOptions) => this.send(text, options),
    follow: (conversationId: string | null) => {
      this.followed = conversationId;
    },
  };
  private followed: string | null = null;
  private socket: WebSocketLike | null = null;
  private readonly Ctor: WebSocketConstructor;
  private readonly pending = new Map<string, Pending>();
  private readonly streams = new Map<string, StreamControl>();
  private readyWaiters: { resolve(h: Hello): void; reject(e: ChatwireError): void }[] = [];
  private nextId = 0;
  private attempt = 0;
  private everOpen = false;
  private closed = false;
  private lastFrameAt = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private heartbeat: ReturnType<typeof setInterval> | undefined;
  private readonly heartbeatMs: number;
  private readonly requestTimeoutMs: number;

  constructor(
    private readonly url: string,
    private readonly options: ConnectOptions,
  ) {
    super();
    const Ctor = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!Ctor) throw new TypeError('no WebSocket: pass options.WebSocket (in Node 20: the `ws` package)');
    this.Ctor = Ctor;
    this.heartbeatMs = options.heartbeatMs ?? 20_000;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 30_000;
    // After the caller has had the chance to add listeners: even the first attempt's events reach them.
    queueMicrotask(() => void this.open());
  }

  // ----- connection -----

  private setState(state: ConnectionState, extra: { delayMs?: number; code?: number; reason?: string } = {}): void {
    this.state = state;
    this.emit('state', { state, attempt: this.attempt, ...extra });
  }

  private async open(): Promise<void> {
    let token: string | undefined;
    try {
      token = typeof this.options.token === 'function' ? await this.options.token() : this.options.token;
    } catch (err) {
      this.emit('error', new ChatwireError('unauthorized', `getting a token failed: ${err instanceof Error ? err.message : String(err)}`));
      this.lost(undefined);
      return;
    }
    if (this.closed) return;
    const protocols = token === undefined ? [SUBPROTOCOL] : [SUBPROTOCOL, `bearer.${token}`];
    let socket: WebSocketLike;
    try {
      socket = new this.Ctor(socketUrl(this.url, this.options.user), protocols) as WebSocketLike;
    } catch (err) {
      // A malformed URL cannot get better by retrying.
      this.emit('error', new ChatwireError('bad_request', `cannot open ${this.url}: ${err instanceof Error ? err.message : String(err)}`));
      this.close();
      return;
    }
    this.socket = socket;
    socket.addEventListener('message', (event: { data: unknown }) => {
      if (this.socket === socket) this.onFrame(event.data);
    });
    socket.addEventListener('close', (event: { code: number; reason: string }) => {
      if (this.socket === socket) this.lost({ code: event.code, reason: event.reason });
    });
    // A failed connection also fires close, which does the work; the listener keeps `ws` from throwing.
    socket.addEventListener('error', () => {});
  }

  /** The socket is gone (or never came): settle what depended on it and plan the next attempt. */
  private lost(close: { code: number; reason: string } | undefined): void {
    this.socket = null;
    this.hello = null;
    clearInterval(this.heartbeat);
    this.heartbeat = undefined;
    for (const [id, p] of this.pending) {
      if (!p.written) continue;
      clearTimeout(p.timer);
      if (p.idempotent) {
        p.written = false;
      } else {
        this.pending.delete(id);
        p.onError(new ChatwireError('connection_lost', `the connection closed before the reply to ${p.message.type}`));
      }
    }
    for (const s of this.streams.values()) s.resyncing = false;
    if (this.closed) return;
    if (this.options.reconnect === false) {
      this.close(new ChatwireError('connection_lost', 'the connection closed and reconnect is off'));
      return;
    }
    this.attempt++;
    const initial = this.options.reconnect?.initialDelayMs ?? 250;
    const max = this.options.reconnect?.maxDelayMs ?? 10_000;
    const ceiling = Math.min(max, initial * 2 ** Math.min(this.attempt - 1, 30));
    const delayMs = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      void this.open();
    }, delayMs);
    this.setState(this.everOpen ? 'reconnecting' : 'connecting', { delayMs, ...(close ?? {}) });
  }

  reconnectNow(): void {
    // Only while waiting out a backoff: an attempt in progress is left alone.
    if (this.closed || this.reconnectTimer === undefined) return;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = undefined;
    void this.open();
  }

  /** Drops a socket that stopped answering; its close event (which may take long) is ignored. */
  private abandon(reason: string): void {
    const socket = this.socket;
    if (!socket) return;
    this.lost({ code: 4000, reason });
    try {
      socket.close(4000, reason);
    } catch {
      // Closing a socket that is still connecting throws in some implementations: it is dropped either way.
    }
  }

  private onHello(hello: Hello): void {
    const resumed = this.everOpen;
    this.hello = hello;
    this.attempt = 0;
    this.everOpen = true;
    this.setState('open');
    this.emit('hello', hello);
    for (const w of this.readyWaiters.splice(0)) w.resolve(hello);
    const streams = [...this.streams.values()];
    for (const s of streams) this.resume(s);
    if (resumed && streams.length > 0)
      this.emit(
        'resumed',
        streams.map((s) => s.stream),
      );
    for (const [id, p] of this.pending) if (!p.written) this.write(id, p);
    this.lastFrameAt = Date.now();
    if (this.heartbeatMs > 0) {
      this.heartbeat = setInterval(
        () => {
          const idle = Date.now() - this.lastFrameAt;
          if (idle >= 2 * this.heartbeatMs) this.abandon('no answer to ping');
          else if (idle >= this.heartbeatMs) this.enqueue({ type: 'ping' }, { idempotent: false, onReply: () => {}, onError: () => {} });
        },
        Math.max(50, this.heartbeatMs / 2),
      );
      (this.heartbeat as { unref?: () => void }).unref?.();
    }
  }

  private connected(): boolean {
    return this.hello !== null && this.socket !== null && this.socket.readyState === OPEN;
  }

  // ----- frames -----

  private badFrame(what: string): void {
    this.emit('error', new ChatwireError('bad_frame', `the server sent ${what}`));
  }

  private onFrame(data: unknown): void {
    this.lastFrameAt = Date.now();
    if (typeof data !== 'string') {
      this.badFrame('a binary frame');
      return;
    }
    let m: unknown;
    try {
      m = JSON.parse(data);
    } catch {
      this.badFrame('a frame that is not JSON');
      return;
    }
    if (!isObject(m) || typeof m.type !== 'string') {
      this.badFrame('a frame without a type');
      return;
    }
    const frame = m as ServerMessage & Record<string, unknown>;
    switch (frame.type) {
      case 'hello':
        // The client relies on limits.maxFrameBytes; a second hello on one socket is not the protocol either.
        if (this.hello !== null || typeof frame.userId !== 'string' || !isObject(frame.limits) || typeof frame.limits.maxFrameBytes !== 'number') {
          this.badFrame('a malformed or repeated hello');
          return;
        }
        this.onHello(frame);
        break;
      case 'chat.delta':
      case 'chat.done':
      case 'chat.error':
        this.onTaskFrame(frame);
        break;
      case 'chat.started':
        this.onStarted(frame);
        break;
      default: {
        const p = typeof frame.id === 'string' ? this.pending.get(frame.id) : undefined;
        if (p && typeof frame.id === 'string') {
          this.pending.delete(frame.id);
          clearTimeout(p.timer);
          if (frame.type === 'error') p.onError(errorFromFrame(frame));
          else if (frame.type !== REPLY_TYPE[p.message.type])
            p.onError(new ChatwireError('bad_frame', `expected ${REPLY_TYPE[p.message.type]} in reply to ${p.message.type}, got ${frame.type}`));
          else p.onReply(frame);
        } else if (frame.type === 'error' && frame.id === undefined) {
          // With an id it answers a call that already gave up (timed out); without one, nobody else will see it.
          this.emit('error', errorFromFrame(frame));
        }
      }
    }
    this.emit('message', frame);
  }

  private onTaskFrame(frame: Extract<ServerMessage, { type: 'chat.delta' | 'chat.done' | 'chat.error' }> & Record<string, unknown>): void {
    const s = this.streams.get(frame.taskId);
    if (!s) return; // a stream that already ended (or another client's, after a failed resume)
    if (frame.type === 'chat.delta') {
      if (!Number.isInteger(frame.seq) || typeof frame.text !== 'string') {
        this.badFrame(`a malformed chat.delta for ${frame.taskId}`);
        return;
      }
      if (s.delta(frame.seq, frame.text) === 'gap' && !s.resyncing) this.resume(s);
      return;
    }
    if (s.resyncing) return; // the replay after the gap ends with its own terminal
    this.streams.delete(frame.taskId);
    if (frame.type === 'chat.done') s.done(frame);
    else s.fail(errorFromFrame(frame));
  }

  /** A chat started elsewhere: followed from seq 0 when it is in the conversation shown. */
  private onStarted(frame: ReplyOf<'chat.started'>): void {
    if (typeof frame.taskId !== 'string' || typeof frame.conversationId !== 'string') {
      this.badFrame('a malformed chat.started');
      return;
    }
    let stream: ChatStream | null = null;
    if (frame.conversationId === this.followed && !this.streams.has(frame.taskId)) {
      const ack: ChatAck = {
        type: 'chat.ack',
        taskId: frame.taskId,
        conversationId: frame.conversationId,
        messageId: frame.messageId,
        status: 'queued',
        // Not this connection's send: nothing was taken from its bucket here.
        rateLimit: { limit: 0, remaining: 0, resetMs: 0 },
      };
      stream = this.adoptStream(ack);
    }
    this.emit('started', { message: frame, stream });
  }

  /** A stream for a task this connection is not subscribed to (a repeated send's, another connection's): chat.resume from seq 0. */
  private adoptStream(ack: ChatAck): ChatStream {
    let control: StreamControl | undefined;
    const stream = new ChatStream(
      ack,
      (taskId) => this.cancelTask(taskId),
      (c) => {
        control = c;
        this.streams.set(c.stream.taskId, c);
      },
    );
    if (control !== undefined && this.connected()) this.resume(control);
    return stream;
  }

  /** chat.resume from the first seq this stream has not seen. */
  private resume(s: StreamControl): void {
    s.resyncing = true;
    const { taskId } = s.stream;
    this.enqueue(
      { type: 'chat.resume', taskId, fromSeq: s.nextSeq() },
      {
        idempotent: false,
        onReply: () => {
          s.resyncing = false;
        },
        onError: (err) => {
          if (err.code === 'connection_lost' || err.code === 'closed') return; // the next hello resumes again
          if (err.retryable) {
            setTimeout(() => {
              if (this.streams.get(taskId) === s && this.connected()) this.resume(s);
            }, err.retryAfterMs ?? 1000);
            return;
          }
          this.streams.delete(taskId);
          s.fail(new ChatwireError(err.code, `the reply could not be resumed: ${err.message}`, { retryable: false }));
        },
      },
    );
  }

  // ----- requests -----

  private enqueue(message: Pending['message'], handlers: Pick<Pending, 'onReply' | 'onError' | 'idempotent'>): string {
    const id = `c${++this.nextId}`;
    const p: Pending = { message, ...handlers, written: false, timer: undefined };
    if (this.closed) {
      p.onError(new ChatwireError('closed', 'the client is closed'));
      return id;
    }
    this.pending.set(id, p);
    if (this.connected()) this.write(id, p);
    return id;
  }

  private write(id: string, p: Pending): void {
    const text = JSON.stringify({ ...p.message, id });
    const limit = this.hello?.limits.maxFrameBytes;
    if (limit !== undefined && new TextEncoder().encode(text).length > limit) {
      // The server would answer without an id and close the socket: refuse it here instead.
      this.pending.delete(id);
      p.onError(new ChatwireError('payload_too_large', `the message is over the ${limit}-byte frame limit`));
      return;
    }
    (this.socket as WebSocketLike).send(text);
    p.written = true;
    p.timer = setTimeout(() => {
      if (this.pending.get(id) !== p) return;
      this.pending.delete(id);
      p.onError(new ChatwireError('timeout', `no reply to ${p.message.type} within ${this.requestTimeoutMs} ms`));
    }, this.requestTimeoutMs);
  }

  private call<T extends ServerMessage>(message: Pending['message'], idempotent: boolean): Promise<T> {
    return new Promise((resolve, reject) => {
      this.enqueue(message, { idempotent, onReply: (m) => resolve(m as T), onError: reject });
    });
  }

  request<M extends RequestMessage>(message: M): Promise<Replies[M['type']]> {
    return this.call({ ...message }, true);
  }

  async history(conversationId: string, options: { before?: string; limit?: number } = {}): Promise<{ messages: HistoryMessage[]; hasMore: boolean }> {
    const reply = await this.request({ type: 'conversation.history', conversationId, ...options });
    return { messages: reply.messages, hasMore: reply.hasMore };
  }

  async task(taskId: string): Promise<TaskInfo> {
    return (await this.request({ type: 'task.get', taskId })).task;
  }

  ready(): Promise<Hello> {
    if (this.hello) return Promise.resolve(this.hello);
    if (this.closed) return Promise.reject(new ChatwireError('closed', 'the client is closed'));
    return new Promise((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
  }

  // ----- chat -----

  private sendOnce(message: Pending['message'], signal: AbortSignal | undefined): Promise<ChatStream> {
    return new Promise((resolve, reject) => {
      if (signal?.aborted) return reject(abortError());
      const onAbort = () => {
        // Still queued: take it back. Already written: the ack will come, and the task is cancelled then.
        const p = this.pending.get(id);
        if (p && !p.written) {
          this.pending.delete(id);
          reject(abortError());
        }
      };
      const id = this.enqueue(message, {
        // Written again after a reconnect with the same clientMessageId: a repeat is answered with the first ack.
        idempotent: true,
        // Synchronous on purpose: the task's deltas can follow the ack in the same turn of the event loop.
        onReply: (m) => {
          signal?.removeEventListener('abort', onAbort);
          const ack = m as ChatAck;
          // A repeat's connection is not subscribed to the task: it follows it from seq 0.
          const stream =
            ack.duplicate === true
              ? this.adoptStream(ack)
              : new ChatStream(
                  ack,
                  (taskId) => this.cancelTask(taskId),
                  (control) => this.streams.set(control.stream.taskId, control),
                );
          if (signal) {
            const cancel = () => void stream.cancel().catch(() => {});
            if (signal.aborted) cancel();
            else signal.addEventListener('abort', cancel, { once: true });
          }
          resolve(stream);
        },
        onError: (err) => {
          signal?.removeEventListener('abort', onAbort);
          reject(err);
        },
      });
      signal?.addEventListener('abort', onAbort, { once: true });
    });
  }

  private async cancelTask(taskId: string): Promise<void> {
    await this.request({ type: 'chat.cancel', taskId });
  }

  private async send(text: string, options: SendOptions = {}): Promise<ChatStream> {
    const { retryOnRateLimit, onRateLimited, signal, ...fields } = options;
    const message: Pending['message'] = { type: 'chat.send', text, clientMessageId: newClientMessageId() };
    for (const [k, v] of Object.entries(fields)) if (v !== undefined) message[k] = v;
    const maxWaitMs = typeof retryOnRateLimit === 'object' ? (retryOnRateLimit.maxWaitMs ?? 60_000) : 60_000;
    let waited = 0;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.sendOnce(message, signal);
      } catch (err) {
        if (!retryOnRateLimit || !(err instanceof ChatwireError) || err.code !== 'rate_limited') throw err;
        // The bucket holds a whole token again after retryAfterMs; a few ms more absorbs clock rounding.
        const wait = (err.retryAfterMs ?? 1000) + 25;
        if (waited + wait > maxWaitMs) throw err;
        onRateLimited?.({ error: err, retryAfterMs: wait, retryAt: Date.now() + wait, attempt });
        await sleep(wait, signal);
        waited += wait;
      }
    }
  }

  close(reason: ChatwireError = new ChatwireError('closed', 'the client is closed')): void {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    clearInterval(this.heartbeat);
    const socket = this.socket;
    this.socket = null;
    this.hello = null;
    try {
      socket?.close(1000, 'client closed');
    } catch {
      // Closing a socket that is still connecting can throw; it is dropped either way.
    }
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.onError(reason);
    }
    this.pending.clear();
    for (const s of this.streams.values()) s.fail(reason);
    this.streams.clear();
    for (const w of this.readyWaiters.splice(0)) w.reject(reason);
    this.setState('closed');
  }
}

/**
 * Connects to a chatwire server's /ws (an http(s):// origin works too) and
 * keeps the connection up: reconnects with jittered backoff and resumes every
 * unfinished reply from the last seq it saw.
 */
export function connect(url: string, options: ConnectOptions = {}): ChatwireClient {
  return new Client(url, options);
}
