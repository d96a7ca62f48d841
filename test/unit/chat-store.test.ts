import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { createChatStore, newTaskId } from '../../src/db/chat-store.js';
import { Database } from '../../src/db/database.js';
import { migrate } from '../../src/db/migrate.js';

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
