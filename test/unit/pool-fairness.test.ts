/**
 * The model pool's own queue, with real workers running the dev provider: waiting users are served round-robin,
 * and no user holds more than its share of the queue.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { loadConfig } from '../../src/config.js';
import { createModelPool, type ModelPool, type ModelRun } from '../../src/llm/pool.js';
import { providerSettingsFrom, type ModelRequest } from '../../src/llm/provider.js';
import { AppError } from '../../src/protocol/index.js';

const settings = providerSettingsFrom(loadConfig({}, { devTokenDelayMs: 5 }));
const request = (text: string, maxTokens = 3): ModelRequest => ({ model: 'dev-1', messages: [{ role: 'user', content: text }], maxTokens });

interface Started {
  run: ModelRun;
  /** Resolves when a worker starts the call. */
  started: Promise<void>;
  /** Resolves with how the call ended. */
  ended: Promise<string>;
}

/** Reserves and runs one call of `owner`; `order` gets its name when a worker starts it. */
function start(pool: ModelPool, owner: string, name: string, order: string[], maxTokens?: number): Started {
  const slot = pool.reserve(owner);
  let run!: ModelRun;
  let onStarted!: () => void;
  const started = new Promise<void>((resolve) => {
    onStarted = resolve;
  });
  const ended = new Promise<string>((resolve) => {
    run = slot.run(request(name, maxTokens), {
      onStart: () => {
        order.push(name);
        onStarted();
      },
      onChunk: () => {},
      onEnd: (_result, cancelled) => resolve(cancelled ? 'cancelled' : 'done'),
      onError: (e) => resolve(`${e.code}: ${e.message}`),
    });
  });
  return { run, started, ended };
}

function refusal(fn: () => unknown): AppError {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof AppError, String(err));
    return err;
  }
  assert.fail('expected a refusal');
}

// One worker running one call at a time: the order in which calls start is the order the pool hands them out.
let pool: ModelPool;
before(() => {
  pool = createModelPool({ settings, threads: 1, tasksPerWorker: 1, maxQueue: 64, maxQueuedPerOwner: 8, taskTimeoutMs: 60_000 });
});
after(() => pool.close());

test('a user with one call waiting is served after one call of the user with many, not after all of them', async () => {
  const order: string[] = [];
  const calls = [start(pool, 'hog', 'hog0', order)];
  for (let i = 1; i <= 5; i++) calls.push(start(pool, 'hog', `hog${i}`, order));
  calls.push(start(pool, 'one', 'one0', order));
  assert.deepEqual(await Promise.all(calls.map((c) => c.ended)), new Array(7).fill('done'));
  assert.deepEqual(order, ['hog0', 'hog1', 'one0', 'hog2', 'hog3', 'hog4', 'hog5']);
});

test('three users waiting take turns, each in its own order', async () => {
  const order: string[] = [];
  const calls = [start(pool, 'x', 'x0', order)];
  for (const [owner, n] of [
    ['a', 3],
    ['b', 2],
    ['c', 1],
  ] as const) {
    for (let i = 0; i < n; i++) calls.push(start(pool, owner, `${owner}${i}`, order));
  }
  await Promise.all(calls.map((c) => c.ended));
  assert.deepEqual(order, ['x0', 'a0', 'b0', 'c0', 'a1', 'b1', 'a2']);
});

test('past maxQueuedPerOwner waiting calls a user is refused with rate_limited and a retry estimate; other users are not', async () => {
  let refusals = 0;
  const small = createModelPool({
    settings,
    threads: 1,
    tasksPerWorker: 1,
    maxQueue: 4,
    maxQueuedPerOwner: 2,
    taskTimeoutMs: 60_000,
    hooks: { onOwnerQueueFull: () => refusals++ },
  });
  try {
    const order: string[] = [];
    // 4096 tokens at 5 ms: the running call holds the only slot for the whole test.
    const running = start(small, 'a', 'a-running', order, 4096);
    await running.started;
    const waiting = [start(small, 'a', 'a0', order), start(small, 'a', 'a1', order)];
    const refused = refusal(() => small.reserve('a'));
    assert.equal(refused.code, 'rate_limited');
    assert.equal(refused.status, 429);
    assert.ok(refused.retryAfterMs !== undefined && refused.retryAfterMs >= 1 && refused.retryAfterMs <= 60_000, String(refused.retryAfterMs));
    assert.equal(refused.message, `2 of your chats are waiting for a worker (at most 2); retry in ${refused.retryAfterMs} ms`);
    assert.equal(refusals, 1);

    // A place reserved and not run yet counts as waiting; released unused, it is free again.
    const b0 = small.reserve('b');
    const b1 = small.reserve('b');
    assert.equal(refusal(() => small.reserve('b')).code, 'rate_limited');
    b1.release();
    const b2 = small.reserve('b');
    // The pool is full (1 running, 4 waiting or reserved): now a user under its share gets overloaded.
    assert.equal(refusal(() => small.reserve('c')).code, 'overloaded');
    b0.release();
    b2.release();

    // A waiting call that is cancelled leaves the queue at once: its user may queue another.
    waiting[0]!.run.cancel();
    assert.equal(await waiting[0]!.ended, 'cancelled');
    const again = start(small, 'a', 'a2', order);
    assert.equal(refusal(() => small.reserve('a')).code, 'rate_limited');
    assert.equal(refusals, 3);
    assert.deepEqual(small.stats(), { threads: 1, running: 1, queued: 2, inFlight: 3, capacity: 5 });

    // Closing the pool ends the waiting calls too: none is left without an end.
    await small.close();
    assert.equal(await waiting[1]!.ended, 'worker_failed: the server is shutting down');
    assert.equal(await again.ended, 'worker_failed: the server is shutting down');
    assert.equal(await running.ended, 'worker_failed: the server is shutting down');
    assert.deepEqual(order, ['a-running']);
  } finally {
    await small.close();
  }
});
