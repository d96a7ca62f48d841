/**
 * The ChatStore contract: every test runs against the SQLite store (embedded) and the PostgreSQL one (cluster
 * mode), each on a database of its own. What only one engine has to prove is at the end.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test as nodeTest } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  createChatStore,
  decodeDeltaEnds,
  encodeDeltaEnds,
  IDEMPOTENCY_WINDOW_MS,
  IdempotencyKeyTaken,
  newTaskId,
  type ChatStore,
} from '../../src/db/chat-store.js';
import { Database } from '../../src/db/database.js';
import { migrate } from '../../src/db/migrate.js';
import { openPostgres, type Pg } from '../../src/db/pg.js';
import { createPgChatStore } from '../../src/db/pg-chat-store.js';
import { migratePg } from '../../src/db/pg-migrate.js';
import { AppError } from '../../src/protocol/index.js';
import { createTestDatabase, databaseUrl, dropTestDatabase, pgTestOptions } from '../helpers/postgres.js';

type Engine = 'sqlite' | 'postgres';
const ENGINES: readonly Engine[] = ['sqlite', 'postgres'];

interface Closable {
  after(fn: () => void | Promise<void>): void;
}

interface StoreFixture {
  store: ChatStore;
  /** How many writes each group commit of `store` held, in order. */
  commits: number[];
  /** Another store on the same database: this node restarted (the same nodeId) or another node. */
  open(nodeId: string): ChatStore;
  /** Makes the database refuse every new message and every task update (a real failure of the engine's own); returns what undoes it. */
  refuseWrites(): Promise<() => Promise<void>>;
  /** Rows in a table, read past the store. */
  count(table: 'conversations' | 'messages' | 'tasks' | 'idempotency_keys'): Promise<number>;
  /** PostgreSQL: how many transactions wrote the messages stored now (rows of one transaction share its xmin). */
  messageTransactions?(): Promise<number>;
  pg?: Pg;
}

const NODE = 'node-a';

function openSqlite(t: Closable): StoreFixture {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-store-'));
  const db = new Database(path.join(dir, 'chat.sqlite'));
  migrate(db);
  const commits: number[] = [];
  const stores: ChatStore[] = [];
  const open = (hooks = {}) => {
    const store = createChatStore(db, hooks);
    stores.push(store);
    return store;
  };
  t.after(async () => {
    for (const store of stores) await store.close();
    db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return {
    store: open({ onCommit: (_: number, size: number) => commits.push(size) }),
    commits,
    open: () => open(),
    async refuseWrites() {
      db.raw.exec(`
        CREATE TEMP TRIGGER refuse_messages BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk trouble'); END;
        CREATE TEMP TRIGGER refuse_tasks BEFORE UPDATE ON tasks BEGIN SELECT RAISE(ABORT, 'disk trouble'); END;
      `);
      return async () => {
        db.raw.exec('DROP TRIGGER refuse_messages; DROP TRIGGER refuse_tasks;');
      };
    },
    count: async (table) => (db.raw.prepare(`SELECT count(*) AS n FROM ${table}`).get() as { n: number }).n,
  };
}

/** The migrated schema, made once per process; each test gets a copy of it. */
let pgTemplate: Promise<string> | null = null;

async function openPg(t: Closable): Promise<StoreFixture> {
  pgTemplate ??= (async () => {
    const name = await createTestDatabase();
    const sql = openPostgres(databaseUrl(name), { max: 1 });
    try {
      await migratePg(sql);
    } finally {
      await sql.end({ timeout: 5 });
    }
    return name;
  })();
  const name = await createTestDatabase(await pgTemplate);
  const pg = openPostgres(databaseUrl(name), { max: 4 });
  const commits: number[] = [];
  const stores: ChatStore[] = [];
  const open = (nodeId: string, onCommit?: (seconds: number, size: number) => void) => {
    const store = createPgChatStore(pg, onCommit === undefined ? { nodeId } : { nodeId, onCommit });
    stores.push(store);
    return store;
  };
  t.after(async () => {
    for (const store of stores) await store.close();
    await pg.end({ timeout: 5 });
    await dropTestDatabase(name);
  });
  return {
    store: open(NODE, (_, size) => commits.push(size)),
    commits,
    open: (nodeId) => open(nodeId),
    async refuseWrites() {
      await pg
        .unsafe(`
        CREATE FUNCTION refuse_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'disk trouble'; END $$;
        CREATE TRIGGER refuse_messages BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION refuse_write();
        CREATE TRIGGER refuse_tasks BEFORE UPDATE ON tasks FOR EACH ROW EXECUTE FUNCTION refuse_write();
      `)
        .simple();
      return async () => {
        await pg.unsafe('DROP TRIGGER refuse_messages ON messages; DROP TRIGGER refuse_tasks ON tasks; DROP FUNCTION refuse_write();').simple();
      };
    },
    count: async (table) => Number((await pg.unsafe(`SELECT count(*) AS n FROM ${table}`))[0]?.n),
    messageTransactions: async () => Number((await pg.unsafe('SELECT count(DISTINCT xmin::text) AS n FROM messages'))[0]?.n),
    pg,
  };
}

const openStore = (t: Closable, engine: Engine): Promise<StoreFixture> => (engine === 'sqlite' ? Promise.resolve(openSqlite(t)) : openPg(t));

const finishOf = (taskId: string, conversationId: string) => ({ taskId, conversationId, promptTokens: 1, completionTokens: 1, cached: false });

nodeTest('delta boundaries round-trip through their stored form, one byte a delta under 128 characters', () => {
  const lengths = [1, 5, 127, 128, 300, 16_383, 16_384, 4096, 70_000, 2 ** 31 - 1];
  const ends = new Uint32Array(lengths.length);
  lengths.reduce((at, n, i) => (ends[i] = at + n), 0);
  const bytes = encodeDeltaEnds(ends);
  assert.deepEqual(decodeDeltaEnds(bytes), ends);
  assert.equal(bytes.length, 1 + 1 + 1 + 2 + 2 + 2 + 3 + 2 + 3 + 5);
  assert.deepEqual(decodeDeltaEnds(encodeDeltaEnds(new Uint32Array(0))), new Uint32Array(0));
});

// The same contract, whichever store serves it.
for (const engine of ENGINES) {
  const options = engine === 'postgres' ? await pgTestOptions() : {};
  const contract = (name: string, fn: (t: Closable) => Promise<void>) => nodeTest(`${name} [${engine}]`, options, fn);

  contract('a begun chat is stored queued with its question; its end stores the reply and the outcome', async (t) => {
    const { store } = await openStore(t, engine);
    const taskId = newTaskId();
    const began = await store.beginChat({ taskId, userId: 'u1', conversationId: undefined, text: 'hello' });
    assert.match(began.conversationId, /^conv_/);
    assert.match(began.messageId, /^msg_/);
    assert.equal(began.replyMessageId, undefined);
    assert.equal(await store.conversationOwner(began.conversationId), 'u1');
    const queued = await store.task(taskId);
    assert.deepEqual(queued, { taskId, conversationId: began.conversationId, userId: 'u1', status: 'queued', text: '', createdAt: began.createdAt });

    const messageId = await store.finishTask({ ...finishOf(taskId, began.conversationId), status: 'done', finishReason: 'stop', text: 'hi there' });
    assert.match(messageId ?? '', /^msg_/);
    const done = await store.task(taskId);
    assert.equal(done?.status, 'done');
    assert.equal(done?.text, 'hi there');
    const page = await store.history(began.conversationId, undefined, 10);
    assert.deepEqual(
      page.messages.map((m) => [m.messageId, m.role, m.text]),
      [
        [began.messageId, 'user', 'hello'],
        [messageId, 'assistant', 'hi there'],
      ],
    );
    assert.equal(page.messages[0]?.createdAt, new Date(began.createdAt).toISOString());
    assert.equal(page.hasMore, false);

    // A second chat in the same conversation; a task that failed stores no message.
    const failed = newTaskId();
    const again = await store.beginChat({ taskId: failed, userId: 'u1', conversationId: began.conversationId, text: 'again' });
    assert.equal(again.conversationId, began.conversationId);
    assert.equal(await store.finishTask({ ...finishOf(failed, began.conversationId), status: 'error', errorCode: 'upstream_error', text: '' }), null);
    assert.equal((await store.task(failed))?.status, 'error');
    assert.deepEqual(
      (await store.history(began.conversationId, undefined, 10)).messages.map((m) => m.text),
      ['hello', 'hi there', 'again'],
    );
  });

  contract('the conversation owner is its first user, and unknown conversations and tasks are undefined', async (t) => {
    const { store } = await openStore(t, engine);
    const began = await store.beginChat({ taskId: newTaskId(), userId: 'ann', conversationId: undefined, text: 'q' });
    await store.beginChat({ taskId: newTaskId(), userId: 'bob', conversationId: undefined, text: 'q' });
    assert.equal(await store.conversationOwner(began.conversationId), 'ann');
    assert.equal(await store.conversationOwner('conv_nope'), undefined);
    assert.equal(await store.task('task_nope'), undefined);
  });

  contract('the begins of one tick go in one group commit, each resolving once it is committed', async (t) => {
    const { store, commits, messageTransactions } = await openStore(t, engine);
    const first = await store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: undefined, text: 'first' });
    assert.deepEqual(commits, [1]);
    const taskIds = Array.from({ length: 40 }, () => newTaskId());
    const begins = taskIds.map((taskId, i) => store.beginChat({ taskId, userId: 'u1', conversationId: first.conversationId, text: `m${i}` }));
    assert.equal(store.pendingWrites, 40);
    const began = await Promise.all(begins);
    assert.deepEqual(commits, [1, 40], 'one commit for the 40 writes of one tick');
    if (messageTransactions) assert.equal(await messageTransactions(), 2, 'one transaction for the 40 writes of one tick');
    assert.equal(store.pendingWrites, 0);
    // Stored in the order they were begun.
    const page = await store.history(first.conversationId, undefined, 100);
    assert.deepEqual(
      page.messages.map((m) => m.messageId),
      [first.messageId, ...began.map((b) => b.messageId)],
    );
    for (const taskId of taskIds) assert.equal((await store.task(taskId))?.status, 'queued');
  });

  contract('flush() starts the pending commit without waiting for the tick; close() waits for what is pending', async (t) => {
    const { store, commits, count } = await openStore(t, engine);
    let resolved = false;
    const begun = store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: undefined, text: 'now' }).then((b) => {
      resolved = true;
      return b;
    });
    store.flush();
    assert.equal(commits.length + store.pendingWrites, 1, 'committed, or being committed');
    // Writes queued after the flush go in the next commit.
    const later = [1, 2].map((i) => store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: undefined, text: `later ${i}` }));
    await Promise.all([begun, ...later]);
    assert.deepEqual(commits, [1, 2]);
    const closing = store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: undefined, text: 'at close' });
    await store.close();
    assert.equal(resolved, true);
    assert.equal(store.pendingWrites, 0);
    await closing;
    assert.equal(await count('messages'), 4);
  });

  contract('history pages back with before, oldest first within a page; an unknown before is not_found', async (t) => {
    const { store } = await openStore(t, engine);
    const first = await store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: undefined, text: 'm0' });
    const conversationId = first.conversationId;
    const ids = [first.messageId];
    for (let i = 1; i < 7; i++) ids.push((await store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId, text: `m${i}` })).messageId);
    // Another conversation's messages never show.
    await store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: undefined, text: 'elsewhere' });

    const latest = await store.history(conversationId, undefined, 3);
    assert.deepEqual(
      latest.messages.map((m) => m.text),
      ['m4', 'm5', 'm6'],
    );
    assert.equal(latest.hasMore, true);
    const middle = await store.history(conversationId, latest.messages[0]?.messageId, 3);
    assert.deepEqual(
      middle.messages.map((m) => m.text),
      ['m1', 'm2', 'm3'],
    );
    assert.equal(middle.hasMore, true);
    const oldest = await store.history(conversationId, middle.messages[0]?.messageId, 3);
    assert.deepEqual(oldest, {
      messages: [{ messageId: ids[0], role: 'user', text: 'm0', createdAt: new Date(first.createdAt).toISOString() }],
      hasMore: false,
    });
    assert.deepEqual(await store.history(conversationId, ids[0], 3), { messages: [], hasMore: false });
    assert.deepEqual((await store.history(conversationId, undefined, 7)).hasMore, false);
    await assert.rejects(store.history(conversationId, 'msg_nope', 3), (err: unknown) => err instanceof AppError && err.code === 'not_found');
    // A message of another conversation is not a place in this one.
    const other = await store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: undefined, text: 'x' });
    await assert.rejects(store.history(conversationId, other.messageId, 3), (err: unknown) => err instanceof AppError && err.code === 'not_found');
  });

  contract("the context is the conversation's latest messages, oldest first, with their roles", async (t) => {
    const { store } = await openStore(t, engine);
    const taskId = newTaskId();
    const began = await store.beginChat({ taskId, userId: 'u1', conversationId: undefined, text: 'q1' });
    await store.finishTask({ ...finishOf(taskId, began.conversationId), status: 'done', finishReason: 'stop', text: 'a1' });
    await store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: began.conversationId, text: 'q2' });
    assert.deepEqual(await store.context(began.conversationId, 2), [
      { role: 'assistant', content: 'a1' },
      { role: 'user', content: 'q2' },
    ]);
    assert.deepEqual(await store.context(began.conversationId, 10), [
      { role: 'user', content: 'q1' },
      { role: 'assistant', content: 'a1' },
      { role: 'user', content: 'q2' },
    ]);
    assert.deepEqual(await store.context('conv_nope', 10), []);
  });

  contract('a finished task keeps what a resume needs: its chunk boundaries byte for byte, timings, and a failed task its text and message', async (t) => {
    const { store } = await openStore(t, engine);
    const timings = { queueMs: 1.25, firstTokenMs: null, totalMs: 30.57 };
    const base = { promptTokens: 3, completionTokens: 4, cached: false, timings };

    const done = newTaskId();
    const began = await store.beginChat({ taskId: done, userId: 'u1', conversationId: undefined, text: 'hello' });
    // Boundaries of one to five varint bytes, and text outside Latin-1 and the BMP.
    const text = `ab😀${'x'.repeat(200)}é${'y'.repeat(70_000)}`;
    const deltaEnds = Uint32Array.of(1, 2, 4, 204, 205, text.length);
    const messageId = await store.finishTask({
      ...base,
      taskId: done,
      conversationId: began.conversationId,
      status: 'done',
      finishReason: 'length',
      text,
      deltaEnds,
    });
    const stored = await store.task(done);
    assert.equal(stored?.text, text);
    assert.deepEqual(stored?.replay, {
      deltaEnds,
      finishedAt: stored?.replay?.finishedAt,
      replyMessageId: messageId,
      finishReason: 'length',
      errorCode: null,
      errorMessage: null,
      promptTokens: 3,
      completionTokens: 4,
      cached: false,
      timings,
    });
    assert.ok(Math.abs((stored?.replay?.finishedAt ?? 0) - Date.now()) < 60_000);
    assert.deepEqual(encodeDeltaEnds(stored?.replay?.deltaEnds ?? new Uint32Array(0)), encodeDeltaEnds(deltaEnds));

    const failed = newTaskId();
    await store.beginChat({ taskId: failed, userId: 'u1', conversationId: began.conversationId, text: 'again' });
    await store.finishTask({
      ...base,
      taskId: failed,
      conversationId: began.conversationId,
      status: 'error',
      errorCode: 'upstream_error',
      errorMessage: 'the model failed',
      text: 'part',
      deltaEnds: Uint32Array.of(4),
    });
    const lost = await store.task(failed);
    assert.equal(lost?.status, 'error');
    assert.equal(lost?.text, 'part');
    assert.equal(lost?.replay?.errorCode, 'upstream_error');
    assert.equal(lost?.replay?.errorMessage, 'the model failed');
    assert.equal(lost?.replay?.replyMessageId, null);
    assert.deepEqual(
      (await store.history(began.conversationId, undefined, 10)).messages.map((m) => m.text),
      ['hello', text, 'again'],
      'a failed task stores no message',
    );

    // A cache hit is stored finished with its question; its boundaries and timings follow.
    const hit = newTaskId();
    const knownReply = { text: 'xyz', finishReason: 'stop' as const, promptTokens: 1, completionTokens: 2 };
    const hitBegan = await store.beginChat({ taskId: hit, userId: 'u1', conversationId: undefined, text: 'cached?', knownReply });
    assert.match(hitBegan.replyMessageId ?? '', /^msg_/);
    const answered = await store.task(hit);
    assert.equal(answered?.status, 'done');
    assert.equal(answered?.text, 'xyz');
    assert.equal(answered?.replay, undefined);
    await store.recordReplay(hit, Uint32Array.of(1, 3), timings);
    const replayed = (await store.task(hit))?.replay;
    assert.deepEqual(replayed?.deltaEnds, Uint32Array.of(1, 3));
    assert.equal(replayed?.cached, true);
    assert.equal(replayed?.replyMessageId, hitBegan.replyMessageId);
    assert.equal(replayed?.completionTokens, 2);
    assert.deepEqual(replayed?.timings, timings);
    assert.deepEqual(
      (await store.history(hitBegan.conversationId, undefined, 10)).messages.map((m) => [m.role, m.text]),
      [
        ['user', 'cached?'],
        ['assistant', 'xyz'],
      ],
    );
  });

  contract('failUnfinished fails a queued or running task with its code and message, once; a finished task is left alone', async (t) => {
    const { store } = await openStore(t, engine);
    const queued = newTaskId();
    const began = await store.beginChat({ taskId: queued, userId: 'u1', conversationId: undefined, text: 'q' });
    assert.equal(await store.failUnfinished(queued, 'node_lost', 'the node running this task stopped'), true);
    const failed = await store.task(queued);
    assert.equal(failed?.status, 'error');
    assert.equal(failed?.text, '');
    assert.equal(await store.failUnfinished(queued, 'node_lost', 'again'), false, 'already failed');

    const finished = newTaskId();
    await store.beginChat({ taskId: finished, userId: 'u1', conversationId: began.conversationId, text: 'q2' });
    await store.finishTask({ ...finishOf(finished, began.conversationId), status: 'done', finishReason: 'stop', text: 'fine' });
    assert.equal(await store.failUnfinished(finished, 'node_lost', 'late'), false);
    assert.equal((await store.task(finished))?.status, 'done');
    assert.equal(await store.failUnfinished('task_nope', 'node_lost', 'none'), false);
  });

  contract('recoverUnfinished fails the tasks this node left queued, not those that ended', async (t) => {
    const fixture = await openStore(t, engine);
    const { store } = fixture;
    const left = newTaskId();
    const ended = newTaskId();
    const began = await store.beginChat({ taskId: left, userId: 'u1', conversationId: undefined, text: 'q' });
    await store.beginChat({ taskId: ended, userId: 'u1', conversationId: began.conversationId, text: 'q2' });
    await store.finishTask({ ...finishOf(ended, began.conversationId), status: 'done', finishReason: 'stop', text: 'ok' });
    // The same node, restarted.
    const restarted = fixture.open(NODE);
    assert.equal(await restarted.recoverUnfinished(), 1);
    assert.equal((await restarted.task(left))?.status, 'error');
    assert.equal((await restarted.task(ended))?.status, 'done');
    assert.equal(await restarted.recoverUnfinished(), 0);
  });

  contract('a commit that fails rejects every begin of its batch and stores nothing; the next commits work', async (t) => {
    const { store, count, refuseWrites } = await openStore(t, engine);
    const undo = await refuseWrites();
    const results = await Promise.allSettled(
      Array.from({ length: 5 }, (_, i) => store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: undefined, text: `m${i}` })),
    );
    assert.deepEqual(
      results.map((r) => r.status),
      ['rejected', 'rejected', 'rejected', 'rejected', 'rejected'],
    );
    for (const r of results) assert.match(String((r as PromiseRejectedResult).reason), /disk trouble/);
    for (const table of ['conversations', 'messages', 'tasks'] as const) assert.equal(await count(table), 0, `no ${table} stored`);
    await undo();
    const taskId = newTaskId();
    await store.beginChat({ taskId, userId: 'u1', conversationId: undefined, text: 'works again' });
    assert.equal((await store.task(taskId))?.status, 'queued');
  });

  contract('a write that fails alone fails only its own caller; the rest of its batch is committed', async (t) => {
    const { store, count } = await openStore(t, engine);
    const good = Array.from({ length: 3 }, () => newTaskId());
    const results = await Promise.allSettled([
      store.beginChat({ taskId: good[0] as string, userId: 'u1', conversationId: undefined, text: 'a' }),
      // A conversation that does not exist: its message breaks the foreign key.
      store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: 'conv_missing', text: 'b' }),
      store.beginChat({ taskId: good[1] as string, userId: 'u1', conversationId: undefined, text: 'c' }),
      store.beginChat({ taskId: good[2] as string, userId: 'u1', conversationId: undefined, text: 'd' }),
    ]);
    assert.deepEqual(
      results.map((r) => r.status),
      ['fulfilled', 'rejected', 'fulfilled', 'fulfilled'],
    );
    assert.equal(await count('messages'), 3);
    for (const taskId of good) assert.equal((await store.task(taskId))?.status, 'queued');
  });

  contract('a task whose end could not be written is marked failed once storage takes writes again', async (t) => {
    const fixture = await openStore(t, engine);
    const { store } = fixture;
    const taskId = newTaskId();
    const began = await store.beginChat({ taskId, userId: 'u1', conversationId: undefined, text: 'hello' });
    assert.equal((await store.task(taskId))?.status, 'queued');

    const undo = await fixture.refuseWrites();
    const finish = { ...finishOf(taskId, began.conversationId), text: 'partial' };
    await assert.rejects(store.finishTask({ ...finish, status: 'done', finishReason: 'stop' }), /disk trouble/);
    assert.equal(store.unrecordedEnds, 1);
    // Still failing at the first retry: kept.
    await sleep(1300);
    assert.equal((await store.task(taskId))?.status, 'queued');
    assert.equal(store.unrecordedEnds, 1);

    await undo();
    const deadline = Date.now() + 10_000;
    while (store.unrecordedEnds > 0 && Date.now() < deadline) await sleep(50);
    assert.equal(store.unrecordedEnds, 0);
    // What its client was told: the task failed; the reply was not stored.
    const stored = await store.task(taskId);
    assert.equal(stored?.status, 'error');
    assert.equal(stored?.text, '');
  });
}

// What only PostgreSQL has: several nodes on one database.
nodeTest("[postgres] each task records the node that began it, and recoverUnfinished fails only that node's", await pgTestOptions(), async (t) => {
  const { store, open, pg } = await openPg(t);
  const other = open('node-b');
  const mine = newTaskId();
  const theirs = newTaskId();
  await store.beginChat({ taskId: mine, userId: 'u1', conversationId: undefined, text: 'on a' });
  await other.beginChat({ taskId: theirs, userId: 'u2', conversationId: undefined, text: 'on b' });
  const nodes = await pg?.unsafe('SELECT task_id, node_id FROM tasks ORDER BY node_id');
  assert.deepEqual(
    nodes?.map((r) => [r.task_id, r.node_id]),
    [
      [mine, NODE],
      [theirs, 'node-b'],
    ],
  );
  // Node a restarts: its own task failed, node b's still running.
  assert.equal(await open(NODE).recoverUnfinished(), 1);
  assert.equal((await store.task(mine))?.status, 'error');
  assert.equal((await store.task(theirs))?.status, 'queued');
});

nodeTest(
  '[postgres] failStale ends the tasks left unfinished before a time, of any node, once; finished and newer ones stay',
  await pgTestOptions(),
  async (t) => {
    const { pg } = await openPg(t);
    const a = createPgChatStore(pg as Pg, { nodeId: NODE });
    const b = createPgChatStore(pg as Pg, { nodeId: 'node-b' });
    t.after(async () => {
      await a.close();
      await b.close();
    });
    const lostA = newTaskId();
    const lostB = newTaskId();
    const done = newTaskId();
    await a.beginChat({ taskId: lostA, userId: 'u1', conversationId: undefined, text: 'on a' });
    await b.beginChat({ taskId: lostB, userId: 'u2', conversationId: undefined, text: 'on b' });
    const finished = await a.beginChat({ taskId: done, userId: 'u1', conversationId: undefined, text: 'answered' });
    await a.finishTask({ ...finishOf(done, finished.conversationId), status: 'done', finishReason: 'stop', text: 'reply' });
    const cutoff = Date.now() + 1;
    await new Promise((resolve) => setTimeout(resolve, 5));
    const newer = newTaskId();
    await a.beginChat({ taskId: newer, userId: 'u3', conversationId: undefined, text: 'just now' });

    assert.deepEqual((await b.failStale(cutoff, 'node_lost', 'lost')).sort(), [lostA, lostB].sort());
    for (const taskId of [lostA, lostB]) assert.equal((await a.task(taskId))?.status, 'error');
    const codes = await (pg as Pg).unsafe('SELECT error_code, error_message FROM tasks WHERE task_id IN ($1, $2)', [lostA, lostB]);
    assert.deepEqual(
      codes.map((r) => [r.error_code, r.error_message]),
      [
        ['node_lost', 'lost'],
        ['node_lost', 'lost'],
      ],
    );
    assert.equal((await a.task(done))?.status, 'done');
    assert.equal((await a.task(newer))?.status, 'queued');
    // A second sweep (another node's, at the same time) finds nothing left to end.
    assert.deepEqual(await a.failStale(cutoff, 'node_lost', 'lost'), []);
  },
);

nodeTest('[postgres] a group commit writes with a few set-based statements, however many writes it holds', await pgTestOptions(), async (t) => {
  const { store, pg } = await openPg(t);
  const statements: string[] = [];
  const counted = createPgChatStore(pg as Pg, { nodeId: NODE, onQuery: (op) => statements.push(op) });
  t.after(() => counted.close());
  const first = await store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: undefined, text: 'first' });
  const endedTask = newTaskId();
  const ended = await store.beginChat({ taskId: endedTask, userId: 'u1', conversationId: undefined, text: 'ends' });
  // One tick: 30 questions in one conversation, 10 new conversations, a task ending (its reply touches its conversation too).
  const writes = [
    ...Array.from({ length: 30 }, (_, i) => counted.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: first.conversationId, text: `m${i}` })),
    ...Array.from({ length: 10 }, (_, i) => counted.beginChat({ taskId: newTaskId(), userId: 'u2', conversationId: undefined, text: `new ${i}` })),
    counted.finishTask({ ...finishOf(endedTask, ended.conversationId), status: 'done', finishReason: 'stop', text: 'reply' }),
  ];
  await Promise.all(writes);
  assert.deepEqual(statements.sort(), [
    'chat.finish_tasks',
    'chat.insert_conversations',
    'chat.insert_messages',
    'chat.insert_tasks',
    'chat.touch_conversations',
  ]);
  // The 30 touches of one conversation add up on its row.
  const [row] = await (pg as Pg).unsafe('SELECT message_count, title FROM conversations WHERE conversation_id = $1', [first.conversationId]);
  assert.equal(row?.message_count, 31);
  assert.equal(row?.title, 'first');
  assert.equal((await store.history(ended.conversationId, undefined, 10)).messages.at(-1)?.text, 'reply');
  assert.equal((await store.task(endedTask))?.status, 'done');
});

// What the AI SDK route needs of both stores: conversations named by the client, and regenerated replies.
for (const engine of ENGINES) {
  const options = engine === 'postgres' ? await pgTestOptions() : {};
  const contract = (name: string, fn: (t: Closable) => Promise<void>) => nodeTest(`${name} [${engine}]`, options, fn);

  contract('a conversation named by the client is made on first use; another user naming it is refused inside the commit', async (t) => {
    const { store } = await openStore(t, engine);
    const chat = (userId: string, conversationId: string, text: string) =>
      store.beginChat({ taskId: newTaskId(), userId, conversationId, text, createConversation: true });
    const began = await chat('u1', 'chat-1', 'first');
    assert.equal(began.conversationId, 'chat-1');
    assert.equal(await store.conversationOwner('chat-1'), 'u1');
    await chat('u1', 'chat-1', 'second');
    await assert.rejects(chat('u2', 'chat-1', 'not yours'), (err: AppError) => err.code === 'forbidden');

    // Two users naming a new id in the same commit: the first one makes it, the second is refused, nothing of its stored.
    const [first, second] = await Promise.allSettled([chat('u1', 'chat-2', 'mine'), chat('u2', 'chat-2', 'mine too')]);
    assert.equal(first.status, 'fulfilled');
    assert.equal(second.status === 'rejected' && (second.reason as AppError).code, 'forbidden');
    assert.equal(await store.conversationOwner('chat-2'), 'u1');
    assert.deepEqual(
      (await store.history('chat-1', undefined, 10)).messages.map((m) => m.text),
      ['first', 'second'],
    );
    assert.deepEqual(
      (await store.history('chat-2', undefined, 10)).messages.map((m) => m.text),
      ['mine'],
    );
  });

  contract('a regenerated reply stores no user message; lastUserTurn gives the last user message and the history before it', async (t) => {
    const { store } = await openStore(t, engine);
    const turn = async (text: string, reply: string, conversationId?: string) => {
      const taskId = newTaskId();
      const began = await store.beginChat({ taskId, userId: 'u1', conversationId, text });
      await store.finishTask({
        taskId,
        conversationId: began.conversationId,
        status: 'done',
        finishReason: 'stop',
        text: reply,
        promptTokens: 1,
        completionTokens: 1,
        cached: false,
      });
      return began;
    };
    const first = await turn('q1', 'a1');
    const conv = first.conversationId;
    const second = await turn('q2', 'a2', conv);
    assert.deepEqual(await store.lastUserTurn(conv, 10), {
      messageId: second.messageId,
      text: 'q2',
      context: [
        { role: 'user', content: 'q1' },
        { role: 'assistant', content: 'a1' },
      ],
    });
    assert.deepEqual((await store.lastUserTurn(conv, 1))?.context, [{ role: 'assistant', content: 'a1' }]);
    assert.deepEqual((await store.lastUserTurn(conv, 0))?.context, []);

    const taskId = newTaskId();
    const again = await store.beginChat({ taskId, userId: 'u1', conversationId: conv, text: 'q2', replyTo: second.messageId });
    assert.equal(again.messageId, second.messageId);
    await store.finishTask({
      taskId,
      conversationId: conv,
      status: 'done',
      finishReason: 'stop',
      text: 'a2 again',
      promptTokens: 1,
      completionTokens: 1,
      cached: false,
    });
    assert.deepEqual(
      (await store.history(conv, undefined, 10)).messages.map((m) => [m.role, m.text]),
      [
        ['user', 'q1'],
        ['assistant', 'a1'],
        ['user', 'q2'],
        ['assistant', 'a2'],
        ['assistant', 'a2 again'],
      ],
    );
    // The regenerated reply is still an answer to q2: it is the last user message, with the same context.
    assert.equal((await store.lastUserTurn(conv, 10))?.messageId, second.messageId);
    assert.equal(await store.lastUserTurn('no-such-conversation', 10), undefined);
  });
}

// Sync and idempotency: the conversation list and the stored idempotency keys, the same on both stores.
for (const engine of ENGINES) {
  const options = engine === 'postgres' ? await pgTestOptions() : {};
  const contract = (name: string, fn: (t: Closable) => Promise<void>) => nodeTest(`${name} [${engine}]`, options, fn);

  contract('conversations list newest activity first, with title and message count kept by the writes, paged by keyset', async (t) => {
    const { store } = await openStore(t, engine);
    const long = `${'é'.repeat(70)}${'🙂'.repeat(20)}`;
    const a = await store.beginChat({ taskId: newTaskId(), userId: 'u1', text: long });
    await sleep(3);
    const b = await store.beginChat({ taskId: newTaskId(), userId: 'u1', text: 'second conversation' });
    await sleep(3);
    const other = await store.beginChat({ taskId: newTaskId(), userId: 'u2', text: 'not yours' });
    await sleep(3);
    // A reply in a: it becomes the newest activity; its count takes the reply; its title stays the first question.
    const reply = newTaskId();
    const again = await store.beginChat({ taskId: reply, userId: 'u1', conversationId: a.conversationId, text: 'a follow-up' });
    await store.finishTask({ ...finishOf(reply, a.conversationId), status: 'done', finishReason: 'stop', text: 'an answer' });
    await sleep(3);
    const named = await store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: 'chat-x', text: 'named by the client', createConversation: true });

    const all = await store.conversations('u1', undefined, 10);
    assert.deepEqual(
      all.map((c) => [c.conversationId, c.title, c.messageCount]),
      [
        ['chat-x', 'named by the client', 1],
        [a.conversationId, `${'é'.repeat(70)}${'🙂'.repeat(10)}`, 3],
        [b.conversationId, 'second conversation', 1],
      ],
    );
    assert.ok(all[1] !== undefined && all[1].updatedAt >= again.createdAt);
    assert.equal(all[0]?.updatedAt, named.createdAt);
    assert.deepEqual(
      (await store.conversations('u2', undefined, 10)).map((c) => c.conversationId),
      [other.conversationId],
    );
    // Pages of one: each starts after the position of the last one, and the walk ends.
    const walked: string[] = [];
    let after: { updatedAt: number; conversationId: string } | undefined;
    for (;;) {
      const page = await store.conversations('u1', after, 1);
      if (page.length === 0) break;
      const last = page[0] as (typeof page)[number];
      walked.push(last.conversationId);
      after = { updatedAt: last.updatedAt, conversationId: last.conversationId };
    }
    assert.deepEqual(
      walked,
      all.map((c) => c.conversationId),
    );
  });

  contract('conversations with the same last activity are ordered by conversation id, descending, across pages', async (t) => {
    const { store } = await openStore(t, engine);
    const ids = ['c-a', 'c-B', 'c-b', 'c-Z', 'c-1'];
    // The same time for all (a send takes its time when it is begun, synchronously: a loaded machine may cross a
    // millisecond between two sends of one tick).
    const realNow = Date.now;
    const frozen = realNow();
    Date.now = () => frozen;
    let begun: Promise<unknown>[];
    try {
      begun = ids.map((id) => store.beginChat({ taskId: newTaskId(), userId: 'u1', conversationId: id, text: id, createConversation: true }));
    } finally {
      Date.now = realNow;
    }
    await Promise.all(begun);
    const all = await store.conversations('u1', undefined, 10);
    assert.equal(new Set(all.map((c) => c.updatedAt)).size, 1);
    const expected = [...ids].sort().reverse();
    assert.deepEqual(
      all.map((c) => c.conversationId),
      expected,
    );
    const first = await store.conversations('u1', undefined, 2);
    const last = first[1] as (typeof first)[number];
    const rest = await store.conversations('u1', { updatedAt: last.updatedAt, conversationId: last.conversationId }, 10);
    assert.deepEqual(
      rest.map((c) => c.conversationId),
      expected.slice(2),
    );
  });

  contract('an idempotency key is stored with its send; a second send with it stores nothing, until 24 hours have passed', async (t) => {
    const { store, count } = await openStore(t, engine);
    const record = (ack: string) => ({ key: 'k-1', requestHash: 'h1', requestedConversationId: null, ack });
    const taskId = newTaskId();
    const began = await store.beginChat({ taskId, userId: 'u1', text: 'once', idempotency: record('{"first":true}') });
    const stored = await store.idempotentSend('u1', 'k-1', Date.now() - IDEMPOTENCY_WINDOW_MS);
    assert.deepEqual(stored, {
      requestHash: 'h1',
      requestedConversationId: null,
      taskId,
      conversationId: began.conversationId,
      messageId: began.messageId,
      ack: '{"first":true}',
      createdAt: began.createdAt,
    });
    assert.equal(await store.idempotentSend('u2', 'k-1', 0), undefined);
    assert.equal(await store.idempotentSend('u1', 'k-2', 0), undefined);
    // Past its window the record is not found.
    assert.equal(await store.idempotentSend('u1', 'k-1', began.createdAt + 1), undefined);

    const [messages, tasks, conversations] = [await count('messages'), await count('tasks'), await count('conversations')];
    await assert.rejects(store.beginChat({ taskId: newTaskId(), userId: 'u1', text: 'twice', idempotency: record('{}') }), IdempotencyKeyTaken);
    // Two at once with a new key: one commits, the other stores nothing.
    const both = await Promise.allSettled([
      store.beginChat({ taskId: newTaskId(), userId: 'u1', text: 'race', idempotency: { ...record('{}'), key: 'k-3' } }),
      store.beginChat({ taskId: newTaskId(), userId: 'u1', text: 'race', idempotency: { ...record('{}'), key: 'k-3' } }),
    ]);
    assert.deepEqual(both.map((r) => r.status).sort(), ['fulfilled', 'rejected']);
    assert.equal(await count('messages'), messages + 1);
    assert.equal(await count('tasks'), tasks + 1);
    assert.equal(await count('conversations'), conversations + 1);
    // Another user's key of the same name is its own.
    await store.beginChat({ taskId: newTaskId(), userId: 'u2', text: 'mine', idempotency: record('{}') });
  });

  contract('a key older than 24 hours is taken over by the next send with it', async (t) => {
    const { store } = await openStore(t, engine);
    const record = { key: 'old', requestHash: 'h', requestedConversationId: null, ack: '{}' };
    const realNow = Date.now;
    Date.now = () => realNow() - IDEMPOTENCY_WINDOW_MS - 60_000;
    try {
      await store.beginChat({ taskId: newTaskId(), userId: 'u1', text: 'long ago', idempotency: record });
    } finally {
      Date.now = realNow;
    }
    const taskId = newTaskId();
    await store.beginChat({ taskId, userId: 'u1', text: 'today', idempotency: { ...record, requestHash: 'h2' } });
    const stored = await store.idempotentSend('u1', 'old', Date.now() - IDEMPOTENCY_WINDOW_MS);
    assert.equal(stored?.taskId, taskId);
    assert.equal(stored?.requestHash, 'h2');
  });

  contract('pruneIdempotencyKeys deletes the keys stored before a time, oldest first, at most a batch at a time', async (t) => {
    const { store, count } = await openStore(t, engine);
    const realNow = Date.now;
    const base = realNow() - IDEMPOTENCY_WINDOW_MS - 60_000;
    // Five keys a second apart, all past the window; then one of today.
    for (let i = 0; i < 5; i++) {
      Date.now = () => base + i * 1000;
      try {
        await store.beginChat({
          taskId: newTaskId(),
          userId: 'u1',
          text: `old ${i}`,
          idempotency: { key: `k-${i}`, requestHash: 'h', requestedConversationId: null, ack: '{}' },
        });
      } finally {
        Date.now = realNow;
      }
    }
    await store.beginChat({
      taskId: newTaskId(),
      userId: 'u1',
      text: 'today',
      idempotency: { key: 'k-today', requestHash: 'h', requestedConversationId: null, ack: '{}' },
    });
    const cutoff = realNow() - IDEMPOTENCY_WINDOW_MS;
    assert.equal(await store.pruneIdempotencyKeys(cutoff, 2), 2);
    // The two oldest went first.
    assert.deepEqual(await Promise.all([0, 1, 2].map(async (i) => (await store.idempotentSend('u1', `k-${i}`, 0)) !== undefined)), [false, false, true]);
    assert.equal(await store.pruneIdempotencyKeys(cutoff, 10), 3);
    assert.equal(await store.pruneIdempotencyKeys(cutoff, 10), 0);
    assert.equal(await count('idempotency_keys'), 1);
    assert.notEqual(await store.idempotentSend('u1', 'k-today', 0), undefined);
    // The messages and tasks of those sends stay.
    assert.equal(await count('messages'), 6);
  });
}
