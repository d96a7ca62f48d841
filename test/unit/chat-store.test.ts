import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { createChatStore, decodeDeltaEnds, encodeDeltaEnds, newTaskId } from '../../src/db/chat-store.js';
import { Database } from '../../src/db/database.js';
import { migrate } from '../../src/db/migrate.js';
import type { AppError } from '../../src/protocol/index.js';

test('a task whose end could not be written is marked failed once storage takes writes again', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-store-'));
  const db = new Database(path.join(dir, 'chat.sqlite'));
  migrate(db);
  const store = createChatStore(db);
  t.after(() => {
    store.close();
    db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const taskId = newTaskId();
  const began = await store.beginChat({ taskId, userId: 'u1', conversationId: undefined, text: 'hello' });
  assert.equal(store.task(taskId)?.status, 'queued');

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
  assert.equal(store.task(taskId)?.status, 'queued');
  assert.equal(store.unrecordedEnds, 1);

  db.raw.exec('DROP TRIGGER refuse_messages; DROP TRIGGER refuse_tasks;');
  const deadline = Date.now() + 10_000;
  while (store.unrecordedEnds > 0 && Date.now() < deadline) await sleep(50);
  assert.equal(store.unrecordedEnds, 0);
  // What its client was told: the task failed; the reply was not stored.
  const stored = store.task(taskId);
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
  t.after(() => {
    store.close();
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
  const stored = store.task(done);
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
  const lost = store.task(failed);
  assert.equal(lost?.text, 'part');
  assert.equal(lost?.replay?.errorMessage, 'the model failed');
  assert.deepEqual(
    store.history(began.conversationId, undefined, 10).messages.map((m) => m.text),
    ['hello', 'abcdef', 'again'],
    'a failed task stores no message',
  );

  // A cache hit is stored finished with its question; its boundaries and timings follow.
  const hit = newTaskId();
  const knownReply = { text: 'xyz', finishReason: 'stop' as const, promptTokens: 1, completionTokens: 1 };
  await store.beginChat({ taskId: hit, userId: 'u1', conversationId: undefined, text: 'cached?', knownReply });
  assert.equal(store.task(hit)?.replay, undefined);
  await store.recordReplay(hit, Uint32Array.of(1, 3), timings);
  assert.deepEqual(store.task(hit)?.replay?.deltaEnds, Uint32Array.of(1, 3));
  assert.equal(store.task(hit)?.replay?.cached, true);
});

function openStore(t: { after(fn: () => void): void }) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-store-'));
  const db = new Database(path.join(dir, 'chat.sqlite'));
  migrate(db);
  const store = createChatStore(db);
  t.after(() => {
    store.close();
    db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return store;
}

test('a conversation named by the client is made on first use; another user naming it is refused inside the commit', async (t) => {
  const store = openStore(t);
  const chat = (userId: string, conversationId: string, text: string) =>
    store.beginChat({ taskId: newTaskId(), userId, conversationId, text, createConversation: true });
  const began = await chat('u1', 'chat-1', 'first');
  assert.equal(began.conversationId, 'chat-1');
  assert.equal(store.conversationOwner('chat-1'), 'u1');
  await chat('u1', 'chat-1', 'second');
  await assert.rejects(chat('u2', 'chat-1', 'not yours'), (err: AppError) => err.code === 'forbidden');

  // Two users naming a new id in the same commit: the first one makes it, the second is refused, nothing of its stored.
  const [first, second] = await Promise.allSettled([chat('u1', 'chat-2', 'mine'), chat('u2', 'chat-2', 'mine too')]);
  assert.equal(first.status, 'fulfilled');
  assert.equal(second.status === 'rejected' && (second.reason as AppError).code, 'forbidden');
  assert.equal(store.conversationOwner('chat-2'), 'u1');
  assert.deepEqual(
    store.history('chat-1', undefined, 10).messages.map((m) => m.text),
    ['first', 'second'],
  );
  assert.deepEqual(
    store.history('chat-2', undefined, 10).messages.map((m) => m.text),
    ['mine'],
  );
});

test('a regenerated reply stores no user message; lastUserTurn gives the last user message and the history before it', async (t) => {
  const store = openStore(t);
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
  assert.deepEqual(store.lastUserTurn(conv, 10), {
    messageId: second.messageId,
    text: 'q2',
    context: [
      { role: 'user', content: 'q1' },
      { role: 'assistant', content: 'a1' },
    ],
  });
  assert.deepEqual(store.lastUserTurn(conv, 1)?.context, [{ role: 'assistant', content: 'a1' }]);
  assert.deepEqual(store.lastUserTurn(conv, 0)?.context, []);

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
    store.history(conv, undefined, 10).messages.map((m) => [m.role, m.text]),
    [
      ['user', 'q1'],
      ['assistant', 'a1'],
      ['user', 'q2'],
      ['assistant', 'a2'],
      ['assistant', 'a2 again'],
    ],
  );
  // The regenerated reply is still an answer to q2: it is the last user message, with the same context.
  assert.equal(store.lastUserTurn(conv, 10)?.messageId, second.messageId);
  assert.equal(store.lastUserTurn('no-such-conversation', 10), undefined);
});
