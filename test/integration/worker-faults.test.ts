/**
 * Worker faults with shared workers: several model calls run on one worker
 * (tasksPerWorker), so a worker that dies takes exactly the calls it was
 * running with it (worker_failed); calls on other workers complete; the pool
 * replaces the worker; every task ends with exactly one chat.done or chat.error.
 * Faults are injected through the dev provider (CHATWIRE_DEV_FAULTS).
 */
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { metric, startServer } from '../helpers/server.js';

type Msg = Awaited<ReturnType<WsClient['next']>>;

const LIMITS = { messagesPerSecond: 1_000_000, chatsPerMinute: 1_000_000, modelTokensPerMinute: 1_000_000_000 };

async function send(c: WsClient, text: string, maxTokens?: number): Promise<Msg> {
  const ack = await c.request({ type: 'chat.send', text, cache: 'bypass', ...(maxTokens === undefined ? {} : { params: { maxTokens } }) });
  assert.equal(ack.type, 'chat.ack', JSON.stringify(ack));
  return ack;
}

function terminals(c: WsClient, taskId: unknown): Msg[] {
  return c.received.filter((m) => (m.type === 'chat.done' || m.type === 'chat.error') && m.taskId === taskId);
}

async function storedStatus(c: WsClient, taskId: unknown): Promise<string> {
  const info = await c.request({ type: 'task.get', taskId });
  return (info.task as { status: string }).status;
}

async function history(c: WsClient, conversationId: unknown): Promise<[string, string][]> {
  const h = await c.request({ type: 'conversation.history', conversationId });
  return (h.messages as { role: string; text: string }[]).map((m) => [m.role, m.text]);
}

/** After a worker fault: the pool has a worker again and a fresh chat streams to its end. */
async function assertPoolServes(c: WsClient): Promise<void> {
  const ack = await send(c, 'the pool still serves');
  const { end, text } = await c.collect(ack.taskId as string);
  assert.equal(end.type, 'chat.done');
  assert.equal(text.split(' ').length, 32);
}

for (const fault of ['exit', 'throw'] as const) {
  test(`a worker that ${fault === 'exit' ? 'exits' : 'throws outside a task'} fails every call it was running with worker_failed, and only those`, async (t) => {
    const server = await startServer({ devFaults: true, devTokenDelayMs: 20, workerThreads: 1, tasksPerWorker: 4, ...LIMITS });
    t.after(() => server.close());
    const c = await WsClient.connect(server.ws, { user: `fault-${fault}` });
    // Three calls streaming on the one worker, then the fault lands on it too.
    const sharing = [];
    for (let i = 0; i < 3; i++) {
      const ack = await send(c, `long reply ${i}`, 2000);
      await c.nextOfType('chat.delta', (m) => m.taskId === ack.taskId);
      sharing.push(ack);
    }
    const faulty = await send(c, `/fault ${fault}`);
    for (const ack of [...sharing, faulty]) {
      const { end } = await c.collect(ack.taskId as string);
      assert.equal(end.type, 'chat.error', JSON.stringify(end));
      assert.equal(end.code, 'worker_failed');
      assert.equal(end.retryable, true);
      assert.equal(await storedStatus(c, ack.taskId), 'error');
      // The acknowledged question is stored; no reply is.
      assert.deepEqual(
        (await history(c, ack.conversationId)).map(([role]) => role),
        ['user'],
      );
    }
    await assertPoolServes(c);
    assert.equal(await metric(server, 'chatwire_worker_failures_total'), 4);
    for (const ack of [...sharing, faulty]) assert.equal(terminals(c, ack.taskId).length, 1);
    await c.close();
  });
}

test('a worker that dies does not touch the calls on the other workers: they stream to their end', async (t) => {
  // One call per worker: the running call fills worker A, so the fault can only land on worker B.
  const server = await startServer({ devFaults: true, devTokenDelayMs: 10, workerThreads: 2, tasksPerWorker: 1, ...LIMITS });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'two-workers' });
  const reference = await send(c, 'the survivor', 150);
  const expected = (await c.collect(reference.taskId as string)).text;

  const survivor = await send(c, 'the survivor', 150);
  await c.nextOfType('chat.delta', (m) => m.taskId === survivor.taskId);
  const faulty = await send(c, '/fault exit');
  const failed = await c.collect(faulty.taskId as string);
  assert.equal(failed.end.type, 'chat.error');
  assert.equal(failed.end.code, 'worker_failed');

  const { deltas, text, end } = await c.collect(survivor.taskId as string);
  assert.equal(end.type, 'chat.done');
  assert.equal(end.finishReason, 'length');
  // Whatever the first delta was, the whole reply arrived in order, and it is the one stored.
  const first = c.received.find((m) => m.type === 'chat.delta' && m.taskId === survivor.taskId) as Msg;
  assert.equal(first.seq, 0);
  assert.deepEqual(
    deltas.map((d) => d.seq),
    deltas.map((_, i) => i + 1),
  );
  assert.equal((first.text as string) + text, expected);
  assert.deepEqual(await history(c, survivor.conversationId), [
    ['user', 'the survivor'],
    ['assistant', expected],
  ]);
  await assertPoolServes(c);
  assert.equal(await metric(server, 'chatwire_worker_failures_total'), 1);
  for (const ack of [survivor, faulty]) assert.equal(terminals(c, ack.taskId).length, 1);
  await c.close();
});

test('a worker hung past its deadline is terminated: the calls it held end with worker_failed, calls on the other worker complete', async (t) => {
  // taskTimeoutMs 5000: the hung worker is asked to stop at 5 s and terminated 2 s later.
  const server = await startServer({ devFaults: true, devTokenDelayMs: 0, workerThreads: 2, tasksPerWorker: 2, taskTimeoutMs: 5000, ...LIMITS });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'hang' });
  const hung = await send(c, '/fault hang');
  // Piscina balances by load: with the hung call on one worker, two more calls sent at once put one on each worker.
  // Which one shares the hung worker is not visible to a client, so the check is by outcome: of the calls sent while
  // the worker hangs, those it held fail with worker_failed, all others complete; and some do complete.
  await sleep(1000);
  const during = [];
  for (let i = 0; i < 6; i++) during.push(await send(c, `while one worker hangs ${i}`));
  const outcomes = new Map<string, string>();
  for (const ack of during) {
    const { end, text } = await c.collect(ack.taskId as string);
    if (end.type === 'chat.done') {
      assert.equal(text.split(' ').length, 32);
      outcomes.set(ack.taskId as string, 'done');
    } else {
      assert.equal(end.code, 'worker_failed', JSON.stringify(end));
      outcomes.set(ack.taskId as string, 'worker_failed');
    }
    assert.equal(await storedStatus(c, ack.taskId), end.type === 'chat.done' ? 'done' : 'error');
  }
  const hungEnd = await c.collect(hung.taskId as string);
  assert.equal(hungEnd.end.type, 'chat.error');
  assert.equal(hungEnd.end.code, 'worker_failed');
  assert.match(hungEnd.end.message as string, /deadline; the worker was replaced/);
  const failedWithIt = [...outcomes.values()].filter((o) => o === 'worker_failed').length;
  t.diagnostic(`calls that shared the hung worker: ${failedWithIt} of ${during.length}`);
  // The hung worker takes at most one more call (tasksPerWorker 2); the other worker serves the rest.
  assert.ok(failedWithIt <= 1, `calls failed with the hung worker: ${failedWithIt}`);
  assert.ok([...outcomes.values()].filter((o) => o === 'done').length >= during.length - 1);
  await assertPoolServes(c);
  assert.equal(await metric(server, 'chatwire_worker_failures_total'), 1 + failedWithIt);
  for (const ack of [hung, ...during]) assert.equal(terminals(c, ack.taskId).length, 1);
  await c.close();
});

test('a call on a worker that hangs ends with worker_failed when the worker is terminated', async (t) => {
  const server = await startServer({ devFaults: true, devTokenDelayMs: 0, workerThreads: 1, tasksPerWorker: 2, taskTimeoutMs: 5000, ...LIMITS });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'hang-shared' });
  const hung = await send(c, '/fault hang');
  // Sent a second later, so its own deadline comes after the hung call's: it ends because its worker is terminated.
  await sleep(1000);
  const stuck = await send(c, 'stuck behind the hang');
  for (const ack of [hung, stuck]) {
    const { deltas, end } = await c.collect(ack.taskId as string);
    assert.equal(deltas.length, 0);
    assert.equal(end.type, 'chat.error');
    assert.equal(end.code, 'worker_failed', JSON.stringify(end));
    assert.equal(await storedStatus(c, ack.taskId), 'error');
  }
  await assertPoolServes(c);
  assert.equal(await metric(server, 'chatwire_worker_failures_total'), 2);
  for (const ack of [hung, stuck]) assert.equal(terminals(c, ack.taskId).length, 1);
  await c.close();
});

test('a provider error fails only its own call: the calls sharing its worker complete', async (t) => {
  const server = await startServer({ devFaults: true, devTokenDelayMs: 10, workerThreads: 1, tasksPerWorker: 4, ...LIMITS });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'upstream' });
  const sharing = [];
  for (let i = 0; i < 3; i++) {
    const ack = await send(c, `sharing ${i}`, 60);
    await c.nextOfType('chat.delta', (m) => m.taskId === ack.taskId);
    sharing.push(ack);
  }
  const faulty = await send(c, '/fault upstream');
  const failed = await c.collect(faulty.taskId as string);
  assert.equal(failed.end.type, 'chat.error');
  assert.equal(failed.end.code, 'upstream_error');
  assert.equal(failed.end.retryable, true);
  for (const ack of sharing) {
    const { end } = await c.collect(ack.taskId as string);
    assert.equal(end.type, 'chat.done');
    assert.equal((end.usage as { completionTokens: number }).completionTokens, 60);
  }
  assert.equal(await metric(server, 'chatwire_worker_failures_total'), 0);
  for (const ack of [...sharing, faulty]) assert.equal(terminals(c, ack.taskId).length, 1);
  await c.close();
});
