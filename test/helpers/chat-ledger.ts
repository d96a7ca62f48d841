/**
 * Chat traffic that remembers what the server promised, and the check that the
 * promise held: every acknowledged user message and every reply announced by a
 * chat.done is in SQLite with its text, in order, after whatever happened to
 * the server (SIGKILL, SIGTERM, worker crashes, a full disk).
 * Used by the crash, shutdown and disk tests and by the soak and load scripts.
 */
import { io as ioClient, type Socket } from 'socket.io-client';
import WebSocket from 'ws';
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
      const rows = inConversation.all(conversationId) as { message_id: string; role: string; task_id: string | null }[];
      const position = new Map(rows.map((r, i) => [r.message_id, i]));
      const positions = ackedIds.map((id) => position.get(id) ?? -1);
      const inOrder = positions.every((p, i) => p >= 0 && (i === 0 || p > (positions[i - 1] as number)));
      // Every reply follows its own question, and a task has at most one reply.
      const asked = new Set<string>();
      const answered = new Set<string>();
      let repliesFollow = true;
      for (const r of rows) {
        if (r.role === 'user' && r.task_id !== null) asked.add(r.task_id);
        if (r.role === 'assistant') {
          if (r.task_id === null || !asked.has(r.task_id) || answered.has(r.task_id)) repliesFollow = false;
          if (r.task_id !== null) answered.add(r.task_id);
        }
      }
      if (!inOrder || !repliesFollow) corruptConversations.push(conversationId);
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

interface Transport {
  send(frame: Record<string, unknown>): void;
  close(): void;
  closed: Promise<void>;
}

function openWs(url: string, onFrame: (f: Frame) => void): Promise<Transport> {
  const socket = new WebSocket(url);
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  socket.on('message', (data) => onFrame(JSON.parse(data.toString()) as Frame));
  socket.on('error', () => {});
  return new Promise((resolve, reject) => {
    socket.once('open', () =>
      resolve({
        send: (f) => {
          if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(f));
        },
        close: () => socket.terminate(),
        closed,
      }),
    );
    socket.once('error', reject);
  });
}

function openSocketIo(base: string, user: string, onFrame: (f: Frame) => void): Promise<Transport> {
  const socket: Socket = ioClient(base, { transports: ['websocket'], auth: { user }, reconnection: false, forceNew: true });
  const closed = new Promise<void>((resolve) => socket.once('disconnect', () => resolve()));
  socket.onAny((event: string, payload: Frame) => onFrame({ ...payload, type: event }));
  return new Promise((resolve, reject) => {
    socket.once('connect', () =>
      resolve({
        send: (f) => {
          const { type, ...payload } = f;
          if (socket.connected) socket.emit(type as string, payload, (reply: Frame) => onFrame(reply));
        },
        close: () => socket.disconnect(),
        closed,
      }),
    );
    socket.once('connect_error', reject);
  });
}

/** Opens `clients` connections that chat continuously and record every ack and end in the ledger. */
export async function startChatters(options: ChattersOptions): Promise<Chatters> {
  const random = options.random ?? Math.random;
  const inFlight = options.inFlight ?? 2;
  const [minTokens, maxTokens] = options.maxTokens ?? [8, 48];
  const { ledger } = options;
  let sending = true;
  let closing = false;
  let dropped = 0;
  let pending = 0;
  let wake: (() => void) | null = null;
  const changed = () => {
    const w = wake;
    wake = null;
    w?.();
  };

  const clients = await Promise.all(
    Array.from({ length: options.clients }, async (_, i) => {
      const user = `${options.userPrefix}-${i}`;
      const conversations: string[] = [];
      const sent = new Map<string, { text: string }>();
      const streams = new Map<string, { next: number; text: string; complete: boolean }>();
      // Acknowledged tasks whose chat.done / chat.error has not come yet.
      const running = new Set<string>();
      let n = 0;
      let open = true;
      let transport: Transport | undefined;
      const finishOne = () => {
        pending--;
        changed();
        sendChat();
      };
      const sendChat = () => {
        if (!sending || !open || !transport) return;
        const id = `c${n++}`;
        const repeat = random() < (options.repeatRate ?? 0.2);
        const text = repeat ? `a popular question number ${Math.floor(random() * 5)}` : `${user} asks question ${n} (${random().toString(36).slice(2, 8)})`;
        const frame: Record<string, unknown> = { type: 'chat.send', id, text };
        if (!repeat) {
          frame.cache = 'bypass';
          frame.params = { maxTokens: minTokens + Math.floor(random() * (maxTokens - minTokens + 1)) };
          if (conversations.length > 0 && random() < (options.continueRate ?? 0.5))
            frame.conversationId = conversations[Math.floor(random() * conversations.length)];
        }
        sent.set(id, { text });
        pending++;
        transport.send(frame);
      };
      const onFrame = (f: Frame) => {
        switch (f.type) {
          case 'chat.ack': {
            const s = sent.get(f.id as string);
            if (!s) return;
            sent.delete(f.id as string);
            const taskId = f.taskId as string;
            ledger.ack({ taskId, conversationId: f.conversationId as string, messageId: f.messageId as string, text: s.text });
            running.add(taskId);
            if (!conversations.includes(f.conversationId as string)) conversations.push(f.conversationId as string);
            // Deltas may already have arrived (socket.io acks and events race); keep what came.
            if (!streams.has(taskId)) streams.set(taskId, { next: 0, text: '', complete: true });
            if (random() < (options.cancelRate ?? 0.1)) transport?.send({ type: 'chat.cancel', taskId });
            return;
          }
          case 'chat.delta': {
            const taskId = f.taskId as string;
            const s = streams.get(taskId) ?? { next: 0, text: '', complete: true };
            streams.set(taskId, s);
            if (f.seq !== s.next) {
              ledger.seqGaps++;
              s.complete = false;
            }
            s.next = (f.seq as number) + 1;
            s.text += f.text as string;
            return;
          }
          case 'chat.done':
          case 'chat.error': {
            const taskId = f.taskId as string;
            if (!running.delete(taskId)) {
              if (ledger.ended.has(taskId)) ledger.duplicateEnds++;
              return;
            }
            const s = streams.get(taskId) ?? { next: 0, text: '', complete: true };
            streams.delete(taskId);
            ledger.end(taskId, {
              type: f.type,
              messageId: f.messageId,
              finishReason: f.finishReason,
              code: f.code,
              cached: f.cached,
              text: s.text,
              complete: s.complete,
            });
            finishOne();
            return;
          }
          case 'error': {
            if (f.id === undefined || !sent.has(f.id)) return;
            sent.delete(f.id);
            ledger.refuse(f.code as string);
            finishOne();
            return;
          }
        }
      };
      const socketIo = (options.socketIoEvery ?? 0) > 0 && i % (options.socketIoEvery as number) === 0;
      transport = socketIo
        ? await openSocketIo(options.base, user, onFrame)
        : await openWs(`${options.base.replace(/^http/, 'ws')}/ws?user=${encodeURIComponent(user)}`, onFrame);
      void transport.closed.then(() => {
        open = false;
        if (!closing) dropped++;
        // Whatever was unanswered on this socket stays unanswered: the server is gone or dropped us.
        pending -= sent.size + running.size;
        sent.clear();
        running.clear();
        streams.clear();
        changed();
      });
      return { start: () => Array.from({ length: inFlight }, sendChat), transport };
    }),
  );
  for (const c of clients) c.start();

  return {
    stopSending() {
      sending = false;
    },
    async settled() {
      while (pending > 0) await new Promise<void>((resolve) => (wake = resolve));
    },
    async close() {
      closing = true;
      sending = false;
      for (const c of clients) c.transport.close();
      await Promise.all(clients.map((c) => c.transport.closed));
    },
    get dropped() {
      return dropped;
    },
    get pending() {
      return pending;
    },
  };
}
