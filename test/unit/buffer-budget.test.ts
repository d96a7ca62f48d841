import assert from 'node:assert/strict';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { test } from 'node:test';
import { createBufferBudget } from '../../src/transport/buffer-budget.js';

/** A socket as the budget sees it: what it holds, and whether it was closed. */
function socketOf(budget: ReturnType<typeof createBufferBudget>, name: string, shed: string[]) {
  const s = { held: 0, handle: null as unknown as ReturnType<typeof budget.open> };
  s.handle = budget.open(
    () => s.held,
    () => shed.push(name),
  );
  return {
    hold(bytes: number) {
      s.held = bytes;
      s.handle.update(bytes);
    },
    drainSilently(bytes: number) {
      s.held = bytes;
    },
    release: () => s.handle.release(),
  };
}

test('past the bound the most backed-up sockets are closed first, until the sum is under it', async () => {
  const budget = createBufferBudget({ maxBufferedBytes: 1000 });
  const shed: string[] = [];
  const [a, b, c, d] = ['a', 'b', 'c', 'd'].map((n) => socketOf(budget, n, shed));
  a!.hold(100);
  b!.hold(400);
  c!.hold(300);
  assert.equal(budget.totalBytes(), 800);
  d!.hold(500);
  assert.equal(budget.totalBytes(), 1300);
  await nextTurn();
  assert.deepEqual(shed, ['d']);
  assert.equal(budget.totalBytes(), 800);
  // A closed socket's reports no longer count; a released one leaves the sum.
  d!.hold(900);
  b!.release();
  assert.equal(budget.totalBytes(), 400);
  assert.equal(budget.shedCount(), 1);
  budget.close();
});

test('sockets that drained without reporting it are measured again before any is closed', async () => {
  const budget = createBufferBudget({ maxBufferedBytes: 1000 });
  const shed: string[] = [];
  const a = socketOf(budget, 'a', shed);
  const b = socketOf(budget, 'b', shed);
  a.hold(900);
  a.drainSilently(0);
  b.hold(600);
  await nextTurn();
  assert.deepEqual(shed, []);
  assert.equal(budget.totalBytes(), 600);
  budget.close();
});
