import { AppError, type ChatDone, type FinishReason, type HistoryMessage, type TaskStatus } from '../protocol/index.js';
import { timeOrderedId } from '../random-id.js';
import type { Database } from './database.js';
import { createWriteBatcher } from './write-batcher.js';

export interface BeginChat {
  taskId: string;
  userId: string;
  conversationId?: string | undefined;
  text: string;
  /** A reply known before the model runs (a cache hit): stored, and the task finished, in the same commit. */
  knownReply?: { text: string; finishReason: FinishReason; promptTokens: number; completionTokens: number } | undefined;
  /**
   * `conversationId` is named by the client (an AI SDK chat id): the conversation is created, owned by `userId`, when
   * it does not exist. Checked again inside the commit: when another user's exists by then, AppError forbidden and
   * nothing is stored.
   */
  createConversation?: boolean | undefined;
  /**
   * Regenerate: the stored user message of the conversation that this task answers again. No user message is stored
   * (`text` is not stored); the reply is stored after the conversation's last message, like any reply.
   */
  replyTo?: string | undefined;
  /**
   * The send's clientMessageId / Idempotency-Key, stored in the same commit (see IdempotentSend). When the user has a
   * send with this key from the last IDEMPOTENCY_WINDOW_MS already, IdempotencyKeyTaken is thrown and nothing is stored.
   */
  idempotency?: IdempotencyRecord | undefined;
}

/** How long a clientMessageId / Idempotency-Key names its first send. */
export const IDEMPOTENCY_WINDOW_MS = 24 * 60 * 60 * 1000;

/** What a send with a key stores about itself besides its message: how a repeat is told apart and answered. */
export interface IdempotencyRecord {
  key: string;
  /** A hash of what the send asked for (its text, whether it regenerated). */
  requestHash: string;
  /** The conversation the send named; null: a new one. */
  requestedConversationId: string | null;
  /** The rest of the ack the first send got, as JSON (the store keeps it as it is). */
  ack: string;
}

/** A user's stored send with a key: the record and the ids its commit gave it. */
export interface IdempotentSend {
  requestHash: string;
  requestedConversationId: string | null;
  taskId: string;
  conversationId: string;
  messageId: string;
  ack: string;
  createdAt: number;
}

/** The key of a BeginChat's idempotency record is held by another send of the user (from the last 24 hours). */
export class IdempotencyKeyTaken extends AppError {
  constructor() {
    // An AppError: a refusal of one write, so a group commit holding it is retried without it (see the write batchers).
    super('idempotency_conflict', 'this idempotency key names another send');
    this.name = 'IdempotencyKeyTaken';
  }
}

/** One conversation of a list page, as stored: lastMessageAt is updated_at. */
export interface ConversationRow {
  conversationId: string;
  title: string;
  updatedAt: number;
  messageCount: number;
}

/** A keyset position in a user's conversations: the page goes on from the ones before (updatedAt, conversationId). */
export interface ConversationPosition {
  updatedAt: number;
  conversationId: string;
}

/** A conversation's title: its first user message, cut to at most 80 characters (code points, as SQL's substr counts). */
export function conversationTitle(text: string): string {
  if (text.length <= 80) return text;
  let end = 0;
  for (let n = 0; n < 80 && end < text.length; n++) {
    const code = text.codePointAt(end) as number;
    end += code > 0xffff ? 2 : 1;
  }
  return text.slice(0, end);
}

export interface BeganChat {
  conversationId: string;
  messageId: string;
  createdAt: number;
  /** The stored assistant message of a knownReply. */
  replyMessageId?: string;
}

export interface FinishTask {
  taskId: string;
  conversationId: string;
  status: Extract<TaskStatus, 'done' | 'cancelled' | 'error'>;
  /** The assistant's text; stored as a message unless the task failed. */
  text: string;
  finishReason?: FinishReason | undefined;
  errorCode?: string | undefined;
  promptTokens: number;
  completionTokens: number;
  cached: boolean;
  /** Where each delta ended in `text` (see Task.deltaEnds): kept so a resume from storage has the live chunk boundaries. */
  deltaEnds?: Uint32Array | undefined;
  timings?: Timings | undefined;
  /** The chat.error message of a failed task. */
  errorMessage?: string | undefined;
}

export type Timings = ChatDone['timings'];

/** What a resume needs to replay a finished task as it streamed: its chunk boundaries and its terminal message. */
export interface StoredReplay {
  deltaEnds: Uint32Array;
  finishedAt: number;
  replyMessageId: string | null;
  finishReason: FinishReason | null;
  errorCode: string | null;
  errorMessage: string | null;
  promptTokens: number;
  completionTokens: number;
  cached: boolean;
  timings: Timings;
}

export interface StoredTask {
  taskId: string;
  conversationId: string;
  userId: string;
  status: TaskStatus;
  /** The reply's text (a failed task: what it streamed before it failed). */
  text: string;
  createdAt: number;
  /** Present when the task's end and chunk boundaries were recorded. */
  replay?: StoredReplay;
}

export interface ContextMessage {
  role: 'user' | 'assistant';
  content: string;
}

/** A conversation's last user message and the `limit` messages before it, oldest first: a regenerated reply's context. */
export interface LastUserTurn {
  messageId: string;
  text: string;
  context: ContextMessage[];
}

/**
 * Where conversations, messages and tasks are stored: SQLite (createChatStore, embedded) or PostgreSQL
 * (createPgChatStore, cluster mode). Writes go in group commits and resolve once committed; reads answer
 * asynchronously, as a server across the network does. The contract tests (test/unit/chat-store.test.ts) run
 * against both.
 */
export interface ChatStore {
  /** Stores the user message (creating the conversation if needed) and the queued task, in the next group commit. */
  beginChat(input: BeginChat): Promise<BeganChat>;
  /** Stores the assistant message and the task's outcome; resolves with the assistant message id (null for a failed task). */
  finishTask(input: FinishTask): Promise<string | null>;
  /** Records the chunk boundaries and timings of a task stored finished by beginChat (a cache hit), once it has streamed. */
  recordReplay(taskId: string, deltaEnds: Uint32Array, timings: Timings): Promise<void>;
  /** The owner of a conversation, or undefined when it does not exist. */
  conversationOwner(conversationId: string): Promise<string | undefined>;
  /** The latest `limit` messages of the conversation, oldest first (the model's context). */
  context(conversationId: string, limit: number): Promise<ContextMessage[]>;
  /** The conversation's last user message with its context (see LastUserTurn); undefined when it has none. */
  lastUserTurn(conversationId: string, limit: number): Promise<LastUserTurn | undefined>;
  history(conversationId: string, before: string | undefined, limit: number): Promise<{ messages: HistoryMessage[]; hasMore: boolean }>;
  /**
   * The user's conversations after `after` (all when undefined), newest activity first (updated_at then
   * conversation_id, both descending), at most `limit`: one range of the conversations_by_user index.
   */
  conversations(userId: string, after: ConversationPosition | undefined, limit: number): Promise<ConversationRow[]>;
  /** The user's send with this key, if it was stored at or after `since` (ms since the epoch). */
  idempotentSend(userId: string, key: string, since: number): Promise<IdempotentSend | undefined>;
  /**
   * Deletes at most `limit` idempotency keys stored before `before` (ms since the epoch), oldest first; returns how
   * many. A key past its window answers nothing any more (idempotentSend ignores it, the next send takes it over).
   */
  pruneIdempotencyKeys(before: number, limit: number): Promise<number>;
  task(taskId: string): Promise<StoredTask | undefined>;
  /** Marks tasks a previous run left queued or running as failed; returns how many. */
  recoverUnfinished(): Promise<number>;
  /** Marks one task still queued or running as failed with `code` and `message` (its node is gone); true when it did. */
  failUnfinished(taskId: string, code: string, message: string): Promise<boolean>;
  /** Starts the pending group commit now. */
  flush(): void;
  /** Writes not committed yet. */
  readonly pendingWrites: number;
  /** Task ends that could not be written yet (storage failing) and are being retried. */
  readonly unrecordedEnds: number;
  /** Commits what is pending and stops retrying unwritten task ends (the next start's recoverUnfinished() marks those tasks failed). */
  close(): Promise<void>;
}

/** Unwritten task ends kept for retry at most; past it the oldest is left to the next start's recovery. */
const MAX_UNRECORDED_ENDS = 100_000;
const RECORD_RETRY_FIRST_MS = 1000;
const RECORD_RETRY_MAX_MS = 30_000;

// Ids are time-ordered (see timeOrderedId): every one of them is a key of a stored B-tree.
const newId = timeOrderedId;

/** The time, then 128 random bits: task ids are unguessable. */
export function newTaskId(): string {
  return newId('task_', 16);
}

export const newMessageId = (): string => newId('msg_', 12);

/**
 * The rows one beginChat writes, decided the same way for every store: a new kind of send (a conversation id the
 * client chose, a regenerated reply with no new user message) changes what this returns, and each store writes
 * whatever rows it is given.
 */
export interface BeginRows {
  /** `create`: the client named a conversation that may not exist yet (BeginChat.createConversation). */
  conversation: { conversationId: string; userId: string; isNew: boolean; create: boolean; title: string };
  /** In the order they are inserted (their seq order). */
  messages: { messageId: string; role: 'user' | 'assistant'; text: string }[];
  /** A knownReply's task is stored finished (status done, cached), never in the unfinished index. */
  task: {
    taskId: string;
    userId: string;
    userMessageId: string;
    status: 'queued' | 'done';
    finishReason: FinishReason | null;
    replyMessageId: string | null;
    promptTokens: number;
    completionTokens: number;
    cached: boolean;
    finishedAt: number | null;
  };
  createdAt: number;
  began: BeganChat;
  idempotency: IdempotencyRecord | undefined;
}

export function beginRows(input: BeginChat, now: number): BeginRows {
  const conversationId = input.conversationId ?? newId('conv_', 12);
  // A regenerated reply answers the stored user message again: no new one.
  const messageId = input.replyTo ?? newMessageId();
  const rows: BeginRows = {
    conversation: {
      conversationId,
      userId: input.userId,
      isNew: input.conversationId === undefined,
      create: input.createConversation === true,
      // Kept only while the conversation has none ('' when this send stores no user message).
      title: input.replyTo === undefined ? conversationTitle(input.text) : '',
    },
    messages: input.replyTo === undefined ? [{ messageId, role: 'user', text: input.text }] : [],
    task: {
      taskId: input.taskId,
      userId: input.userId,
      userMessageId: messageId,
      status: 'queued',
      finishReason: null,
      replyMessageId: null,
      promptTokens: 0,
      completionTokens: 0,
      cached: false,
      finishedAt: null,
    },
    createdAt: now,
    began: { conversationId, messageId, createdAt: now },
    idempotency: input.idempotency,
  };
  const reply = input.knownReply;
  if (reply) {
    const replyMessageId = newMessageId();
    rows.messages.push({ messageId: replyMessageId, role: 'assistant', text: reply.text });
    rows.task = {
      ...rows.task,
      status: 'done',
      finishReason: reply.finishReason,
      replyMessageId,
      promptTokens: reply.promptTokens,
      completionTokens: reply.completionTokens,
      cached: true,
      finishedAt: now,
    };
    rows.began.replyMessageId = replyMessageId;
  }
  return rows;
}

const iso = (ms: number) => new Date(ms).toISOString();

/** Delta lengths as unsigned LEB128 varints: a byte or two per delta, where the ends as uint32 would take four. */
export function encodeDeltaEnds(ends: Uint32Array): Buffer {
  const out = Buffer.allocUnsafe(ends.length * 5);
  let at = 0;
  let prev = 0;
  for (const end of ends) {
    let n = end - prev;
    prev = end;
    while (n >= 0x80) {
      out[at++] = (n & 0x7f) | 0x80;
      n >>>= 7;
    }
    out[at++] = n;
  }
  return out.subarray(0, at);
}

export function decodeDeltaEnds(bytes: Uint8Array): Uint32Array {
  let count = 0;
  for (const b of bytes) if (b < 0x80) count++;
  const ends = new Uint32Array(count);
  let i = 0;
  let end = 0;
  let n = 0;
  let shift = 0;
  for (const b of bytes) {
    n += (b & 0x7f) * 2 ** shift;
    shift += 7;
    if (b < 0x80) {
      end += n;
      ends[i++] = end;
      n = 0;
      shift = 0;
    }
  }
  return ends;
}

/** A task as both stores read it (chat.task below): one row, the reply's text joined in. */
export interface TaskRow {
  task_id: string;
  conversation_id: string;
  user_id: string;
  status: TaskStatus;
  created_at: number;
  text: string | null;
  finished_at: number | null;
  reply_message_id: string | null;
  finish_reason: FinishReason | null;
  error_code: string | null;
  error_message: string | null;
  prompt_tokens: number;
  completion_tokens: number;
  /** 0 or 1 in SQLite, a boolean in PostgreSQL. */
  cached: number | boolean;
  delta_lengths: Uint8Array | null;
  queue_ms: number | null;
  first_token_ms: number | null;
  total_ms: number | null;
}

/** The columns of a TaskRow, from tasks `t` and the reply message `m` (a failed task keeps its streamed text in failed_text). */
export const TASK_ROW_COLUMNS = `t.task_id, t.conversation_id, t.user_id, t.status, t.created_at, coalesce(m.text, t.failed_text) AS text,
       t.finished_at, t.reply_message_id, t.finish_reason, t.error_code, t.error_message, t.prompt_tokens,
       t.completion_tokens, t.cached, t.delta_lengths, t.queue_ms, t.first_token_ms, t.total_ms`;

function replayOf(row: TaskRow): StoredReplay | undefined {
  if (row.delta_lengths === null || row.finished_at === null || row.queue_ms === null || row.total_ms === null) return undefined;
  return {
    deltaEnds: decodeDeltaEnds(row.delta_lengths),
    finishedAt: row.finished_at,
    replyMessageId: row.reply_message_id,
    finishReason: row.finish_reason,
    errorCode: row.error_code,
    errorMessage: row.error_message,
    promptTokens: row.prompt_tokens,
    completionTokens: row.completion_tokens,
    cached: row.cached === 1 || row.cached === true,
    timings: { queueMs: row.queue_ms, firstTokenMs: row.first_token_ms, totalMs: row.total_ms },
  };
}

export function storedTaskOf(row: TaskRow): StoredTask {
  const task: StoredTask = {
    taskId: row.task_id,
    conversationId: row.conversation_id,
    userId: row.user_id,
    status: row.status,
    text: row.text ?? '',
    createdAt: row.created_at,
  };
  const replay = replayOf(row);
  if (replay !== undefined) task.replay = replay;
  return task;
}

/** A history page from the rows read newest first, one past `limit` (whether there is more). */
export function historyPage(
  rows: { message_id: string; role: 'user' | 'assistant'; text: string; created_at: number }[],
  limit: number,
): { messages: HistoryMessage[]; hasMore: boolean } {
  const page = rows.slice(0, limit).reverse();
  return {
    messages: page.map((r) => ({ messageId: r.message_id, role: r.role, text: r.text, createdAt: iso(r.created_at) })),
    hasMore: rows.length > limit,
  };
}

/** A conversations.list row as both stores read it. */
export interface ConversationDbRow {
  conversation_id: string;
  title: string;
  updated_at: number | string;
  message_count: number;
}

export function conversationOf(row: ConversationDbRow): ConversationRow {
  return { conversationId: row.conversation_id, title: row.title, updatedAt: Number(row.updated_at), messageCount: Number(row.message_count) };
}

/** An idempotency_keys row as both stores read it. */
export interface IdempotencyDbRow {
  request_hash: string;
  requested_conversation_id: string | null;
  task_id: string;
  conversation_id: string;
  message_id: string;
  ack: string;
  created_at: number | string;
}

export const IDEMPOTENCY_COLUMNS = 'request_hash, requested_conversation_id, task_id, conversation_id, message_id, ack, created_at';

export function idempotentSendOf(row: IdempotencyDbRow): IdempotentSend {
  return {
    requestHash: row.request_hash,
    requestedConversationId: row.requested_conversation_id,
    taskId: row.task_id,
    conversationId: row.conversation_id,
    messageId: row.message_id,
    ack: row.ack,
    createdAt: Number(row.created_at),
  };
}

export const noMessageBefore = (before: string) => new AppError('not_found', `no message ${before} in this conversation`);

/**
 * Task ends that could not be written (full, failing or unreachable storage): such a task would stay `queued` until
 * the next start. `failAll` marks them failed (what their clients were told) once storage takes writes again, retried
 * with backoff.
 */
export function createUnrecordedEnds(failAll: (ends: Map<string, number>) => Promise<void>) {
  const unrecorded = new Map<string, number>();
  let retryTimer: NodeJS.Timeout | undefined;
  let retryDelayMs = RECORD_RETRY_FIRST_MS;
  let closed = false;
  const retry = () => {
    retryTimer = undefined;
    if (closed || unrecorded.size === 0) return;
    const batch = new Map(unrecorded);
    failAll(batch).then(
      () => {
        for (const [taskId, at] of batch) if (unrecorded.get(taskId) === at) unrecorded.delete(taskId);
        retryDelayMs = RECORD_RETRY_FIRST_MS;
        if (unrecorded.size > 0) schedule();
      },
      () => {
        retryDelayMs = Math.min(RECORD_RETRY_MAX_MS, retryDelayMs * 2);
        schedule();
      },
    );
  };
  const schedule = () => {
    if (retryTimer !== undefined || closed) return;
    retryTimer = setTimeout(retry, retryDelayMs);
    retryTimer.unref();
  };
  return {
    remember(taskId: string, at: number): void {
      if (unrecorded.size >= MAX_UNRECORDED_ENDS) unrecorded.delete(unrecorded.keys().next().value as string);
      unrecorded.set(taskId, at);
      schedule();
    },
    get size(): number {
      return unrecorded.size;
    },
    close(): void {
      closed = true;
      clearTimeout(retryTimer);
    },
  };
}

export function createChatStore(db: Database, hooks: { onCommit?: (seconds: number, size: number) => void } = {}): ChatStore {
  const batcher = createWriteBatcher(db, hooks.onCommit);
  const unrecorded = createUnrecordedEnds(async (ends) => {
    db.transaction(() => {
      for (const [taskId, at] of ends) failTask.run(at, taskId);
    });
  });
  const insertConversation = db.prepare(
    'chat.insert_conversation',
    'INSERT INTO conversations (conversation_id, user_id, created_at, updated_at, title, message_count) VALUES (?, ?, ?, ?, ?, ?)',
  );
  const insertConversationIfMissing = db.prepare(
    'chat.insert_conversation_if_missing',
    `INSERT INTO conversations (conversation_id, user_id, created_at, updated_at, title, message_count) VALUES (?, ?, ?, ?, ?, ?)
       ON CONFLICT (conversation_id) DO NOTHING`,
  );
  // New messages: the activity time, the count, and the title while the conversation has none.
  const touchConversation = db.prepare(
    'chat.touch_conversation',
    "UPDATE conversations SET updated_at = ?, message_count = message_count + ?, title = CASE WHEN title = '' THEN ? ELSE title END WHERE conversation_id = ?",
  );
  const selectConversations = db.prepare<ConversationDbRow>(
    'chat.conversations',
    `SELECT conversation_id, title, updated_at, message_count FROM conversations
       WHERE user_id = ? AND (updated_at, conversation_id) < (?, ?) ORDER BY updated_at DESC, conversation_id DESC LIMIT ?`,
  );
  const insertIdempotencyKey = db.prepare(
    'chat.insert_idempotency_key',
    `INSERT INTO idempotency_keys (user_id, client_key, request_hash, requested_conversation_id, task_id, conversation_id, message_id, ack, created_at)
       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
       ON CONFLICT (user_id, client_key) DO UPDATE SET request_hash = excluded.request_hash,
         requested_conversation_id = excluded.requested_conversation_id, task_id = excluded.task_id,
         conversation_id = excluded.conversation_id, message_id = excluded.message_id, ack = excluded.ack, created_at = excluded.created_at
       WHERE idempotency_keys.created_at < ?`,
  );
  const selectIdempotencyKey = db.prepare<IdempotencyDbRow>(
    'chat.idempotency_key',
    `SELECT ${IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE user_id = ? AND client_key = ? AND created_at >= ?`,
  );
  const deleteOldIdempotencyKeys = db.prepare(
    'chat.prune_idempotency_keys',
    `DELETE FROM idempotency_keys WHERE (user_id, client_key) IN
       (SELECT user_id, client_key FROM idempotency_keys WHERE created_at < ? ORDER BY created_at LIMIT ?)`,
  );
  const selectOwner = db.prepare<{ user_id: string }>('chat.conversation_owner', 'SELECT user_id FROM conversations WHERE conversation_id = ?');
  const insertMessage = db.prepare(
    'chat.insert_message',
    'INSERT INTO messages (message_id, conversation_id, role, text, task_id, created_at) VALUES (?, ?, ?, ?, ?, ?)',
  );
  const insertTask = db.prepare(
    'chat.insert_task',
    `INSERT INTO tasks (task_id, conversation_id, user_id, user_message_id, status, finish_reason, reply_message_id, prompt_tokens,
       completion_tokens, cached, created_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
  );
  const updateTask = db.prepare(
    'chat.finish_task',
    `UPDATE tasks SET status = ?, finish_reason = ?, error_code = ?, reply_message_id = ?, prompt_tokens = ?,
       completion_tokens = ?, cached = ?, finished_at = ?, delta_lengths = ?, queue_ms = ?, first_token_ms = ?, total_ms = ?,
       error_message = ?, failed_text = ? WHERE task_id = ?`,
  );
  const updateReplay = db.prepare('chat.record_replay', 'UPDATE tasks SET delta_lengths = ?, queue_ms = ?, first_token_ms = ?, total_ms = ? WHERE task_id = ?');
  const selectContext = db.prepare<{ role: 'user' | 'assistant'; text: string }>(
    'chat.context',
    'SELECT role, text FROM messages WHERE conversation_id = ? ORDER BY seq DESC LIMIT ?',
  );
  const selectLastUserMessage = db.prepare<{ seq: number; message_id: string; text: string }>(
    'chat.last_user_message',
    "SELECT seq, message_id, text FROM messages WHERE conversation_id = ? AND role = 'user' ORDER BY seq DESC LIMIT 1",
  );
  const selectContextBefore = db.prepare<{ role: 'user' | 'assistant'; text: string }>(
    'chat.context_before',
    'SELECT role, text FROM messages WHERE conversation_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?',
  );
  const selectSeq = db.prepare<{ seq: number }>('chat.message_seq', 'SELECT seq FROM messages WHERE message_id = ? AND conversation_id = ?');
  const selectHistory = db.prepare<{ message_id: string; role: 'user' | 'assistant'; text: string; created_at: number }>(
    'chat.history',
    'SELECT message_id, role, text, created_at FROM messages WHERE conversation_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?',
  );
  const selectTask = db.prepare<TaskRow>(
    'chat.task',
    `SELECT ${TASK_ROW_COLUMNS} FROM tasks t LEFT JOIN messages m ON m.message_id = t.reply_message_id WHERE t.task_id = ?`,
  );
  const failTask = db.prepare(
    'chat.fail_task',
    "UPDATE tasks SET status = 'error', error_code = 'internal', finished_at = ? WHERE task_id = ? AND status IN ('queued', 'running')",
  );
  const failUnfinishedTask = db.prepare(
    'chat.fail_unfinished',
    "UPDATE tasks SET status = 'error', error_code = ?, error_message = ?, finished_at = ? WHERE task_id = ? AND status IN ('queued', 'running')",
  );
  const recoverUnfinished = db.prepare(
    'chat.recover_unfinished',
    "UPDATE tasks SET status = 'error', error_code = 'internal', finished_at = ? WHERE status IN ('queued', 'running')",
  );

  /** Writes the rows of one beginChat (see BeginRows), inside the group commit. */
  function writeBegin(rows: BeginRows): BeganChat {
    const { conversation: c, task: t, createdAt: now } = rows;
    const k = rows.idempotency;
    // First: a key another send holds stops this one before anything of it is written.
    if (
      k !== undefined &&
      insertIdempotencyKey.run(
        c.userId,
        k.key,
        k.requestHash,
        k.requestedConversationId,
        t.taskId,
        c.conversationId,
        rows.began.messageId,
        k.ack,
        now,
        now - IDEMPOTENCY_WINDOW_MS,
      ).changes === 0
    ) {
      throw new IdempotencyKeyTaken();
    }
    const added = rows.messages.length;
    if (c.isNew) insertConversation.run(c.conversationId, c.userId, now, now, c.title, added);
    else if (!c.create || insertConversationIfMissing.run(c.conversationId, c.userId, now, now, c.title, added).changes === 0) {
      // A conversation the client named may have been made by another user since the caller checked.
      if (c.create && selectOwner.get(c.conversationId)?.user_id !== c.userId) throw new AppError('forbidden', 'this conversation belongs to another user');
      touchConversation.run(now, added, c.title, c.conversationId);
    }
    for (const m of rows.messages) insertMessage.run(m.messageId, c.conversationId, m.role, m.text, t.taskId, now);
    insertTask.run(
      t.taskId,
      c.conversationId,
      t.userId,
      t.userMessageId,
      t.status,
      t.finishReason,
      t.replyMessageId,
      t.promptTokens,
      t.completionTokens,
      t.cached ? 1 : 0,
      now,
      t.finishedAt,
    );
    return rows.began;
  }

  return {
    beginChat(input) {
      const rows = beginRows(input, Date.now());
      return batcher.enqueue(() => writeBegin(rows));
    },

    finishTask(input) {
      const now = Date.now();
      const replyId = input.status === 'error' ? null : newMessageId();
      const written = batcher.enqueue(() => {
        if (replyId !== null) {
          insertMessage.run(replyId, input.conversationId, 'assistant', input.text, input.taskId, now);
          touchConversation.run(now, 1, '', input.conversationId);
        }
        const ends = input.deltaEnds;
        updateTask.run(
          input.status,
          input.finishReason ?? null,
          input.errorCode ?? null,
          replyId,
          input.promptTokens,
          input.completionTokens,
          input.cached ? 1 : 0,
          now,
          ends === undefined ? null : encodeDeltaEnds(ends),
          input.timings?.queueMs ?? null,
          input.timings?.firstTokenMs ?? null,
          input.timings?.totalMs ?? null,
          input.errorMessage ?? null,
          replyId === null && input.text !== '' ? input.text : null,
          input.taskId,
        );
        return replyId;
      });
      written.catch(() => unrecorded.remember(input.taskId, now));
      return written;
    },

    recordReplay(taskId, deltaEnds, timings) {
      return batcher.enqueue(() => {
        updateReplay.run(encodeDeltaEnds(deltaEnds), timings.queueMs, timings.firstTokenMs, timings.totalMs, taskId);
      });
    },

    async conversationOwner(conversationId) {
      return selectOwner.get(conversationId)?.user_id;
    },

    async context(conversationId, limit) {
      return selectContext
        .all(conversationId, limit)
        .reverse()
        .map((r) => ({ role: r.role, content: r.text }));
    },

    async lastUserTurn(conversationId, limit) {
      const last = selectLastUserMessage.get(conversationId);
      if (last === undefined) return undefined;
      const context = limit === 0 ? [] : selectContextBefore.all(conversationId, last.seq, limit);
      return { messageId: last.message_id, text: last.text, context: context.reverse().map((r) => ({ role: r.role, content: r.text })) };
    },

    async history(conversationId, before, limit) {
      let beforeSeq = Number.MAX_SAFE_INTEGER;
      if (before !== undefined) {
        const row = selectSeq.get(before, conversationId);
        if (!row) throw noMessageBefore(before);
        beforeSeq = row.seq;
      }
      return historyPage(selectHistory.all(conversationId, beforeSeq, limit + 1), limit);
    },

    async conversations(userId, after, limit) {
      const rows = selectConversations.all(userId, after?.updatedAt ?? Number.MAX_SAFE_INTEGER, after?.conversationId ?? '', limit);
      return rows.map(conversationOf);
    },

    async idempotentSend(userId, key, since) {
      const row = selectIdempotencyKey.get(userId, key, since);
      return row === undefined ? undefined : idempotentSendOf(row);
    },

    async pruneIdempotencyKeys(before, limit) {
      return deleteOldIdempotencyKeys.run(before, limit).changes;
    },

    async task(taskId) {
      const row = selectTask.get(taskId);
      return row ? storedTaskOf(row) : undefined;
    },

    async recoverUnfinished() {
      return recoverUnfinished.run(Date.now()).changes;
    },

    async failUnfinished(taskId, code, message) {
      return failUnfinishedTask.run(code, message, Date.now(), taskId).changes > 0;
    },

    flush: () => batcher.flush(),
    get pendingWrites() {
      return batcher.pending;
    },
    get unrecordedEnds() {
      return unrecorded.size;
    },
    async close() {
      batcher.flush();
      unrecorded.close();
    },
  };
}
