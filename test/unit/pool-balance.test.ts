import assert from 'node:assert/strict';
import { it } from 'node:test';
import { packingBalancer, workerBalance } from '../../src/llm/pool.js';

type Worker = Parameters<ReturnType<typeof packingBalancer>>[1][number];
const worker = (id: number, currentUsage: number, flags: Partial<Worker> = {}): Worker =>
  ({ id, currentUsage, isRunningAbortableTask: false, terminating: false, destroyed: false, histogram: null, ...flags }) as Worker;
const task = {} as Parameters<ReturnType<typeof packingBalancer>>[0];

it('pack: a call goes to the busiest worker with room, so one worker fills before the next takes any', () => {
  const pick = packingBalancer(4);
  const workers = [worker(1, 0), worker(2, 0)];
  const chosen: number[] = [];
  for (let i = 0; i < 6; i++) {
    const w = pick(task, workers);
    assert.ok(w);
    chosen.push(w.id);
    w.currentUsage++;
  }
  assert.deepEqual(chosen, [1, 1, 1, 1, 2, 2]);
  // Both full: no worker (Piscina keeps the task queued).
  workers[1]!.currentUsage = 4;
  assert.equal(pick(task, workers), null);
  // A call ends on the first: the next goes there, the busiest with room.
  workers[0]!.currentUsage = 3;
  workers[1]!.currentUsage = 2;
  assert.equal(pick(task, workers)?.id, 1);
});

it('pack: a worker being terminated, destroyed or running an abortable task takes no call', () => {
  const pick = packingBalancer(4);
  assert.equal(pick(task, [worker(1, 3, { terminating: true }), worker(2, 0)])?.id, 2);
  assert.equal(pick(task, [worker(1, 3, { destroyed: true }), worker(2, 1)])?.id, 2);
  assert.equal(pick(task, [worker(1, 3, { isRunningAbortableTask: true }), worker(2, 1)])?.id, 2);
  assert.equal(pick(task, [worker(1, 0, { terminating: true })]), null);
});

it('auto packs the calls of a relay (openai, dev) and spreads those of a local model; a setting overrides it', () => {
  assert.equal(workerBalance('auto', 'openai'), 'pack');
  assert.equal(workerBalance('auto', 'dev'), 'pack');
  assert.equal(workerBalance('auto', 'local'), 'spread');
  assert.equal(workerBalance('spread', 'openai'), 'spread');
  assert.equal(workerBalance('pack', 'local'), 'pack');
});
