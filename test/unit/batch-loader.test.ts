import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BatchLoaderClosedError, createBatchLoader } from '../../src/marketplace/batch-loader.js';

function squares() {
  const calls: number[][] = [];
  const loader = createBatchLoader<number, number>({
    batch: (keys) => {
      calls.push([...keys]);
      return keys.map((k) => k * k);
    },
  });
  return { loader, calls };
}

test('loads issued in one tick go to one batch call, deduplicated, each caller getting its own value', async () => {
  const { loader, calls } = squares();
  const results = await Promise.all([loader.load(3), loader.load(4), loader.load(3), loader.loadMany([5, 4, 6])]);
  assert.deepEqual(results, [9, 16, 9, [25, 16, 36]]);
  assert.deepEqual(calls, [[3, 4, 5, 6]]);
  loader.close();
});

test('loads issued in different ticks go to different batch calls', async () => {
  const { loader, calls } = squares();
  assert.equal(await loader.load(2), 4);
  assert.equal(await loader.load(2), 4);
  assert.deepEqual(calls, [[2], [2]]);
  loader.close();
});

test('loads from separate callbacks of one event-loop turn are merged (setImmediate flush)', async () => {
  const { loader, calls } = squares();
  // Two callbacks of one turn stand for two sockets whose frames arrived together. Two immediates queued together
  // run in the same check phase, before any immediate they queue (Node runs those on the next turn); two timers
  // would not do: Node does not promise that timers due in the same millisecond run in the same turn.
  const a = new Promise<number>((resolve) => setImmediate(() => resolve(loader.load(7))));
  const b = new Promise<number>((resolve) => setImmediate(() => resolve(loader.load(8))));
  assert.deepEqual(await Promise.all([a, b]), [49, 64]);
  assert.deepEqual(calls, [[7, 8]]);
  loader.close();
});

test('an Error result fails only its own key', async () => {
  const loader = createBatchLoader<number, string>({
    batch: (keys) => keys.map((k) => (k < 0 ? new RangeError(`negative ${k}`) : `ok ${k}`)),
  });
  const [good, bad, other] = await Promise.allSettled([loader.load(1), loader.load(-1), loader.load(2)]);
  assert.deepEqual(good, { status: 'fulfilled', value: 'ok 1' });
  assert.equal(bad.status, 'rejected');
  assert.equal((bad as PromiseRejectedResult).reason.message, 'negative -1');
  assert.deepEqual(other, { status: 'fulfilled', value: 'ok 2' });
  await assert.rejects(loader.loadMany([3, -5]), { message: 'negative -5' });
  loader.close();
});

test('a throwing batch function rejects every key of that batch, and the next batch runs normally', async () => {
  let fail = true;
  const loader = createBatchLoader<number, number>({
    batch: (keys) => {
      if (fail) throw new Error('database is locked');
      return keys.map((k) => k + 1);
    },
  });
  const settled = await Promise.allSettled([loader.load(1), loader.load(2)]);
  assert.deepEqual(
    settled.map((s) => (s.status === 'rejected' ? (s.reason as Error).message : s.value)),
    ['database is locked', 'database is locked'],
  );
  fail = false;
  assert.deepEqual(await loader.loadMany([1, 2]), [2, 3]);
  loader.close();
});

test('a batch function that returns the wrong number of results rejects the batch', async () => {
  const loader = createBatchLoader<number, number>({ batch: (keys) => keys.slice(1) });
  await assert.rejects(loader.loadMany([1, 2, 3]), { name: 'TypeError', message: 'batch function returned 2 results for 3 keys' });
  loader.close();
});

test('keyOf deduplicates structured keys', async () => {
  const calls: string[][] = [];
  const loader = createBatchLoader<{ a: number; b: string }, string>({
    keyOf: (k) => `${k.a}/${k.b}`,
    batch: (keys) => {
      calls.push(keys.map((k) => `${k.a}/${k.b}`));
      return keys.map((k) => k.b.repeat(k.a));
    },
  });
  assert.deepEqual(await Promise.all([loader.load({ a: 2, b: 'x' }), loader.load({ a: 2, b: 'x' }), loader.load({ a: 1, b: 'y' })]), ['xx', 'xx', 'y']);
  assert.deepEqual(calls, [['2/x', '1/y']]);
  loader.close();
});

test('maxBatchSize splits a big batch into several calls', async () => {
  const calls: number[][] = [];
  const loader = createBatchLoader<number, number>({
    maxBatchSize: 2,
    batch: (keys) => {
      calls.push([...keys]);
      return keys.map((k) => -k);
    },
  });
  assert.deepEqual(await loader.loadMany([1, 2, 3, 4, 5]), [-1, -2, -3, -4, -5]);
  assert.deepEqual(calls, [[1, 2], [3, 4], [5]]);
  loader.close();
});

test('with batching off each call runs its own batch at once, still deduplicating its own keys', async () => {
  const calls: number[][] = [];
  const loader = createBatchLoader<number, number>({
    batching: false,
    batch: (keys) => {
      calls.push([...keys]);
      return keys.map((k) => k * 10);
    },
  });
  const results = await Promise.all([loader.load(1), loader.loadMany([2, 3, 2]), loader.load(1)]);
  assert.deepEqual(results, [10, [20, 30, 20], 10]);
  assert.deepEqual(calls, [[1], [2, 3], [1]]);
  loader.close();
});

test('close rejects queued loads without calling the batch function, and refuses new ones', async () => {
  const { loader, calls } = squares();
  const queued = loader.load(1);
  loader.close();
  await assert.rejects(queued, BatchLoaderClosedError);
  await assert.rejects(loader.load(2), BatchLoaderClosedError);
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(calls, []);
});
