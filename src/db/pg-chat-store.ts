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
  type BeganChat,
  type BeginRows,
  type ChatStore,
  type ConversationDbRow,
  type IdempotencyDbRow,
  type TaskRow,
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
  'chat.insert_conversation':
    'INSERT INTO conversations (conversation_id, user_id, created_at, updated_at, title, message_count) VALUES ($1, $2, $3, $3, $4, $5)',
  // New messages: the activity time, the count, and the title while the conversation has none.
  'chat.touch_conversation': `UPDATE conversations SET updated_at = $1, message_count = message_count + $2,
  title = CASE WHEN title = '' THEN $3 ELSE title END WHERE conversation_id = $4`,
  'chat.insert_conversation_if_missing': `INSERT INTO conversations (conversation_id, user_id, created_at, updated_at, title, message_count)
  VALUES ($1, $2, $3, $3, $4, $5)
  ON CONFLICT (conversation_id) DO UPDATE SET updated_at = EXCLUDED.updated_at,
  message_count = conversations.message_count + EXCLUDED.message_count,
  title = CASE WHEN conversations.title = '' THEN EXCLUDED.title ELSE conversations.title END RETURNING user_id`,
  'chat.conversations': `SELECT conversation_id, title, updated_at, message_count FROM conversations
  WHERE user_id = $1 AND (updated_at, conversation_id COLLATE "C") < ($2, $3)
  ORDER BY updated_at DESC, conversation_id COLLATE "C" DESC LIMIT $4`,
  'chat.insert_idempotency_key': `INSERT INTO idempotency_keys (user_id, client_key, request_hash, requested_conversation_id, task_id,
  conversation_id, message_id, ack, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
  ON CONFLICT (user_id, client_key) DO UPDATE SET request_hash = EXCLUDED.request_hash,
  requested_conversation_id = EXCLUDED.requested_conversation_id, task_id = EXCLUDED.task_id,
  conversation_id = EXCLUDED.conversation_id, message_id = EXCLUDED.message_id, ack = EXCLUDED.ack, created_at = EXCLUDED.created_at
  WHERE idempotency_keys.created_at < $10 RETURNING 1`,
  'chat.idempotency_key': `SELECT ${IDEMPOTENCY_COLUMNS} FROM idempotency_keys WHERE user_id = $1 AND client_key = $2 AND created_at >= $3`,
  'chat.last_user_message': "SELECT seq, message_id, text FROM messages WHERE conversation_id = $1 AND role = 'user' ORDER BY seq DESC LIMIT 1",
  'chat.context_before': 'SELECT role, text FROM messages WHERE conversation_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3',
  'chat.insert_message': 'INSERT INTO messages (message_id, conversation_id, role, text, task_id, created_at) VALUES ($1, $2, $3, $4, $5, $6)',
  'chat.insert_task': `INSERT INTO tasks (task_id, conversation_id, user_id, user_message_id, status, finish_reason, reply_message_id, prompt_tokens,
  completion_tokens, cached, created_at, finished_at, node_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)`,
  'chat.finish_task': `UPDATE tasks SET status = $1, finish_reason = $2, error_code = $3, reply_message_id = $4, prompt_tokens = $5,
  completion_tokens = $6, cached = $7, finished_at = $8, delta_lengths = $9, queue_ms = $10, first_token_ms = $11, total_ms = $12,
  error_message = $13, failed_text = $14 WHERE task_id = $15`,
  'chat.record_replay': 'UPDATE tasks SET delta_lengths = $1, queue_ms = $2, first_token_ms = $3, total_ms = $4 WHERE task_id = $5',
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
} as const;
type Op = keyof typeof SQL;

export interface PgChatStoreOptions {
  /** This node's id (its nodeId in hello), stored on every task it begins: see recoverUnfinished. */
  nodeId: string;
  /** After each group commit: how long it took and how many writes it held. */
  onCommit?: (seconds: number, size: number) => void;
  /** Called once per statement, with its op name (for `chatwire_db_queries_total`). */
  onQuery?: (op: string) => void;
}

export function createPgChatStore(sql: Pg, options: PgChatStoreOptions): ChatStore {
  const { nodeId } = options;
  const onQuery = options.onQuery ?? (() => {});
  const batcher = createPgWriteBatcher(sql, options.onCommit);
  const unrecorded = createUnrecordedEnds(async (ends) => {
    await run(sql, 'chat.fail_tasks', [[...ends.keys()], [...ends.values()]]);
  });

  /** A statement, prepared (named and cached per connection by the pool); sent when awaited, in the order awaited. */
  function run(db: Pg | PgTx, op: Op, params: unknown[]) {
    onQuery(op);
    return db.unsafe(SQL[op], params as never[], { prepare: true });
  }

  /** Writes the rows of one beginChat (see BeginRows), pipelined inside the group commit's transaction. */
  async function writeBegin(tx: PgTx, rows: BeginRows): Promise<BeganChat> {
    const { conversation: c, task: t, createdAt: now } = rows;
    const k = rows.idempotency;
    const added = rows.messages.length;
    // Thrown here, the batch is retried one write per transaction, so only this send fails (and nothing of it is stored).
    if (k !== undefined) {
      // A key another send holds (this node's or another's, committed first) stops this one: the unique key decides.
      const claimed = await run(tx, 'chat.insert_idempotency_key', [
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
      ]);
      if (claimed.count === 0) throw new IdempotencyKeyTaken();
    }
    if (c.create && !c.isNew) {
      // A conversation the client named may have been made by another user since the caller checked.
      const [owner] = (await run(tx, 'chat.insert_conversation_if_missing', [c.conversationId, c.userId, now, c.title, added])) as unknown as {
        user_id: string;
      }[];
      if (owner?.user_id !== c.userId) throw new AppError('forbidden', 'this conversation belongs to another user');
    }
    const writes = [
      c.isNew
        ? run(tx, 'chat.insert_conversation', [c.conversationId, c.userId, now, c.title, added])
        : c.create
          ? Promise.resolve()
          : run(tx, 'chat.touch_conversation', [now, added, c.title, c.conversationId]),
      ...rows.messages.map((m) => run(tx, 'chat.insert_message', [m.messageId, c.conversationId, m.role, m.text, t.taskId, now])),
      run(tx, 'chat.insert_task', [
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
        nodeId,
      ]),
    ];
    await Promise.all(writes);
    return rows.began;
  }

  return {
    beginChat(input) {
      const rows = beginRows(input, Date.now());
      return batcher.enqueue((tx) => writeBegin(tx, rows));
    },

    finishTask(input) {
      const now = Date.now();
      const replyId = input.status === 'error' ? null : newMessageId();
      const written = batcher.enqueue(async (tx) => {
        const writes = [];
        if (replyId !== null) {
          writes.push(run(tx, 'chat.insert_message', [replyId, input.conversationId, 'assistant', input.text, input.taskId, now]));
          writes.push(run(tx, 'chat.touch_conversation', [now, 1, '', input.conversationId]));
        }
        const ends = input.deltaEnds;
        writes.push(
          run(tx, 'chat.finish_task', [
            input.status,
            input.finishReason ?? null,
            input.errorCode ?? null,
            replyId,
            input.promptTokens,
            input.completionTokens,
            input.cached,
            now,
            ends === undefined ? null : encodeDeltaEnds(ends),
            input.timings?.queueMs ?? null,
            input.timings?.firstTokenMs ?? null,
            input.timings?.totalMs ?? null,
            input.errorMessage ?? null,
            replyId === null && input.text !== '' ? input.text : null,
            input.taskId,
          ]),
        );
        await Promise.all(writes);
        return replyId;
      });
      written.catch(() => unrecorded.remember(input.taskId, now));
      return written;
    },

    recordReplay(taskId, deltaEnds, timings) {
      return batcher.enqueue(async (tx) => {
        await run(tx, 'chat.record_replay', [encodeDeltaEnds(deltaEnds), timings.queueMs, timings.firstTokenMs, timings.totalMs, taskId]);
      });
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
