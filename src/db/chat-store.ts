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

export interface ChatStore {
  /** Stores the user message (creating the conversation if needed) and the queued task, in the next group commit. */
  beginChat(input: BeginChat): Promise<BeganChat>;
  /** Stores the assistant message and the task's outcome; resolves with the assistant message id (null for a failed task). */
  finishTask(input: FinishTask): Promise<string | null>;
  /** Records the chunk boundaries and timings of a task stored finished by beginChat (a cache hit), once it has streamed. */
  recordReplay(taskId: string, deltaEnds: Uint32Array, timings: Timings): Promise<void>;
  /** The owner of a conversation, or undefined when it does not exist. */
  conversationOwner(conversationId: string): string | undefined;
  /** The latest `limit` messages of the conversation, oldest first (the model's context). */
  context(conversationId: string, limit: number): ContextMessage[];
  /** The conversation's last user message with its context (see LastUserTurn); undefined when it has none. */
  lastUserTurn(conversationId: string, limit: number): LastUserTurn | undefined;
  history(conversationId: string, before: string | undefined, limit: number): { messages: HistoryMessage[]; hasMore: boolean };
  task(taskId: string): StoredTask | undefined;
  /** Marks tasks a previous process left queued or running as failed; returns how many. */
  recoverUnfinished(): number;
  flush(): void;
  readonly pendingWrites: number;
  /** Task ends that could not be written yet (storage failing) and are being retried. */
  readonly unrecordedEnds: number;
  /** Stops retrying unwritten task ends (the next start's recoverUnfinished() marks those tasks failed). */
  close(): void;
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

interface TaskRow {
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
  cached: number;
  delta_lengths: Buffer | null;
  queue_ms: number | null;
  first_token_ms: number | null;
  total_ms: number | null;
}

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
    cached: row.cached === 1,
    timings: { queueMs: row.queue_ms, firstTokenMs: row.first_token_ms, totalMs: row.total_ms },
  };
}

export function createChatStore(db: Database, hooks: { onCommit?: (seconds: number, size: number) => void } = {}): ChatStore {
  const batcher = createWriteBatcher(db, hooks.onCommit);
  // A task whose end could not be written (full or failing storage) would stay `queued` in SQLite until the next
  // start. It is marked failed (what its client was told) as soon as storage takes writes again.
  const unrecorded = new Map<string, number>();
  let retryTimer: NodeJS.Timeout | undefined;
  let retryDelayMs = RECORD_RETRY_FIRST_MS;
  let closed = false;
  const retryUnrecorded = () => {
    retryTimer = undefined;
    if (closed || unrecorded.size === 0) return;
    try {
      db.transaction(() => {
        for (const [taskId, at] of unrecorded) failTask.run(at, taskId);
      });
      unrecorded.clear();
      retryDelayMs = RECORD_RETRY_FIRST_MS;
    } catch {
      retryDelayMs = Math.min(RECORD_RETRY_MAX_MS, retryDelayMs * 2);
      scheduleRetry();
    }
  };
  const scheduleRetry = () => {
    if (retryTimer !== undefined || closed) return;
    retryTimer = setTimeout(retryUnrecorded, retryDelayMs);
    retryTimer.unref();
  };
  const rememberUnrecorded = (taskId: string, at: number) => {
    if (unrecorded.size >= MAX_UNRECORDED_ENDS) unrecorded.delete(unrecorded.keys().next().value as string);
    unrecorded.set(taskId, at);
    scheduleRetry();
  };
  const insertConversation = db.prepare(
    'chat.insert_conversation',
    'INSERT INTO conversations (conversation_id, user_id, created_at, updated_at) VALUES (?, ?, ?, ?)',
  );
  const insertConversationIfMissing = db.prepare(
    'chat.insert_conversation_if_missing',
    'INSERT INTO conversations (conversation_id, user_id, created_at, updated_at) VALUES (?, ?, ?, ?) ON CONFLICT (conversation_id) DO NOTHING',
  );
  const touchConversation = db.prepare('chat.touch_conversation', 'UPDATE conversations SET updated_at = ? WHERE conversation_id = ?');
  const selectOwner = db.prepare<{ user_id: string }>('chat.conversation_owner', 'SELECT user_id FROM conversations WHERE conversation_id = ?');
  const insertMessage = db.prepare(
    'chat.insert_message',
    'INSERT INTO messages (message_id, conversation_id, role, text, task_id, created_at) VALUES (?, ?, ?, ?, ?, ?)',
  );
  const insertTask = db.prepare(
    'chat.insert_task',
    "INSERT INTO tasks (task_id, conversation_id, user_id, user_message_id, status, created_at) VALUES (?, ?, ?, ?, 'queued', ?)",
  );
  // A cache hit's task is stored already finished: one row written once, never in the unfinished index.
  const insertAnsweredTask = db.prepare(
    'chat.insert_answered_task',
    `INSERT INTO tasks (task_id, conversation_id, user_id, user_message_id, status, finish_reason, reply_message_id, prompt_tokens,
       completion_tokens, cached, created_at, finished_at) VALUES (?, ?, ?, ?, 'done', ?, ?, ?, ?, 1, ?, ?)`,
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
    `SELECT t.task_id, t.conversation_id, t.user_id, t.status, t.created_at, coalesce(m.text, t.failed_text) AS text,
       t.finished_at, t.reply_message_id, t.finish_reason, t.error_code, t.error_message, t.prompt_tokens,
       t.completion_tokens, t.cached, t.delta_lengths, t.queue_ms, t.first_token_ms, t.total_ms
       FROM tasks t LEFT JOIN messages m ON m.message_id = t.reply_message_id WHERE t.task_id = ?`,
  );
  const failTask = db.prepare(
    'chat.fail_task',
    "UPDATE tasks SET status = 'error', error_code = 'internal', finished_at = ? WHERE task_id = ? AND status IN ('queued', 'running')",
  );
  const failUnfinished = db.prepare(
    'chat.recover_unfinished',
    "UPDATE tasks SET status = 'error', error_code = 'internal', finished_at = ? WHERE status IN ('queued', 'running')",
  );

  return {
    beginChat(input) {
      const now = Date.now();
      const messageId = input.replyTo ?? newId('msg_', 12);
      let conversationId = input.conversationId;
      let isNew = false;
      if (conversationId === undefined) {
        conversationId = newId('conv_', 12);
        isNew = true;
      }
      const convId = conversationId;
      const reply = input.knownReply;
      const replyId = reply ? newId('msg_', 12) : undefined;
      return batcher.enqueue(() => {
        if (isNew) insertConversation.run(convId, input.userId, now, now);
        else if (!input.createConversation || insertConversationIfMissing.run(convId, input.userId, now, now).changes === 0) {
          // A conversation the client named may have been made by another user since the caller checked.
          if (input.createConversation && selectOwner.get(convId)?.user_id !== input.userId) {
            throw new AppError('forbidden', 'this conversation belongs to another user');
          }
          touchConversation.run(now, convId);
        }
        if (input.replyTo === undefined) insertMessage.run(messageId, convId, 'user', input.text, input.taskId, now);
        if (reply && replyId) {
          insertAnsweredTask.run(
            input.taskId,
            convId,
            input.userId,
            messageId,
            reply.finishReason,
            replyId,
            reply.promptTokens,
            reply.completionTokens,
            now,
            now,
          );
          insertMessage.run(replyId, convId, 'assistant', reply.text, input.taskId, now);
          return { conversationId: convId, messageId, createdAt: now, replyMessageId: replyId };
        }
        insertTask.run(input.taskId, convId, input.userId, messageId, now);
        return { conversationId: convId, messageId, createdAt: now };
      });
    },

    finishTask(input) {
      const now = Date.now();
      const replyId = input.status === 'error' ? null : newId('msg_', 12);
      const written = batcher.enqueue(() => {
        if (replyId !== null) {
          insertMessage.run(replyId, input.conversationId, 'assistant', input.text, input.taskId, now);
          touchConversation.run(now, input.conversationId);
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
      written.catch(() => rememberUnrecorded(input.taskId, now));
      return written;
    },

    recordReplay(taskId, deltaEnds, timings) {
      return batcher.enqueue(() => {
        updateReplay.run(encodeDeltaEnds(deltaEnds), timings.queueMs, timings.firstTokenMs, timings.totalMs, taskId);
      });
    },

    conversationOwner(conversationId) {
      return selectOwner.get(conversationId)?.user_id;
    },

    context(conversationId, limit) {
      return selectContext
        .all(conversationId, limit)
        .reverse()
        .map((r) => ({ role: r.role, content: r.text }));
    },

    lastUserTurn(conversationId, limit) {
      const last = selectLastUserMessage.get(conversationId);
      if (last === undefined) return undefined;
      const context = limit === 0 ? [] : selectContextBefore.all(conversationId, last.seq, limit);
      return { messageId: last.message_id, text: last.text, context: context.reverse().map((r) => ({ role: r.role, content: r.text })) };
    },

    history(conversationId, before, limit) {
      let beforeSeq = Number.MAX_SAFE_INTEGER;
      if (before !== undefined) {
        const row = selectSeq.get(before, conversationId);
        if (!row) throw new AppError('not_found', `no message ${before} in this conversation`);
        beforeSeq = row.seq;
      }
      const rows = selectHistory.all(conversationId, beforeSeq, limit + 1);
      const hasMore = rows.length > limit;
      const page = rows.slice(0, limit).reverse();
      return {
        messages: page.map((r) => ({ messageId: r.message_id, role: r.role, text: r.text, createdAt: iso(r.created_at) })),
        hasMore,
      };
    },

    task(taskId) {
      const row = selectTask.get(taskId);
      if (!row) return undefined;
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
    },

    recoverUnfinished() {
      return failUnfinished.run(Date.now()).changes;
    },

    flush: () => batcher.flush(),
    get pendingWrites() {
      return batcher.pending;
    },
    get unrecordedEnds() {
      return unrecorded.size;
    },
    close() {
      closed = true;
      clearTimeout(retryTimer);
    },
  };
}
