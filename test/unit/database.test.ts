import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { Database } from '../../src/db/database.js';

test('pluck statements return their one column on get as on all, and count every execution', (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-db-'));
  const ops: string[] = [];
  const db = new Database(path.join(dir, 'test.sqlite'), { onQuery: (op) => ops.push(op) });
  t.after(() => {
    db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  db.raw.exec(`CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL) STRICT;
    INSERT INTO t (id, name) VALUES (1, 'a "quoted" \\ name'), (2, 'zwei ü');`);
  const rows = db.prepare<string>('t.rows', 'SELECT json_array(id, name) FROM t WHERE id >= ? ORDER BY id', { pluck: true });
  assert.deepEqual(rows.all(1), ['[1,"a \\"quoted\\" \\\\ name"]', '[2,"zwei ü"]']);
  assert.deepEqual(
    rows.all(1).map((row) => JSON.parse(row) as unknown),
    [
      [1, 'a "quoted" \\ name'],
      [2, 'zwei ü'],
    ],
  );
  assert.equal(rows.get(2), '[2,"zwei ü"]');
  assert.equal(rows.get(3), undefined);
  assert.deepEqual(ops, ['t.rows', 't.rows', 't.rows', 't.rows']);
});
