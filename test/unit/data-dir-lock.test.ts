import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { DataDirInUseError, lockDataDir } from '../../src/db/data-dir-lock.js';

function tempDir(t: { after(fn: () => void): void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-lock-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test('a data dir is held by one lock at a time, in this process or another, until it is released', (t) => {
  const dir = tempDir(t);
  const lock = lockDataDir(dir);
  assert.throws(
    () => lockDataDir(dir),
    (err: Error) => err instanceof DataDirInUseError && err.message.includes('is in use by another chatwire process'),
  );
  // Another process is refused by the kernel's lock.
  const moduleUrl = new URL('../../src/db/data-dir-lock.js', import.meta.url).href;
  const other = spawnSync(
    process.execPath,
    [
      '--input-type=module',
      '-e',
      `const { lockDataDir } = await import(${JSON.stringify(moduleUrl)}); try { lockDataDir(${JSON.stringify(dir)}); console.log('locked'); } catch (err) { console.log(err.name); }`,
    ],
    { encoding: 'utf8' },
  );
  assert.equal(other.stdout.trim(), 'DataDirInUseError', other.stderr);
  lock.release();
  lock.release();
  const again = lockDataDir(dir);
  again.release();
});
