/**
 * Chat traffic that remembers what the server promised, and the check that the
 * promise held: every acknowledged user message and every reply announced by a
 * chat.done is in SQLite with its text, in order, after whatever happened to
 * the server (SIGKILL, SIGTERM, worker crashes, a full disk).
 * Used by the crash, shutdown and disk tests and by the soak and load scripts.
 */
import { io as ioClient, type Socket } from 'socket.io-client';
import WebSocket from 'ws';
import { type ChatStream, ChatwireError, type ChatwireErrorCode, connect, type WebSocketConstructor } from '../../src/client/client.js';
import { Database } from '../../src/db/database.js';

export interface AckedChat {
  taskId: string;
  conversationId: string;
  messageId: string;
  text: string;
}

export interface EndedChat {
  type: 'chat.done' | 'chat.error';
  messageId?: string | undefined;
  finishReason?: string | undefined;
  code?: string | undefined;
  cached?: boolean | undefined;
  /** The deltas received, joined (complete only when the stream was followed from seq 0 without a break). */
  text: string;
  complete: boolean;
}

/** What the server promised, as the clients saw it. */
export class Ledger {
  readonly acked = new Map<string, AckedChat>();
  readonly ended = new Map<string, EndedChat>();
  /** Per conversation, the acknowledged user message ids in the order of their acks. */
  readonly conversations = new Map<string, string[]>();
  /** Errors answering a chat.send (nothing acknowledged), by code. */
  readonly refused: Record<string, number> = {};
  /** A second chat.done/chat.error for one task. */
  duplicateEnds = 0;
  /** A delta whose seq was not the next one expected. */
  seqGaps = 0;

  ack(chat: AckedChat): void {
    this.acked.set(chat.taskId, chat);
    const list = this.conversations.get(chat.conversationId) ?? [];
    list.push(chat.messageId);
    this.conversations.set(chat.conversationId, list);
  }

  end(taskId: string, ended: EndedChat): void {
    if (this.ended.has(taskId)) {
      this.duplicateEnds++;
      return;
    }
    this.ended.set(taskId, ended);
  }

  refuse(code: string): void {
    this.refused[code] = (this.refused[code] ?? 0) + 1;
  }
}

export interface Verification {
  /** PRAGMA integrity_check: 'ok' or the first problems. */
  integrity: string;
  foreignKeyViolations: number;
  acked: number;
  /** Acknowledged user messages not stored, or stored with another text or conversation. */
  lostAcked: string[];
  /** Replies announced by chat.done (with a messageId) that are not stored with the streamed text. */
  replies: number;
  lostReplies: string[];
  conversations: number;
  /** Conversations whose stored messages are out of ack order, or whose replies do not follow their question. */
  corruptConversations: string[];
  /** Tasks still queued or running in the store (a previous process died with them; the next start fails them). */
  unfinishedTasks: number;
  messages: number;
}

/**
 * Checks the ledger against the SQLite file directly (opening it runs SQLite's
 * own WAL recovery, as a restart would). Call it with no server running on the file.
 */
/** A stored message of a conversation, in seq order, as the ledger checks read it. */
export interface StoredMessageRow {
  message_id: string;
  role: string;
  task_id: string | null;
}

/**
 * A conversation's stored messages against what was acknowledged in it: true when an acknowledged message is
 * missing or out of order, or a reply does not follow its own question, or a task has more than one reply.
 */
export function conversationCorrupt(ackedIds: readonly string[], rows: readonly StoredMessageRow[]): boolean {
  const position = new Map(rows.map((r, i) => [r.message_id, i]));
  const positions = ackedIds.map((id) => position.get(id) ?? -1);
  const inOrder = positions.every((p, i) => p >= 0 && (i === 0 || p > (positions[i - 1] as number)));
  const asked = new Set<string>();
  const answered = new Set<string>();
  for (const r of rows) {
    if (r.role === 'user' && r.task_id !== null) asked.add(r.task_id);
    if (r.role === 'assistant') {
      if (r.task_id === null || !asked.has(r.task_id) || answered.has(r.task_id)) return true;
      answered.add(r.task_id);
    }
  }
  return !inOrder;
}

export function verifyLedger(file: string, ledger: Ledger): Verification {
  const db = new Database(file);
  try {
    const raw = db.raw;
    const integrityRows = raw.pragma('integrity_check') as { integrity_check: string }[];
    const integrity = integrityRows
      .map((r) => r.integrity_check)
      .slice(0, 5)
      .join('; ');
    const foreignKeyViolations = (raw.pragma('foreign_key_check') as unknown[]).length;
    const byId = raw.prepare('SELECT conversation_id, role, text, task_id FROM messages WHERE message_id = ?');
    const lostAcked: string[] = [];
    for (const chat of ledger.acked.values()) {
      const row = byId.get(chat.messageId) as { conversation_id: string; role: string; text: string; task_id: string } | undefined;
      if (!row || row.conversation_id !== chat.conversationId || row.role !== 'user' || row.text !== chat.text || row.task_id !== chat.taskId)
        lostAcked.push(chat.taskId);
    }
    const lostReplies: string[] = [];
    let replies = 0;
    for (const [taskId, end] of ledger.ended) {
      if (end.type !== 'chat.done' || end.messageId === undefined) continue;
      replies++;
      const row = byId.get(end.messageId) as { role: string; text: string; task_id: string } | undefined;
      if (row?.role !== 'assistant' || row.task_id !== taskId || (end.complete && row.text !== end.text)) lostReplies.push(taskId);
    }
    const inConversation = raw.prepare('SELECT message_id, role, task_id FROM messages WHERE conversation_id = ? ORDER BY seq');
    const corruptConversations: string[] = [];
    for (const [conversationId, ackedIds] of ledger.conversations) {
      const rows = inConversation.all(conversationId) as StoredMessageRow[];
      if (conversationCorrupt(ackedIds, rows)) corruptConversations.push(conversationId);
    }
    const unfinishedTasks = (raw.prepare("SELECT count(*) AS n FROM tasks WHERE status IN ('queued', 'running')").get() as { n: number }).n;
    const messages = (raw.prepare('SELECT count(*) AS n FROM messages').get() as { n: number }).n;
    return {
      integrity,
      foreignKeyViolations,
      acked: ledger.acked.size,
      lostAcked,
      replies,
      lostReplies,
      conversations: ledger.conversations.size,
      corruptConversations,
      unfinishedTasks,
      messages,
    };
  } finally {
    db.close();
  }
}

type Frame = {
  type: string;
  id?: string;
  taskId?: string;
  conversationId?: string;
  messageId?: string;
  seq?: number;
  text?: string;
  code?: string;
  finishReason?: string;
  cached?: boolean;
};

export interface ChattersOptions {
  /** http://127.0.0.1:<port> */
  base: string;
  clients: number;
  /** Every n-th client uses socket.io instead of /ws (0: none). */
  socketIoEvery?: number;
  userPrefix: string;
  ledger: Ledger;
  /** Chats each client keeps in flight. */
  inFlight?: number;
  /** Share of chats that continue one of the client's conversations. */
  continueRate?: number;
  /** Share of chats asking one of a few repeated questions, cacheable (cache hits and single-flight joins). */
  repeatRate?: number;
  /** Share of chats cancelled right after their ack. */
  cancelRate?: number;
  /** Reply length range, in dev tokens. */
  maxTokens?: [number, number];
  /** Random source (seeded by the caller for reproducible traffic). */
  random?: () => number;
}

export interface Chatters {
  /** Stops sending new chats; chats in flight go on. */
  stopSending(): void;
  /** Resolves when every chat sent has been answered (ack then end, or an error), or every socket closed. */
  settled(): Promise<void>;
  /** Closes every socket. */
  close(): Promise<void>;
  /** Sockets closed by the server (or the network) rather than by close(). */
  readonly dropped: number;
  /** Chats sent and not yet answered with an error or a terminal. */
  readonly pending: number;
}

/**
 * The deltas and terminals of one connection as they came on the wire, before
 * any client logic: a delta whose seq is not the next one expected is a gap
 * (counted in the ledger, and the stream's text is no longer complete), a
 * second terminal for one task is a duplicate end. The /ws clients see the
 * frames through the client library's `message` event, because the library's
 * own stream hides seq and repairs a gap with a resume.
 */
export class WireStreams {
  private readonly streams = new Map<string, { next: number; text: string; complete: boolean }>();
  private readonly ends = new Map<string, EndedChat>();
  /** Tasks whose terminal has been seen on this connection. */
  private readonly terminated = new Set<string>();

  constructor(private readonly ledger: Ledger) {}

  frame(f: Frame): void {
    const taskId = f.taskId as string;
    if (f.type === 'chat.delta') {
      const s = this.streams.get(taskId) ?? { next: 0, text: '', complete: true };
      this.streams.set(taskId, s);
      if (f.seq !== s.next) {
        this.ledger.seqGaps++;
        s.complete = false;
      }
      s.next = (f.seq as number) + 1;
      s.text += f.text as string;
    } else if (f.type === 'chat.done' || f.type === 'chat.error') {
      if (this.terminated.has(taskId) || this.ledger.ended.has(taskId)) {
        this.ledger.duplicateEnds++;
        return;
      }
      this.terminated.add(taskId);
      const s = this.streams.get(taskId) ?? { next: 0, text: '', complete: true };
      this.streams.delete(taskId);
      const { messageId, finishReason, code, cached } = f;
      this.ends.set(taskId, { type: f.type, messageId, finishReason, code, cached, text: s.text, complete: s.complete });
    }
  }

  /** The task's terminal as it came (once), or undefined when none came. */
  takeEnd(taskId: string): EndedChat | undefined {
    const end = this.ends.get(taskId);
    this.ends.delete(taskId);
    return end;
  }

  clear(): void {
    this.streams.clear();
    this.ends.clear();
  }
}

/** What every client of one startChatters shares: the options, the counters, and the next chat to send. */
interface ChatterContext {
  options: ChattersOptions;
  ledger: Ledger;
  random: () => number;
  sending: boolean;
  closing: boolean;
  dropped: number;
  pending: number;
  changed(): void;
}

interface Chatter {
  /** Sends the client's first chats; each answered chat is followed by another. */
  start(): void;
  close(): void;
  closed: Promise<void>;
}

/** The next chat of a client: a repeated cacheable question, or a fresh one (sometimes in one of its conversations). */
function nextChat(ctx: ChatterContext, user: string, n: number, conversations: string[]): { text: string; fields: Record<string, unknown> } {
  const { random, options } = ctx;
  const [minTokens, maxTokens] = options.maxTokens ?? [8, 48];
  const repeat = random() < (options.repeatRate ?? 0.2);
  const text = repeat ? `a popular question number ${Math.floor(random() * 5)}` : `${user} asks question ${n} (${random().toString(36).slice(2, 8)})`;
  const fields: Record<string, unknown> = {};
  if (!repeat) {
    fields.cache = 'bypass';
    fields.params = { maxTokens: minTokens + Math.floor(random() * (maxTokens - minTokens + 1)) };
    if (conversations.length > 0 && random() < (options.continueRate ?? 0.5))
      fields.conversationId = conversations[Math.floor(random() * conversations.length)];
  }
  return { text, fields };
}

function remember(conversations: string[], conversationId: string): void {
  if (!conversations.includes(conversationId)) conversations.push(conversationId);
}

/** Errors the client library raises itself: the chat was not answered by the server (its outcome is unknown). */
const CLIENT_SIDE: ReadonlySet<ChatwireErrorCode> = new Set<ChatwireErrorCode>(['connection_lost', 'closed', 'aborted', 'timeout', 'bad_frame']);

/** A /ws client on chatwire's client library (no reconnect: a socket the server dropped stays dropped, as the ledger expects). */
async function wsChatter(ctx: ChatterContext, user: string): Promise<Chatter> {
  const client = connect(`${ctx.options.base.replace(/^http/, 'ws')}/ws`, {
    user,
    WebSocket: WebSocket as unknown as WebSocketConstructor,
    reconnect: false,
    heartbeatMs: 0,
  });
  const wire = new WireStreams(ctx.ledger);
  client.on('message', (f) => wire.frame(f as Frame));
  const closed = new Promise<void>((resolve) => client.on('state', (s) => s.state === 'closed' && resolve()));
  await client.ready();
  const conversations: string[] = [];
  let n = 0;
  /** One chat from send to its end; true when the server answered it (a refusal, or a terminal). */
  const chatOnce = async (text: string, fields: Record<string, unknown>): Promise<boolean> => {
    let stream: ChatStream;
    try {
      stream = await client.chat.send(text, fields);
    } catch (err) {
      if (!(err instanceof ChatwireError) || CLIENT_SIDE.has(err.code)) return false;
      ctx.ledger.refuse(err.code);
      return true;
    }
    ctx.ledger.ack({ taskId: stream.taskId, conversationId: stream.conversationId, messageId: stream.messageId, text });
    remember(conversations, stream.conversationId);
    if (ctx.random() < (ctx.options.cancelRate ?? 0.1)) void stream.cancel().catch(() => {});
    await stream.result.catch(() => {});
    // The end as it came on the wire (a closed socket fails the stream without one: unanswered).
    const end = wire.takeEnd(stream.taskId);
    if (end === undefined) return false;
    ctx.ledger.end(stream.taskId, end);
    return true;
  };
  const sendChat = (): void => {
    if (!ctx.sending || client.state === 'closed') return;
    const { text, fields } = nextChat(ctx, user, ++n, conversations);
    ctx.pending++;
    void chatOnce(text, fields).then((answered) => {
      ctx.pending--;
      ctx.changed();
      if (answered) sendChat();
    });
  };
  void closed.then(() => {
    if (!ctx.closing) ctx.dropped++;
    wire.clear();
    ctx.changed();
  });
  const start = () => {
    for (let k = 0; k < (ctx.options.inFlight ?? 2); k++) sendChat();
  };
  return { start, close: () => client.close(), closed };
}

/**
 * A socket.io client, on raw frames: chatwire's client library speaks only the /ws protocol (socket.io frames are
 * Engine.IO packets with acks), so socket.io traffic goes through socket.io-client itself.
 */
async function socketIoChatter(ctx: ChatterContext, user: string): Promise<Chatter> {
  const wire = new WireStreams(ctx.ledger);
  const sent = new Map<string, { text: string }>();
  // Acknowledged tasks whose chat.done / chat.error has not come yet.
  const running = new Set<string>();
  const conversations: string[] = [];
  let n = 0;
  let open = true;
  const socket: Socket = ioClient(ctx.options.base, { transports: ['websocket'], auth: { user }, reconnection: false, forceNew: true });
  const finishOne = () => {
    ctx.pending--;
    ctx.changed();
    sendChat();
  };
  const sendChat = (): void => {
    if (!ctx.sending || !open || !socket.connected) return;
    const id = `c${n++}`;
    const { text, fields } = nextChat(ctx, user, n, conversations);
    sent.set(id, { text });
    ctx.pending++;
    socket.emit('chat.send', { id, text, ...fields }, (reply: Frame) => onFrame(reply));
  };
  const onFrame = (f: Frame): void => {
    wire.frame(f);
    const taskId = f.taskId as string;
    if (f.type === 'chat.ack') {
      const s = sent.get(f.id as string);
      if (!s) return;
      sent.delete(f.id as string);
      ctx.ledger.ack({ taskId, conversationId: f.conversationId as string, messageId: f.messageId as string, text: s.text });
      running.add(taskId);
      remember(conversations, f.conversationId as string);
      if (ctx.random() < (ctx.options.cancelRate ?? 0.1) && socket.connected) socket.emit('chat.cancel', { taskId }, () => {});
      // The end may have come before the ack (socket.io acks and events race).
      const early = wire.takeEnd(taskId);
      if (early) {
        running.delete(taskId);
        ctx.ledger.end(taskId, early);
        finishOne();
      }
    } else if (f.type === 'chat.done' || f.type === 'chat.error') {
      // Before the ack, the wire keeps the end until the ack comes.
      if (!running.delete(taskId)) return;
      const end = wire.takeEnd(taskId);
      if (end) ctx.ledger.end(taskId, end);
      finishOne();
    } else if (f.type === 'error' && f.id !== undefined && sent.delete(f.id)) {
      ctx.ledger.refuse(f.code as string);
      finishOne();
    }
  };
  const closed = new Promise<void>((resolve) => socket.once('disconnect', () => resolve()));
  // Replies go through the ack callback, server-initiated frames arrive as events named by their type.
  socket.onAny((event: string, payload: Frame) => onFrame({ ...payload, type: event }));
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', () => resolve());
    socket.once('connect_error', reject);
  });
  void closed.then(() => {
    open = false;
    if (!ctx.closing) ctx.dropped++;
    // Whatever was unanswered on this socket stays unanswered: the server is gone or dropped us.
    ctx.pending -= sent.size + running.size;
    sent.clear();
    running.clear();
    wire.clear();
    ctx.changed();
  });
  const start = () => {
    for (let k = 0; k < (ctx.options.inFlight ?? 2); k++) sendChat();
  };
  return { start, close: () => socket.disconnect(), closed };
}

/** Opens `clients` connections that chat continuously and record every ack and end in the ledger. */
export async function startChatters(options: ChattersOptions): Promise<Chatters> {
  let wake: (() => void) | null = null;
  const ctx: ChatterContext = {
    options,
    ledger: options.ledger,
    random: options.random ?? Math.random,
    sending: true,
    closing: false,
    dropped: 0,
    pending: 0,
    changed: () => {
      const w = wake;
      wake = null;
      w?.();
    },
  };
  const every = options.socketIoEvery ?? 0;
  const clients = await Promise.all(
    Array.from({ length: options.clients }, (_, i) => {
      const user = `${options.userPrefix}-${i}`;
      return every > 0 && i % every === 0 ? socketIoChatter(ctx, user) : wsChatter(ctx, user);
    }),
  );
  for (const c of clients) c.start();

  return {
    stopSending() {
      ctx.sending = false;
    },
    async settled() {
      while (ctx.pending > 0) await new Promise<void>((resolve) => (wake = resolve));
    },
    async close() {
      ctx.closing = true;
      ctx.sending = false;
      for (const c of clients) c.close();
      await Promise.all(clients.map((c) => c.closed));
    },
    get dropped() {
      return ctx.dropped;
    },
    get pending() {
      return ctx.pending;
    },
  };
}
