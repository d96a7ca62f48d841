/**
 * Model calls waiting for a worker: a call cancelled while it still waits
 * must not run later for nobody and hold the worker from the calls behind it
 * (the worker that picks it up is told to stop at once), and a call that ends
 * while it waits (cancelled, or past its deadline) gives its place in the
 * queue back at once: the chats admitted in its place are queued, neither
 * refused as overloaded nor failed as worker_failed.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { metric, startServer } from '../helpers/server.js';

type Msg = Awaited<ReturnType<WsClient['next']>>;

const LIMITS = { messagesPerSecond: 1_000_000, chatsPerMinute: 1_000_000, modelTokensPerMinute: 1_000_000_000 };

test('a call cancelled while it waits for a worker never runs: the worker goes on to the call behind it', { timeout: 60_000 }, async (t) => {
  // One worker running one call at a time, 50 ms a token: the waiting call, if it ran, would hold the worker
  // for 4096 tokens (over three minutes) and the test would time out.
  const server = await startServer({ devTokenDelayMs: 50, workerThreads: 1, tasksPerWorker: 1, ...LIMITS });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'queue' });
  const send = async (text: string, maxTokens: number) => {
    const ack = await c.request({ type: 'chat.send', text, cache: 'bypass', params: { maxTokens } });
    assert.equal(ack.type, 'chat.ack', JSON.stringify(ack));
    return ack.taskId as string;
  };

  const running = await send('the call on the worker', 20);
  await c.nextOfType('chat.delta', (m) => m.taskId === running);
  const waiting = await send('the call that waits', 4096);
  const behind = await send('the call behind it', 5);
  assert.equal((await c.request({ type: 'chat.cancel', taskId: waiting })).type, 'ok');

  const cancelled = await c.collect(waiting);
  assert.equal(cancelled.end.type, 'chat.done');
  assert.equal(cancelled.end.finishReason, 'cancelled');
  assert.equal(cancelled.text, '');

  const first = await c.collect(running);
  assert.equal(first.end.type, 'chat.done');
  assert.equal(first.text.split(' ').length, 20);
  const last = await c.collect(behind);
  assert.equal(last.end.type, 'chat.done', JSON.stringify(last.end));
  assert.equal(last.end.finishReason, 'length');
  assert.equal(last.text.split(' ').length, 5);
});

/** The frames a task got after its ack: its deltas and its end. */
function framesOf(c: WsClient, taskId: string): Msg[] {
  return c.received.filter((m) => m.taskId === taskId && m.type !== 'chat.ack');
}

test('chats cancelled while they wait for a worker give their place back at once: as many new chats are admitted', { timeout: 60_000 }, async (t) => {
  // One worker running one call at a time, and room for two waiting: three chats in flight at most.
  const server = await startServer({ devTokenDelayMs: 50, workerThreads: 1, tasksPerWorker: 1, maxQueue: 2, ...LIMITS });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'queue-cancel' });
  const trySend = (text: string, maxTokens: number) => c.request({ type: 'chat.send', text, cache: 'bypass', params: { maxTokens } });
  const send = async (text: string, maxTokens: number) => {
    const ack = await trySend(text, maxTokens);
    assert.equal(ack.type, 'chat.ack', JSON.stringify(ack));
    return ack.taskId as string;
  };
  const assertFull = async () => {
    const refused = await trySend('one too many', 5);
    assert.equal(refused.type, 'error', JSON.stringify(refused));
    assert.equal(refused.code, 'overloaded');
  };

  // 4096 tokens at 50 ms a token: a call that ran for nobody would hold the worker past the test's timeout.
  const running = await send('the call on the worker', 4096);
  await c.nextOfType('chat.delta', (m) => m.taskId === running);
  const waiting = [await send('waits then gives up 0', 4096), await send('waits then gives up 1', 4096)];
  await assertFull();

  for (const taskId of waiting) {
    assert.equal((await c.request({ type: 'chat.cancel', taskId })).type, 'ok');
    const { end, text } = await c.collect(taskId);
    assert.equal(end.type, 'chat.done', JSON.stringify(end));
    assert.equal(end.finishReason, 'cancelled');
    assert.equal(text, '');
  }
  // The two places are free again, and only those two: the queue is bounded as before.
  const admitted = [await send('admitted in a freed place 0', 5), await send('admitted in a freed place 1', 5)];
  await assertFull();
  // The cancelled calls are not counted: in flight are the running call and the two admitted ones, which wait.
  assert.equal(await metric(server, 'chatwire_model_calls_in_flight'), 3);
  assert.equal(await metric(server, 'chatwire_queue_depth'), 2);

  // The worker is freed; it stops each cancelled call it picks up at once and goes on to the admitted ones.
  assert.equal((await c.request({ type: 'chat.cancel', taskId: running })).type, 'ok');
  assert.equal((await c.collect(running)).end.finishReason, 'cancelled');
  for (const taskId of admitted) {
    const { end, text } = await c.collect(taskId);
    assert.equal(end.type, 'chat.done', JSON.stringify(end));
    assert.equal(end.finishReason, 'length');
    assert.equal(text.split(' ').length, 5);
  }
  // Nothing reached the client for the cancelled calls after their chat.done, though a worker picked them up before
  // the admitted ones (the frames of one socket arrive in order).
  for (const taskId of waiting)
    assert.deepEqual(
      framesOf(c, taskId).map((m) => m.type),
      ['chat.done'],
    );
  await c.close();
});

test('chats that pass their deadline while they wait for a worker give their place back: the chats admitted in their place are queued, not failed', {
  timeout: 60_000,
}, async (t) => {
  // taskTimeoutMs 1000: a call is asked to stop 1 s after it was queued, and its worker is terminated 2 s later.
  const server = await startServer({ devFaults: true, devTokenDelayMs: 0, workerThreads: 1, tasksPerWorker: 1, maxQueue: 2, taskTimeoutMs: 1000, ...LIMITS });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'queue-deadline' });
  const send = async (text: string) => {
    const ack = await c.request({ type: 'chat.send', text, cache: 'bypass' });
    assert.equal(ack.type, 'chat.ack', JSON.stringify(ack));
    return ack.taskId as string;
  };

  // Sent together (one call's deadline timers right after the other's): a call that hangs its worker, and two that
  // wait behind it. The first is terminated at its deadline; the two pass theirs before a new worker can start them.
  // The second would hang the worker that picks it up, which is terminated in turn.
  const texts = ['/fault hang', '/fault hang', 'queued behind the hangs'];
  for (const [i, text] of texts.entries()) c.send({ type: 'chat.send', id: `burst${i}`, text, cache: 'bypass' });
  const burst: string[] = [];
  for (let i = 0; i < texts.length; i++) {
    const ack = await c.next((m) => m.id === `burst${i}`);
    assert.equal(ack.type, 'chat.ack', JSON.stringify(ack));
    burst.push(ack.taskId as string);
  }
  const [hung, ...timedOut] = burst as [string, ...string[]];
  const hungEnd = (await c.collect(hung)).end;
  assert.equal(hungEnd.code, 'worker_failed', JSON.stringify(hungEnd));
  for (const taskId of timedOut) {
    const { end, text } = await c.collect(taskId);
    assert.equal(end.type, 'chat.error', JSON.stringify(end));
    assert.equal(end.code, 'upstream_timeout');
    assert.equal(text, '');
  }

  // Their places are free at once, though their tasks still wait for a worker: the queue takes three chats again,
  // twice over. Behind the hanging call these pass their deadline too, or run once a worker is free; none is
  // refused by the worker pool.
  for (let round = 0; round < 2; round++) {
    const admitted = [await send(`round ${round} chat 0`), await send(`round ${round} chat 1`), await send(`round ${round} chat 2`)];
    for (const taskId of admitted) {
      const { end } = await c.collect(taskId);
      if (end.type === 'chat.error') assert.equal(end.code, 'upstream_timeout', JSON.stringify(end));
      else assert.equal(end.type, 'chat.done', JSON.stringify(end));
    }
  }
  const last = await send('after the overload');
  const { end, text } = await c.collect(last);
  assert.equal(end.type, 'chat.done', JSON.stringify(end));
  assert.equal(text.split(' ').length, 32);
  // Only the call that hung its worker failed with it.
  assert.equal(await metric(server, 'chatwire_worker_failures_total'), 1);
  for (const taskId of [...burst, last]) assert.equal(framesOf(c, taskId).filter((m) => m.type === 'chat.done' || m.type === 'chat.error').length, 1);
  await c.close();
});
