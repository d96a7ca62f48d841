import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { startCheckpointer } from '../../src/db/checkpointer.js';
import { Database } from '../../src/db/database.js';

function tempDb(): { db: Database; dir: string } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-ckpt-'));
  const db = new Database(path.join(dir, 'test.sqlite'));
  db.raw.exec('CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL) STRICT');
  return { db, dir };
}

const quiet = () => {};

test('commits no longer checkpoint the WAL themselves; the checkpoint thread copies it into the database', async (t) => {
  const { db, dir } = tempDb();
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  let copied = 0;
  const checkpointer = startCheckpointer(db, { intervalMs: 20, log: quiet, onCheckpoint: (frames) => (copied += frames) });
  assert.equal(db.raw.pragma('wal_autocheckpoint', { simple: true }), 0);
  const insert = db.raw.prepare('INSERT INTO t (body) VALUES (?)');
  // Well past the 1000 pages at which a commit would have checkpointed on its own.
  for (let i = 0; i < 300; i++) db.transaction(() => insert.run('x'.repeat(20_000)));
  const deadline = Date.now() + 10_000;
  while (copied === 0 && Date.now() < deadline) await sleep(20);
  assert.ok(copied > 0, 'the thread reported checkpointed frames');
  await checkpointer.close();
  db.close();
  // Everything committed is there after the last checkpoint and close.
  const reopened = new Database(path.join(dir, 'test.sqlite'), { readonly: true });
  assert.equal((reopened.raw.prepare('SELECT count(*) AS n FROM t').get() as { n: number }).n, 300);
  reopened.close();
});

test('the WAL stays bounded under steady writes', async (t) => {
  const { db, dir } = tempDb();
  const limit = 2 * 1024 * 1024;
  // Counted so that each round waits for the thread to have run after its writes: the bound is what the thread
  // keeps, and on a loaded machine the thread may simply not have been scheduled yet 15 ms after a write.
  let checkpoints = 0;
  const checkpointer = startCheckpointer(db, { intervalMs: 10, walSizeLimitBytes: limit, log: quiet, onCheckpoint: () => checkpoints++ });
  t.after(async () => {
    await checkpointer.close();
    db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const insert = db.raw.prepare('INSERT INTO t (body) VALUES (?)');
  let maxWal = 0;
  for (let round = 0; round < 40; round++) {
    for (let i = 0; i < 10; i++) db.transaction(() => insert.run('y'.repeat(10_000)));
    const seen = checkpoints;
    const deadline = Date.now() + 10_000;
    while (checkpoints === seen && Date.now() < deadline) await sleep(5);
    assert.ok(checkpoints > seen, `round ${round}: the checkpoint thread ran within 10 s of the writes`);
    maxWal = Math.max(maxWal, fs.statSync(`${db.file}-wal`).size);
  }
  // 4 MB written in all: without checkpoints the WAL would hold every page of it.
  assert.ok(maxWal < 3 * 1024 * 1024, `WAL grew to ${maxWal} bytes`);
});
