/**
 * Model calls waiting for a worker: a call cancelled while it still waits
 * must not run later for nobody and hold the worker from the calls behind it
 * (the worker that picks it up is told to stop at once).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { startServer } from '../helpers/server.js';

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
