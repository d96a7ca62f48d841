import assert from 'node:assert/strict';
import { test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { startServer } from '../helpers/server.js';

test('chat.cancel mid-stream ends the task with finishReason cancelled and stores the partial text', async (t) => {
  const server = await startServer({ devTokenDelayMs: 20, devFaults: false });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'ann' });
  const ack = await c.request({ type: 'chat.send', text: 'a long answer please', params: { maxTokens: 400 } });
  const seen: string[] = [];
  for (let i = 0; i < 3; i++) seen.push((await c.nextOfType('chat.delta')).text as string);
  const ok = await c.request({ type: 'chat.cancel', taskId: ack.taskId });
  assert.equal(ok.type, 'ok');
  const { deltas, end } = await c.collect(ack.taskId as string);
  assert.equal(end.type, 'chat.done');
  assert.equal(end.finishReason, 'cancelled');
  const text = seen.join('') + deltas.map((d) => d.text).join('');
  assert.ok(text.split(' ').length < 400);
  const history = await c.request({ type: 'conversation.history', conversationId: ack.conversationId });
  const messages = history.messages as { role: string; text: string; messageId: string }[];
  assert.equal(messages.length, 2);
  assert.equal(messages[1]?.role, 'assistant');
  assert.equal(messages[1]?.text, text);
  assert.equal(messages[1]?.messageId, end.messageId);
  const task = await c.request({ type: 'task.get', taskId: ack.taskId });
  assert.equal((task.task as { status: string }).status, 'cancelled');
  // Cancelling a finished task is harmless and ends nothing twice.
  assert.equal((await c.request({ type: 'chat.cancel', taskId: ack.taskId })).type, 'ok');
  await c.close();
  assert.equal(c.received.filter((m) => (m.type === 'chat.done' || m.type === 'chat.error') && m.taskId === ack.taskId).length, 1);
});

test('chat.resume after a dropped connection replays the missing deltas and continues live, with none lost or repeated', async (t) => {
  const server = await startServer({ devTokenDelayMs: 10 });
  t.after(() => server.close());
  const reference = await WsClient.connect(server.ws, { user: 'ref' });
  const refAck = await reference.request({ type: 'chat.send', text: 'resume me', params: { maxTokens: 60 }, cache: 'bypass' });
  const expected = (await reference.collect(refAck.taskId as string)).text;
  await reference.close();

  const first = await WsClient.connect(server.ws, { user: 'ben' });
  const ack = await first.request({ type: 'chat.send', text: 'resume me', params: { maxTokens: 60 }, cache: 'bypass' });
  const got: string[] = [];
  for (let i = 0; i < 5; i++) {
    const d = await first.nextOfType('chat.delta');
    assert.equal(d.seq, i);
    got.push(d.text as string);
  }
  await first.terminate();

  const second = await WsClient.connect(server.ws, { user: 'ben' });
  const ok = await second.request({ type: 'chat.resume', taskId: ack.taskId, fromSeq: got.length });
  assert.equal(ok.type, 'ok');
  const { deltas, end } = await second.collect(ack.taskId as string);
  assert.deepEqual(
    deltas.map((d) => d.seq),
    deltas.map((_, i) => i + got.length),
  );
  assert.equal(end.type, 'chat.done');
  assert.equal(got.join('') + deltas.map((d) => d.text).join(''), expected);
  // A finished task can be resumed from any seq, also from the start.
  const again = await second.request({ type: 'chat.resume', taskId: ack.taskId, fromSeq: 0 });
  assert.equal(again.type, 'ok');
  assert.equal((await second.collect(ack.taskId as string)).text, expected);
  await second.close();
});

test('a worker that dies fails only its own task with worker_failed, and the next chats work', async (t) => {
  const server = await startServer({ devFaults: true, devTokenDelayMs: 5, workerThreads: 1 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'cat' });
  const crash = await c.request({ type: 'chat.send', text: '/fault exit' });
  assert.equal(crash.type, 'chat.ack');
  const { end } = await c.collect(crash.taskId as string);
  assert.equal(end.type, 'chat.error');
  assert.equal(end.code, 'worker_failed');
  assert.equal(end.retryable, true);
  const task = await c.request({ type: 'task.get', taskId: crash.taskId });
  assert.equal((task.task as { status: string }).status, 'error');
  for (let i = 0; i < 3; i++) {
    const ack = await c.request({ type: 'chat.send', text: `after the crash ${i}` });
    const { end: done, text } = await c.collect(ack.taskId as string);
    assert.equal(done.type, 'chat.done');
    assert.equal(text.split(' ').length, 32);
  }
  const metrics = await (await fetch(`${server.http}/metrics`)).text();
  assert.match(metrics, /^chatwire_worker_failures_total 1$/m);
  await c.close();
});

test('a task whose worker throws outside the task ends with worker_failed too', async (t) => {
  const server = await startServer({ devFaults: true, workerThreads: 1 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'dan' });
  const ack = await c.request({ type: 'chat.send', text: '/fault throw' });
  const { end } = await c.collect(ack.taskId as string);
  assert.equal(end.type, 'chat.error');
  assert.equal(end.code, 'worker_failed');
  const next = await c.request({ type: 'chat.send', text: 'still alive?' });
  assert.equal((await c.collect(next.taskId as string)).end.type, 'chat.done');
  await c.close();
});

test('a full queue answers overloaded and stores nothing', async (t) => {
  const server = await startServer({ workerThreads: 1, tasksPerWorker: 1, maxQueue: 1, devTokenDelayMs: 30 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'eve' });
  const a = await c.request({ type: 'chat.send', text: 'first', params: { maxTokens: 50 } });
  const b = await c.request({ type: 'chat.send', text: 'second', params: { maxTokens: 50 } });
  assert.equal(a.type, 'chat.ack');
  assert.equal(b.type, 'chat.ack');
  const refused = await c.request({ type: 'chat.send', id: 'third', text: 'third', params: { maxTokens: 50 } });
  assert.equal(refused.type, 'error');
  assert.equal(refused.id, 'third');
  assert.equal(refused.code, 'overloaded');
  // Nothing was stored for the refused chat: a conversation it named gains no message.
  const into = await c.request({ type: 'chat.send', text: 'fourth', conversationId: a.conversationId, params: { maxTokens: 50 } });
  assert.equal(into.code, 'overloaded');
  await c.collect(a.taskId as string);
  await c.collect(b.taskId as string);
  const history = await c.request({ type: 'conversation.history', conversationId: a.conversationId });
  assert.deepEqual((history.messages as { role: string; text: string }[]).map((m) => m.text).slice(0, 1), ['first']);
  assert.equal((history.messages as unknown[]).length, 2);
  // Once the queue drains, chats are accepted again.
  const later = await c.request({ type: 'chat.send', text: 'later' });
  assert.equal(later.type, 'chat.ack');
  assert.equal((await c.collect(later.taskId as string)).end.type, 'chat.done');
  await c.close();
});

test('every model call counts once in chatwire_model_calls_total', async (t) => {
  const server = await startServer();
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'fay' });
  for (let i = 0; i < 3; i++) {
    const ack = await c.request({ type: 'chat.send', text: `count me ${i}` });
    await c.collect(ack.taskId as string);
  }
  const text = await (await fetch(`${server.http}/metrics`)).text();
  assert.match(text, /^chatwire_model_calls_total 3$/m);
  for (const name of [
    'chatwire_connections',
    'chatwire_frames_in_total',
    'chatwire_frames_out_total',
    'chatwire_ack_latency_seconds_bucket',
    'chatwire_time_to_first_token_seconds_bucket',
    'chatwire_tokens_streamed_total',
    'chatwire_queue_depth',
    'chatwire_worker_failures_total',
  ]) {
    assert.ok(text.includes(name), `metrics lack ${name}`);
  }
  assert.match(text, /^chatwire_tokens_streamed_total 96$/m);
  await c.close();
});

test('restarting on the same data dir keeps the history', async (t) => {
  const first = await startServer();
  const c = await WsClient.connect(first.ws, { user: 'gus' });
  const ack = await c.request({ type: 'chat.send', text: 'remember me' });
  const { text } = await c.collect(ack.taskId as string);
  await c.close();
  await first.stop();

  const second = await startServer({}, first.dataDir);
  t.after(() => second.close());
  const d = await WsClient.connect(second.ws, { user: 'gus' });
  const history = await d.request({ type: 'conversation.history', conversationId: ack.conversationId });
  assert.deepEqual(
    (history.messages as { text: string }[]).map((m) => m.text),
    ['remember me', text],
  );
  const task = await d.request({ type: 'task.get', taskId: ack.taskId });
  assert.equal((task.task as { status: string; text: string }).status, 'done');
  assert.equal((task.task as { text: string }).text, text);
  await d.close();
});

test('task.get says queued while a chat waits for a worker and running once a worker has started it, before its first token', async (t) => {
  // One worker that runs one call at a time, and a first token a minute away: nothing here races the tokens.
  const server = await startServer({ devTokenDelayMs: 60_000, workerThreads: 1, tasksPerWorker: 1 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'status' });
  const first = await c.request({ type: 'chat.send', text: 'first in line', cache: 'bypass' });
  const second = await c.request({ type: 'chat.send', text: 'second in line', cache: 'bypass' });
  const status = async (taskId: unknown) => (await c.request({ type: 'task.get', taskId })).task as { status: string; seq: number; text: string };

  // The worker's start reaches the main thread a moment after the ack.
  const deadline = Date.now() + 20_000;
  let running = await status(first.taskId);
  while (running.status === 'queued' && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 10));
    running = await status(first.taskId);
  }
  assert.deepEqual(running, { ...running, status: 'running', seq: 0, text: '' });
  assert.equal((await status(second.taskId)).status, 'queued');

  // Cancelled while waiting: it never ran.
  await c.request({ type: 'chat.cancel', taskId: second.taskId });
  assert.equal((await c.collect(second.taskId as string)).end.finishReason, 'cancelled');
  assert.equal((await status(second.taskId)).status, 'cancelled');
  await c.request({ type: 'chat.cancel', taskId: first.taskId });
  assert.equal((await c.collect(first.taskId as string)).end.finishReason, 'cancelled');
  await c.close();
});
