import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { it } from 'node:test';
import { staleTaskSweep } from '../../src/cluster/wiring.js';

it('every node ends, at each sweep, the tasks begun more than twice the call deadline plus a minute ago, counting and logging them', async () => {
  const calls: { createdBefore: number; code: string; at: number }[] = [];
  let answer: string[] = ['task-1', 'task-2'];
  const store = {
    async failStale(createdBefore: number, code: string) {
      calls.push({ createdBefore, code, at: Date.now() });
      const ended = answer;
      answer = [];
      return ended;
    },
  };
  let counted = 0;
  const lines: unknown[] = [];
  const timer = staleTaskSweep(
    store,
    10_000,
    {
      nodesLost: {
        inc: (n = 1) => {
          counted += n;
        },
      },
    } as never,
    { warn: (obj: unknown) => void lines.push(obj) } as never,
    20,
  );
  try {
    await sleep(90);
  } finally {
    clearInterval(timer);
  }
  assert.ok(calls.length >= 2, `swept ${calls.length} times`);
  for (const c of calls) {
    assert.equal(c.code, 'node_lost');
    // 2 x 10 s + 60 s before the sweep.
    assert.ok(Math.abs(c.at - 80_000 - c.createdBefore) < 50, `cutoff ${c.at - c.createdBefore} ms before the sweep`);
  }
  // Counted once, logged once: later sweeps found nothing.
  assert.equal(counted, 2);
  assert.equal(lines.length, 1);
});

it('a sweep that fails (PostgreSQL unreachable) is retried by the next, and never overlaps a sweep still running', async () => {
  let running = 0;
  let overlapped = false;
  let calls = 0;
  const store = {
    async failStale() {
      calls++;
      running++;
      if (running > 1) overlapped = true;
      await sleep(35);
      running--;
      if (calls === 1) throw new Error('connect ECONNREFUSED');
      return [];
    },
  };
  const timer = staleTaskSweep(store, 1000, { nodesLost: { inc: () => {} } } as never, { warn: () => {} } as never, 10);
  try {
    await sleep(120);
  } finally {
    clearInterval(timer);
  }
  assert.ok(calls >= 2, `swept ${calls} times`);
  assert.equal(overlapped, false);
});
