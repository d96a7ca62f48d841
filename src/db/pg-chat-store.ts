import {
  beginRows,
  createUnrecordedEnds,
  encodeDeltaEnds,
  conversationOf,
  historyPage,
  IDEMPOTENCY_COLUMNS,
  IDEMPOTENCY_WINDOW_MS,
  IdempotencyKeyTaken,
  idempotentSendOf,
  newMessageId,
  noMessageBefore,
  storedTaskOf,
  TASK_ROW_COLUMNS,
  type BeginRows,
  type ChatStore,
  type ConversationDbRow,
  type FinishTask,
  type IdempotencyDbRow,
  type TaskRow,
  type Timings,
} from './chat-store.js';
import type { Pg, PgTx } from './pg.js';
import { AppError } from '../protocol/index.js';
import { createPgWriteBatcher } from './pg-write-batcher.js';

/**
 * The PostgreSQL ChatStore (cluster mode), over db/migrations-pg: the same
 * rows, the same group commit and the same answers as the SQLite one
 * (createChatStore); the contract tests in test/unit/chat-store.test.ts run
 * against both.
 */

/** Every statement, by the op name it is counted under (chatwire_db_queries_total). */
const SQL = {
  // The writes of a group commit, each statement for every write of the batch at once (see writeBatch).
  'chat.insert_conversations': `INSERT INTO conversations (conversation_id, user_id, created_at, updated_at, title, message_count)
  SELECT conversation_id, user_id, at, at, title, added FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::int[])
  AS u (conversation_id, user_id, at, title, added)`,
  // New messages: the activity time, the count, and the title while the conversation has none. One row per
  // conversation (an UPDATE applies one row of its FROM to a row), in conversation_id order: nodes touching the
  // same conversations lock them in the same order.
  'chat.touch_conversations': `UPDATE conversations c SET updated_at = u.at, message_count = c.message_count + u.added,
  title = CASE WHEN c.title = '' THEN u.title ELSE c.title END
  FROM unnest($1::text[], $2::bigint[], $3::int[], $4::text[]) AS u (conversation_id, at, added, title) WHERE c.conversation_id = u.conversation_id`,
  'chat.insert_conversation_if_missing': `INSERT INTO conversations (conversation_id, user_id, created_at, updated_at, title, message_count)
  VALUES ($1, $2, $3, $3, $4, $5)
  ON CONFLICT (conversation_id) DO UPDATE SET updated_at = EXCLUDED.updated_at,
  message_count = conversations.message_count + EXCLUDED.message_count,
  title = CASE WHEN conversations.title = '' THEN EXCLUDED.title ELSE conversations.title END RETURNING user_id`,
  'chat.conversations': `SELECT conversation_id, title, updated_at, message_count FROM conversations
  WHERE user_id = $1 AND (updated_at, conversation_id COLLATE "C") < ($2, $3)
  ORDER BY updated_at DESC, conversation_id COLLATE "C" DESC LIMIT $4`,
  // A key is claimed when it is new or its holder is older than the window ($10 ms before the claim).
  'chat.insert_idempotency_keys': `INSERT INTO idempotency_keys (user_id, client_key, request_hash, requested_conversation_id, task_id,
  conversation_id, message_id, ack, created_at)
  SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::bigint[])
  ON CONFLICT (user_id, client_key) DO UPDATE SET request_hash = EXCLUDED.request_hash,
  requested_conversation_id = EXCLUDED.requested_conversation_id, task_id = EXCLUDED.task_id,
  conversation_id = EXCLUDED.conversation_id, message_id = EXCLUDED.message_id, ack = EXCLUDED.ack, created_at = EXCLUDED.created_at
  WHERE idempotency_keys.created_at < EXCLUDED.created_at - $10 RETURNING task_id`,
  'chat.idempotency_key': `SELECT ${IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE user_id = $1 AND client_key = $2 AND created_at >= $3`,
  'chat.last_user_message': "SELECT seq, message_id, text FROM messages WHERE conversation_id = $1 AND role = 'user' ORDER BY seq DESC LIMIT 1",
  'chat.context_before': 'SELECT role, text FROM messages WHERE conversation_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3',
  // In the order given: seq follows it.
  'chat.insert_messages': `INSERT INTO messages (message_id, conversation_id, role, text, task_id, created_at)
  SELECT message_id, conversation_id, role, text, task_id, created_at
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[]) WITH ORDINALITY
  AS u (message_id, conversation_id, role, text, task_id, created_at, n) ORDER BY n`,
  'chat.insert_tasks': `INSERT INTO tasks (task_id, conversation_id, user_id, user_message_id, status, finish_reason, reply_message_id, prompt_tokens,
  completion_tokens, cached, created_at, finished_at, node_id)
  SELECT task_id, conversation_id, user_id, user_message_id, status, finish_reason, reply_message_id, prompt_tokens, completion_tokens, cached,
  created_at, finished_at, $13 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::int[],
  $9::int[], $10::boolean[], $11::bigint[], $12::bigint[]) AS u (task_id, conversation_id, user_id, user_message_id, status, finish_reason,
  reply_message_id, prompt_tokens, completion_tokens, cached, created_at, finished_at)`,
  'chat.finish_tasks': `UPDATE tasks t SET status = u.status, finish_reason = u.finish_reason, error_code = u.error_code,
  reply_message_id = u.reply_message_id, prompt_tokens = u.prompt_tokens, completion_tokens = u.completion_tokens, cached = u.cached,
  finished_at = u.finished_at, delta_lengths = u.delta_lengths, queue_ms = u.queue_ms, first_token_ms = u.first_token_ms, total_ms = u.total_ms,
  error_message = u.error_message, failed_text = u.failed_text
  FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int[], $7::int[], $8::boolean[], $9::bigint[], $10::bytea[],
  $11::float8[], $12::float8[], $13::float8[], $14::text[], $15::text[]) AS u (task_id, status, finish_reason, error_code, reply_message_id,
  prompt_tokens, completion_tokens, cached, finished_at, delta_lengths, queue_ms, first_token_ms, total_ms, error_message, failed_text)
  WHERE t.task_id = u.task_id`,
  'chat.record_replays': `UPDATE tasks t SET delta_lengths = u.delta_lengths, queue_ms = u.queue_ms, first_token_ms = u.first_token_ms,
  total_ms = u.total_ms FROM unnest($1::text[], $2::bytea[], $3::float8[], $4::float8[], $5::float8[])
  AS u (task_id, delta_lengths, queue_ms, first_token_ms, total_ms) WHERE t.task_id = u.task_id`,
  'chat.conversation_owner': 'SELECT user_id FROM conversations WHERE conversation_id = $1',
  'chat.context': 'SELECT role, text FROM messages WHERE conversation_id = $1 ORDER BY seq DESC LIMIT $2',
  'chat.message_seq': 'SELECT seq FROM messages WHERE message_id = $1 AND conversation_id = $2',
  'chat.history': 'SELECT message_id, role, text, created_at FROM messages WHERE conversation_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3',
  'chat.task': `SELECT ${TASK_ROW_COLUMNS} FROM tasks t LEFT JOIN messages m ON m.message_id = t.reply_message_id WHERE t.task_id = $1`,
  'chat.fail_tasks': `UPDATE tasks t SET status = 'error', error_code = 'internal', finished_at = u.at
  FROM unnest($1::text[], $2::bigint[]) AS u (task_id, at) WHERE t.task_id = u.task_id AND t.status IN ('queued', 'running')`,
  'chat.fail_unfinished': `UPDATE tasks SET status = 'error', error_code = $1, error_message = $2, finished_at = $3
  WHERE task_id = $4 AND status IN ('queued', 'running')`,
  'chat.recover_unfinished': `UPDATE tasks SET status = 'error', error_code = 'internal', finished_at = $1
  WHERE node_id = $2 AND status IN ('queued', 'running')`,
  'chat.prune_idempotency_keys': `DELETE FROM idempotency_keys WHERE (user_id, client_key) IN
  (SELECT user_id, client_key FROM idempotency_keys WHERE created_at < $1 ORDER BY created_at LIMIT $2)`,
  'chat.fail_stale': `UPDATE tasks SET status = 'error', error_code = $1, error_message = $2, finished_at = $3
  WHERE status IN ('queued', 'running') AND created_at < $4 RETURNING task_id`,
} as const;
type Op = keyof typeof SQL;

/** A write of a group commit, as the store was asked for it. */
type Write =
  | { kind: 'begin'; rows: BeginRows }
  | { kind: 'finish'; input: FinishTask; replyId: string | null; at: number }
  | { kind: 'replay'; taskId: string; deltaEnds: Uint32Array; timings: Timings };

/** Element types the `postgres` package would send an array as (it types an array by its first element): named, see Columns. */
const BOOLEAN = 16;
const BYTEA = 17;

/** The parameters of one set-based statement: a column (an array, sent as one parameter for unnest) per value of a row. */
class Columns {
  private readonly values: unknown[][];
  /** `types`: the element type of the columns of booleans or bytes, by column. */
  constructor(
    width: number,
    private readonly types: Record<number, number> = {},
  ) {
    this.values = Array.from({ length: width }, () => []);
  }
  static of(width: number, rows: Iterable<unknown[]>, types?: Record<number, number>): Columns {
    const c = new Columns(width, types);
    for (const row of rows) c.add(...row);
    return c;
  }
  add(...row: unknown[]): void {
    for (const [i, value] of row.entries()) (this.values[i] as unknown[]).push(value);
  }
  get size(): number {
    return (this.values[0] as unknown[]).length;
  }
  /** The statement's parameters, one array per column. */
  params(sql: Pg): unknown[] {
    return this.values.map((column, i) => {
      const type = this.types[i];
      return type === undefined ? column : sql.array(column as never[], type);
    });
  }
}

export interface PgChatStoreOptions {
  /** This node's id (its nodeId in hello), stored on every task it begins: see recoverUnfinished. */
  nodeId: string;
  /** After each group commit: how long it took and how many writes it held. */
  onCommit?: (seconds: number, size: number) => void;
  /** Called once per statement, with its op name (for `chatwire_db_queries_total`). */
  onQuery?: (op: string) => void;
}

/** The PostgreSQL store, with what only a store shared by several nodes needs. */
export interface PgChatStore extends ChatStore {
  /**
   * Ends as `code` (node_lost) every task still queued or running that began before `createdBefore`, whatever node
   * began it; returns their ids. A task cannot run past its model call's deadline, so one begun long enough ago
   * that is still unfinished here lost its end: its node died, and the node that saw its lease lapse could not
   * write that either (it died too, or PostgreSQL was unreachable then).
   */
  failStale(createdBefore: number, code: string, message: string): Promise<string[]>;
}

export function createPgChatStore(sql: Pg, options: PgChatStoreOptions): PgChatStore {
  const { nodeId } = options;
  const onQuery = options.onQuery ?? (() => {});
  const batcher = createPgWriteBatcher<Write>(sql, (tx, writes) => writeBatch(tx, writes), options.onCommit);
  const unrecorded = createUnrecordedEnds(async (ends) => {
    await run(sql, 'chat.fail_tasks', [[...ends.keys()], [...ends.values()]]);
  });

  /** A statement, prepared (named and cached per connection by the pool); sent when awaited, in the order awaited. */
  function run(db: Pg | PgTx, op: Op, params: unknown[]) {
    onQuery(op);
    return db.unsafe(SQL[op], params as never[], { prepare: true });
  }

  /** Writes a group commit's batch: a few statements for all its writes, pipelined on its transaction, in this order. */
  async function writeBatch(tx: Pg, writes: readonly Write[]): Promise<void> {
    const keys = new Columns(9);
    const named: BeginRows[] = [];
    const conversations = new Columns(5);
    const touches = new Map<string, { at: number; added: number; title: string }>();
    const messages = new Columns(6);
    const tasks = new Columns(12, { 9: BOOLEAN });
    // By task: a task written twice in one batch ends as its last write left it, as one statement per write did.
    const finishes = new Map<string, unknown[]>();
    const replays = new Map<string, unknown[]>();
    const touch = (conversationId: string, at: number, added: number, title: string) => {
      const t = touches.get(conversationId);
      if (t === undefined) touches.set(conversationId, { at, added, title });
      else {
        t.at = at;
        t.added += added;
        if (t.title === '') t.title = title;
      }
    };
    for (const w of writes) {
      if (w.kind === 'begin') {
        const { conversation: c, task: t, createdAt: now, idempotency: k } = w.rows;
        if (k !== undefined)
          keys.add(c.userId, k.key, k.requestHash, k.requestedConversationId, t.taskId, c.conversationId, w.rows.began.messageId, k.ack, now);
        if (c.isNew) conversations.add(c.conversationId, c.userId, now, c.title, w.rows.messages.length);
        else if (c.create) named.push(w.rows);
        else touch(c.conversationId, now, w.rows.messages.length, c.title);
        for (const m of w.rows.messages) messages.add(m.messageId, c.conversationId, m.role, m.text, t.taskId, now);
        tasks.add(
          t.taskId,
          c.conversationId,
          t.userId,
          t.userMessageId,
          t.status,
          t.finishReason,
          t.replyMessageId,
          t.promptTokens,
          t.completionTokens,
          t.cached,
          now,
          t.finishedAt,
        );
      } else if (w.kind === 'finish') {
        const { input, replyId, at } = w;
        if (replyId !== null) {
          messages.add(replyId, input.conversationId, 'assistant', input.text, input.taskId, at);
          touch(input.conversationId, at, 1, '');
        }
        finishes.set(input.taskId, [
          input.taskId,
          input.status,
          input.finishReason ?? null,
          input.errorCode ?? null,
          replyId,
          input.promptTokens,
          input.completionTokens,
          input.cached,
          at,
          input.deltaEnds === undefined ? null : encodeDeltaEnds(input.deltaEnds),
          input.timings?.queueMs ?? null,
          input.timings?.firstTokenMs ?? null,
          input.timings?.totalMs ?? null,
          input.errorMessage ?? null,
          replyId === null && input.text !== '' ? input.text : null,
        ]);
      } else {
        const { taskId, deltaEnds, timings } = w;
        replays.set(taskId, [taskId, encodeDeltaEnds(deltaEnds), timings.queueMs, timings.firstTokenMs, timings.totalMs]);
      }
    }
    const statements: Promise<unknown>[] = [];
    if (keys.size > 0) {
      // A key another send holds (this node's or another's, committed first) stops its send: the unique key decides.
      // Thrown here, the batch is retried one write per transaction, so only that send fails (and nothing of it is stored).
      const claiming = keys.size;
      statements.push(
        run(tx, 'chat.insert_idempotency_keys', [...keys.params(sql), IDEMPOTENCY_WINDOW_MS]).then((rows) => {
          if (rows.count < claiming) throw new IdempotencyKeyTaken();
        }),
      );
    }
    for (const { conversation: c, createdAt: now, messages: added } of named) {
      // A conversation the client named may have been made by another user since the caller checked.
      statements.push(
        run(tx, 'chat.insert_conversation_if_missing', [c.conversationId, c.userId, now, c.title, added.length]).then((rows) => {
          if ((rows[0] as { user_id: string } | undefined)?.user_id !== c.userId) throw new AppError('forbidden', 'this conversation belongs to another user');
        }),
      );
    }
    if (conversations.size > 0) statements.push(run(tx, 'chat.insert_conversations', conversations.params(sql)));
    if (touches.size > 0) {
      const ids = [...touches.keys()].sort();
      const rows = ids.map((id) => touches.get(id) as { at: number; added: number; title: string });
      statements.push(run(tx, 'chat.touch_conversations', [ids, rows.map((r) => r.at), rows.map((r) => r.added), rows.map((r) => r.title)]));
    }
    if (messages.size > 0) statements.push(run(tx, 'chat.insert_messages', messages.params(sql)));
    if (tasks.size > 0) statements.push(run(tx, 'chat.insert_tasks', [...tasks.params(sql), nodeId]));
    if (finishes.size > 0) statements.push(run(tx, 'chat.finish_tasks', Columns.of(15, finishes.values(), { 7: BOOLEAN, 9: BYTEA }).params(sql)));
    if (replays.size > 0) statements.push(run(tx, 'chat.record_replays', Columns.of(5, replays.values(), { 1: BYTEA }).params(sql)));
    // Every statement settles before the transaction ends (none is left in the pipeline of a rolled-back one).
    const settled = await Promise.allSettled(statements);
    const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  return {
    beginChat(input) {
      const rows = beginRows(input, Date.now());
      return batcher.enqueue({ kind: 'begin', rows }).then(() => rows.began);
    },

    finishTask(input) {
      const at = Date.now();
      const replyId = input.status === 'error' ? null : newMessageId();
      const written = batcher.enqueue({ kind: 'finish', input, replyId, at }).then(() => replyId);
      written.catch(() => unrecorded.remember(input.taskId, at));
      return written;
    },

    recordReplay(taskId, deltaEnds, timings) {
      return batcher.enqueue({ kind: 'replay', taskId, deltaEnds, timings });
    },

    async conversationOwner(conversationId) {
      const rows = await run(sql, 'chat.conversation_owner', [conversationId]);
      return (rows[0] as { user_id: string } | undefined)?.user_id;
    },

    async context(conversationId, limit) {
      const rows = (await run(sql, 'chat.context', [conversationId, limit])) as unknown as { role: 'user' | 'assistant'; text: string }[];
      return rows.reverse().map((r) => ({ role: r.role, content: r.text }));
    },

    async lastUserTurn(conversationId, limit) {
      const [last] = (await run(sql, 'chat.last_user_message', [conversationId])) as unknown as { seq: number; message_id: string; text: string }[];
      if (last === undefined) return undefined;
      const context =
        limit === 0
          ? []
          : ((await run(sql, 'chat.context_before', [conversationId, last.seq, limit])) as unknown as { role: 'user' | 'assistant'; text: string }[]);
      return { messageId: last.message_id, text: last.text, context: context.reverse().map((r) => ({ role: r.role, content: r.text })) };
    },

    async history(conversationId, before, limit) {
      let beforeSeq = Number.MAX_SAFE_INTEGER;
      if (before !== undefined) {
        const [row] = (await run(sql, 'chat.message_seq', [before, conversationId])) as unknown as { seq: number }[];
        if (!row) throw noMessageBefore(before);
        beforeSeq = row.seq;
      }
      const rows = await run(sql, 'chat.history', [conversationId, beforeSeq, limit + 1]);
      return historyPage(rows as unknown as Parameters<typeof historyPage>[0], limit);
    },

    async conversations(userId, after, limit) {
      const rows = (await run(sql, 'chat.conversations', [
        userId,
        after?.updatedAt ?? Number.MAX_SAFE_INTEGER,
        after?.conversationId ?? '',
        limit,
      ])) as unknown as ConversationDbRow[];
      return rows.map(conversationOf);
    },

    async idempotentSend(userId, key, since) {
      const [row] = (await run(sql, 'chat.idempotency_key', [userId, key, since])) as unknown as IdempotencyDbRow[];
      return row === undefined ? undefined : idempotentSendOf(row);
    },

    async task(taskId) {
      const [row] = (await run(sql, 'chat.task', [taskId])) as unknown as TaskRow[];
      return row ? storedTaskOf(row) : undefined;
    },

    /**
     * Marks failed the unfinished tasks of this store's nodeId only: in a cluster the other nodes' tasks are
     * running. A node restarted with the same id recovers its own here; the tasks of a node that died for good
     * are failed one by one with failUnfinished (node_lost) by whoever sees its lease lapse.
     */
    async recoverUnfinished() {
      return (await run(sql, 'chat.recover_unfinished', [Date.now(), nodeId])).count;
    },

    async failUnfinished(taskId, code, message) {
      return (await run(sql, 'chat.fail_unfinished', [code, message, Date.now(), taskId])).count > 0;
    },

    async pruneIdempotencyKeys(before, limit) {
      return (await run(sql, 'chat.prune_idempotency_keys', [before, limit])).count;
    },

    async failStale(createdBefore, code, message) {
      const rows = (await run(sql, 'chat.fail_stale', [code, message, Date.now(), createdBefore])) as unknown as { task_id: string }[];
      return rows.map((r) => r.task_id);
    },

    flush: () => batcher.flush(),
    get pendingWrites() {
      return batcher.pending;
    },
    get unrecordedEnds() {
      return unrecorded.size;
    },
    async close() {
      await batcher.drain();
      unrecorded.close();
    },
  };
}
