import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { it } from 'node:test';
import { startIdempotencyPruning } from '../../src/chat/idempotency.js';
import { IDEMPOTENCY_WINDOW_MS } from '../../src/db/chat-store.js';

/** A store with `rows` expired keys that deletes them as asked. */
function fakeStore(rows: number) {
  const calls: { before: number; limit: number; at: number }[] = [];
  return {
    calls,
    get left() {
      return rows;
    },
    async pruneIdempotencyKeys(before: number, limit: number) {
      calls.push({ before, limit, at: Date.now() });
      const deleted = Math.min(rows, limit);
      rows -= deleted;
      return deleted;
    },
  };
}

it('a pass deletes the keys past the 24-hour window a batch at a time until a batch comes back short', async () => {
  const store = fakeStore(25);
  const pruning = startIdempotencyPruning(store, { batch: 10, everyMs: 60_000 });
  try {
    assert.equal(await pruning.pruneNow(), 25);
  } finally {
    await pruning.stop();
  }
  assert.deepEqual(
    store.calls.map((c) => c.limit),
    [10, 10, 10],
  );
  for (const c of store.calls) assert.ok(Math.abs(c.at - IDEMPOTENCY_WINDOW_MS - c.before) < 50);
  assert.equal(store.left, 0);
});

it('passes run on their interval, never two at once; a failed pass is reported and the next one runs; stop ends them', async () => {
  let calls = 0;
  let running = 0;
  let overlapped = false;
  const errors: unknown[] = [];
  const store = {
    async pruneIdempotencyKeys() {
      calls++;
      running++;
      if (running > 1) overlapped = true;
      await sleep(25);
      running--;
      if (calls === 1) throw new Error('disk full');
      return 0;
    },
  };
  const pruning = startIdempotencyPruning(store, { everyMs: 10, onError: (err) => errors.push(err) });
  await sleep(100);
  await pruning.stop();
  const after = calls;
  assert.ok(after >= 2, `${after} passes`);
  assert.equal(overlapped, false);
  assert.equal(errors.length, 1);
  await sleep(40);
  assert.equal(calls, after);
});
