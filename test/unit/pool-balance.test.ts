import assert from 'node:assert/strict';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { it } from 'node:test';
import { packingBalancer, workerBalance } from '../../src/llm/pool.js';

type Worker = Parameters<ReturnType<typeof packingBalancer>>[1][number];
const worker = (id: number, currentUsage: number, flags: Partial<Worker> = {}): Worker =>
  ({ id, currentUsage, isRunningAbortableTask: false, terminating: false, destroyed: false, histogram: null, ...flags }) as Worker;
const task = {} as Parameters<ReturnType<typeof packingBalancer>>[0];

/** Hands one call to the balancer's pick, as Piscina does (the worker's usage goes up), and returns its id. */
function hand(pick: ReturnType<typeof packingBalancer>, workers: Worker[]): number | null {
  const w = pick(task, workers);
  if (w) w.currentUsage++;
  return w?.id ?? null;
}

it('pack: calls arriving one turn apart go to the busiest worker with room, so one worker fills before the next takes any', async () => {
  const pick = packingBalancer(4);
  const workers = [worker(1, 0), worker(2, 0)];
  const chosen: (number | null)[] = [];
  for (let i = 0; i < 6; i++) {
    chosen.push(hand(pick, workers));
    await nextTurn();
  }
  assert.deepEqual(chosen, [1, 1, 1, 1, 2, 2]);
  // Both full: no worker (Piscina keeps the task queued).
  workers[1]!.currentUsage = 4;
  assert.equal(pick(task, workers), null);
  await nextTurn();
  // A call ends on the first: the next goes there, the busiest with room.
  workers[0]!.currentUsage = 3;
  workers[1]!.currentUsage = 2;
  assert.equal(pick(task, workers)?.id, 1);
});

it('pack: calls arriving in one turn (a burst) are spread, each worker starting its share at once', async () => {
  const pick = packingBalancer(64);
  const workers = [worker(1, 5), worker(2, 0)];
  const burst = Array.from({ length: 6 }, () => hand(pick, workers));
  // The busiest first, then the other, then the least busy each time.
  assert.deepEqual(burst, [1, 2, 2, 2, 2, 2]);
  assert.deepEqual(
    workers.map((w) => w.currentUsage),
    [6, 5],
  );
  // The next turn packs again.
  await nextTurn();
  assert.equal(hand(pick, workers), 1);
});

it('pack: a worker being terminated, destroyed or running an abortable task takes no call', () => {
  const pick = packingBalancer(4);
  assert.equal(pick(task, [worker(1, 3, { terminating: true }), worker(2, 0)])?.id, 2);
  assert.equal(pick(task, [worker(1, 3, { destroyed: true }), worker(2, 1)])?.id, 2);
  assert.equal(pick(task, [worker(1, 3, { isRunningAbortableTask: true }), worker(2, 1)])?.id, 2);
  assert.equal(pick(task, [worker(1, 0, { terminating: true })]), null);
});

it('auto packs the calls of the openai relay and spreads the others (local, dev); a setting overrides it', () => {
  assert.equal(workerBalance('auto', 'openai'), 'pack');
  assert.equal(workerBalance('auto', 'dev'), 'spread');
  assert.equal(workerBalance('auto', 'local'), 'spread');
  assert.equal(workerBalance('spread', 'openai'), 'spread');
  assert.equal(workerBalance('pack', 'local'), 'pack');
});
