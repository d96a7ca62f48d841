import assert from 'node:assert/strict';
import { test } from 'node:test';
import { createInlinePool } from '../../src/llm/inline-pool.js';
import type { AppError } from '../../src/protocol/index.js';

function timers(): number {
  return process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
}

test('close: a call whose provider ignores its signal is failed at once and leaves no timer keeping the process alive', async () => {
  const pool = createInlinePool(
    // Never settles and never looks at its signal.
    { streamTo: () => new Promise(() => {}) },
    { threads: 1, tasksPerWorker: 2, maxQueue: 4, maxQueuedPerOwner: 4, taskTimeoutMs: 600_000 },
  );
  const before = timers();
  const errors: AppError[] = [];
  const ended: boolean[] = [];
  const handlers = { onChunk() {}, onEnd: (_r: unknown, cancelled: boolean) => ended.push(cancelled), onError: (e: AppError) => errors.push(e) };
  for (const owner of ['a', 'b', 'c']) pool.reserve(owner).run({ model: 'm', messages: [{ role: 'user', content: 'hi' }] }, handlers);
  assert.equal(pool.stats().running, 2);
  assert.equal(pool.stats().queued, 1);
  assert.ok(timers() >= before + 3);
  await pool.close();
  assert.deepEqual(
    errors.map((e) => [e.code, e.message]),
    Array.from({ length: 3 }, () => ['worker_failed', 'the server is shutting down']),
  );
  assert.deepEqual(ended, []);
  assert.equal(pool.stats().running, 0);
  assert.equal(timers(), before);
});
