import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { createChatStore, decodeDeltaEnds, encodeDeltaEnds, newTaskId } from '../../src/db/chat-store.js';
import { Database } from '../../src/db/database.js';
import { migrate } from '../../src/db/migrate.js';

test('a task whose end could not be written is marked failed once storage takes writes again', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-store-'));
  const db = new Database(path.join(dir, 'chat.sqlite'));
  migrate(db);
  const store = createChatStore(db);
  t.after(async () => {
    await store.close();
    db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const taskId = newTaskId();
  const began = await store.beginChat({ taskId, userId: 'u1', conversationId: undefined, text: 'hello' });
  assert.equal((await store.task(taskId))?.status, 'queued');

  // Storage refuses the reply: a real SQLite failure (a trigger aborting every write to messages and tasks).
  db.raw.exec(`
    CREATE TEMP TRIGGER refuse_messages BEFORE INSERT ON messages BEGIN SELECT RAISE(ABORT, 'disk trouble'); END;
    CREATE TEMP TRIGGER refuse_tasks BEFORE UPDATE ON tasks BEGIN SELECT RAISE(ABORT, 'disk trouble'); END;
  `);
  const finish = { taskId, conversationId: began.conversationId, text: 'partial', promptTokens: 1, completionTokens: 1, cached: false };
  await assert.rejects(store.finishTask({ ...finish, status: 'done', finishReason: 'stop' }), /disk trouble/);
  assert.equal(store.unrecordedEnds, 1);
  // Still failing at the first retry: kept.
  await sleep(1300);
  assert.equal((await store.task(taskId))?.status, 'queued');
  assert.equal(store.unrecordedEnds, 1);

  db.raw.exec('DROP TRIGGER refuse_messages; DROP TRIGGER refuse_tasks;');
  const deadline = Date.now() + 10_000;
  while (store.unrecordedEnds > 0 && Date.now() < deadline) await sleep(50);
  assert.equal(store.unrecordedEnds, 0);
  // What its client was told: the task failed; the reply was not stored.
  const stored = await store.task(taskId);
  assert.equal(stored?.status, 'error');
  assert.equal(stored?.text, '');
});

test('delta boundaries round-trip through their stored form, one byte a delta under 128 characters', () => {
  const lengths = [1, 5, 127, 128, 300, 16_383, 16_384, 4096, 70_000, 2 ** 31 - 1];
  const ends = new Uint32Array(lengths.length);
  lengths.reduce((at, n, i) => (ends[i] = at + n), 0);
  const bytes = encodeDeltaEnds(ends);
  assert.deepEqual(decodeDeltaEnds(bytes), ends);
  assert.equal(bytes.length, 1 + 1 + 1 + 2 + 2 + 2 + 3 + 2 + 3 + 5);
  assert.deepEqual(decodeDeltaEnds(encodeDeltaEnds(new Uint32Array(0))), new Uint32Array(0));
});

test('a finished task keeps what a resume needs: chunk boundaries, timings, and a failed task its text and message', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-store-'));
  const db = new Database(path.join(dir, 'chat.sqlite'));
  migrate(db);
  const store = createChatStore(db);
  t.after(async () => {
    await store.close();
    db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const timings = { queueMs: 1.25, firstTokenMs: null, totalMs: 30.5 };
  const base = { promptTokens: 3, completionTokens: 4, cached: false, timings };

  const done = newTaskId();
  const began = await store.beginChat({ taskId: done, userId: 'u1', conversationId: undefined, text: 'hello' });
  const messageId = await store.finishTask({
    ...base,
    taskId: done,
    conversationId: began.conversationId,
    status: 'done',
    finishReason: 'length',
    text: 'abcdef',
    deltaEnds: Uint32Array.of(2, 3, 6),
  });
  const stored = await store.task(done);
  assert.equal(stored?.text, 'abcdef');
  assert.deepEqual(stored?.replay, {
    deltaEnds: Uint32Array.of(2, 3, 6),
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
  assert.equal(lost?.text, 'part');
  assert.equal(lost?.replay?.errorMessage, 'the model failed');
  assert.deepEqual(
    (await store.history(began.conversationId, undefined, 10)).messages.map((m) => m.text),
    ['hello', 'abcdef', 'again'],
    'a failed task stores no message',
  );

  // A cache hit is stored finished with its question; its boundaries and timings follow.
  const hit = newTaskId();
  const knownReply = { text: 'xyz', finishReason: 'stop' as const, promptTokens: 1, completionTokens: 1 };
  await store.beginChat({ taskId: hit, userId: 'u1', conversationId: undefined, text: 'cached?', knownReply });
  assert.equal((await store.task(hit))?.replay, undefined);
  await store.recordReplay(hit, Uint32Array.of(1, 3), timings);
  assert.deepEqual((await store.task(hit))?.replay?.deltaEnds, Uint32Array.of(1, 3));
  assert.equal((await store.task(hit))?.replay?.cached, true);
});
