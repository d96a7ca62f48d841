import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { metric, startServer } from '../helpers/server.js';

type Msg = Awaited<ReturnType<WsClient['next']>>;

function assertContiguous(deltas: Msg[], from = 0): void {
  assert.deepEqual(
    deltas.map((d) => d.seq),
    deltas.map((_, i) => i + from),
  );
}

const texts = (deltas: Msg[]) => deltas.map((d) => d.text as string);

test('50 identical chats in flight at once make one model call, and every client gets the whole reply with its own task and seq', async (t) => {
  const server = await startServer({ devTokenDelayMs: 10 });
  t.after(() => server.close());
  const clients = await Promise.all(Array.from({ length: 50 }, (_, i) => WsClient.connect(server.ws, { user: `crowd-${i}` })));
  t.after(() => Promise.all(clients.map((c) => c.close())));
  const body = { type: 'chat.send', text: 'Who can repair a garden fence this week?', params: { maxTokens: 64 } };

  const acks = await Promise.all(clients.map((c) => c.request(body)));
  assert.ok(acks.every((a) => a.type === 'chat.ack'));
  assert.equal(new Set(acks.map((a) => a.taskId)).size, 50);
  const replies = await Promise.all(clients.map((c, i) => c.collect(acks[i]?.taskId as string)));

  const reference = texts(replies[0]?.deltas ?? []);
  assert.equal(reference.join('').split(' ').length, 64);
  for (const [i, r] of replies.entries()) {
    assertContiguous(r.deltas);
    assert.deepEqual(texts(r.deltas), reference, `client ${i} got the same chunks`);
    assert.equal(r.end.type, 'chat.done');
    assert.equal(r.end.taskId, acks[i]?.taskId);
    assert.equal(r.end.finishReason, 'length');
  }
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 1);
  const joins = await metric(server, 'chatwire_singleflight_joins_total');
  const hits = await metric(server, 'chatwire_cache_hits_total');
  // Every chat but the first shared the call: by joining it, or (had it already ended) from the cache.
  assert.equal(joins + hits, 49);
  assert.equal(acks.filter((a) => a.status === 'queued').length, 1 + joins);

  // Every subscriber's reply is stored in its own conversation.
  const history = await clients[7]?.request({ type: 'conversation.history', conversationId: acks[7]?.conversationId });
  assert.deepEqual(
    (history?.messages as { text: string }[] | undefined)?.map((m) => m.text),
    [body.text, reference.join('')],
  );
});

test('a chat that joins a call in flight gets the deltas so far at once, then the live ones', async (t) => {
  const server = await startServer({ devTokenDelayMs: 20 });
  t.after(() => server.close());
  const early = await WsClient.connect(server.ws, { user: 'early' });
  const late = await WsClient.connect(server.ws, { user: 'late' });
  t.after(() => Promise.all([early.close(), late.close()]));
  const body = { type: 'chat.send', text: 'Walk me through a kitchen renovation', params: { maxTokens: 100 } };

  const ackEarly = await early.request(body);
  const seen: Msg[] = [];
  for (let i = 0; i < 5; i++) seen.push(await early.nextOfType('chat.delta'));

  const ackLate = await late.request(body);
  assert.equal(ackLate.status, 'queued');
  assert.notEqual(ackLate.taskId, ackEarly.taskId);
  // By the time the ack is out, the late task already holds what the call had produced, and it is still running.
  const info = (await late.request({ type: 'task.get', taskId: ackLate.taskId })).task as { status: string; seq: number };
  assert.equal(info.status, 'running');
  assert.ok(info.seq >= 5, `the late task starts with the ${info.seq} deltas produced so far`);

  const restEarly = await early.collect(ackEarly.taskId as string);
  const all = [...seen, ...restEarly.deltas];
  assertContiguous(all);
  assert.ok(info.seq < all.length, 'more deltas came live after the join');
  const lateReply = await late.collect(ackLate.taskId as string);
  // The task.get request above skipped over the deltas that came before its reply: take them all from the record.
  const lateDeltas = late.received.filter((m) => m.type === 'chat.delta' && m.taskId === ackLate.taskId);
  assertContiguous(lateDeltas);
  assert.deepEqual(texts(lateDeltas), texts(all));
  const taskReplyAt = late.received.findIndex((m) => m.type === 'task');
  assert.ok(late.received.slice(0, taskReplyAt).filter((m) => m.type === 'chat.delta').length >= 5, 'the deltas so far came before the task reply');
  assert.equal(lateReply.end.type, 'chat.done');
  assert.equal(lateReply.end.cached, false);
  assert.equal(lateReply.end.finishReason, 'length');
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 1);
  assert.equal(await metric(server, 'chatwire_singleflight_joins_total'), 1);
});

test('one subscriber cancelling ends only its own task; the others stream to the end and the reply is cached', async (t) => {
  const server = await startServer({ devTokenDelayMs: 20 });
  t.after(() => server.close());
  const [a, b, c, d] = await Promise.all(['ca', 'cb', 'cc', 'cd'].map((user) => WsClient.connect(server.ws, { user })));
  t.after(() => Promise.all([a, b, c, d].map((x) => x?.close())));
  if (!a || !b || !c || !d) throw new Error('connect failed');
  const body = { type: 'chat.send', text: 'Plan a garden makeover for me', params: { maxTokens: 60 } };
  const [ackA, ackB, ackC] = await Promise.all([a, b, c].map((x) => x.request(body)));
  if (!ackA || !ackB || !ackC) throw new Error('no ack');

  const seenA: Msg[] = [];
  for (let i = 0; i < 3; i++) seenA.push(await a.nextOfType('chat.delta'));
  assert.equal((await a.request({ type: 'chat.cancel', taskId: ackA.taskId })).type, 'ok');
  const restA = await a.collect(ackA.taskId as string);
  assert.equal(restA.end.type, 'chat.done');
  assert.equal(restA.end.finishReason, 'cancelled');
  const partial = texts([...seenA, ...restA.deltas]).join('');

  const [rb, rc] = await Promise.all([b.collect(ackB.taskId as string), c.collect(ackC.taskId as string)]);
  for (const r of [rb, rc]) {
    assert.equal(r.end.type, 'chat.done');
    assert.equal(r.end.finishReason, 'length');
    assertContiguous(r.deltas);
    assert.equal(r.text.split(' ').length, 60);
  }
  assert.equal(rb.text, rc.text);
  assert.ok(rb.text.startsWith(partial) && partial.length < rb.text.length, 'the cancelled task holds a prefix of the reply');
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 1);

  // The cancelled task stored what it had; the others stored the whole reply.
  const history = await a.request({ type: 'conversation.history', conversationId: ackA.conversationId });
  assert.equal((history.messages as { text: string }[])[1]?.text, partial);
  const taskA = await a.request({ type: 'task.get', taskId: ackA.taskId });
  assert.equal((taskA.task as { status: string }).status, 'cancelled');

  // The call was not cancelled, so its reply was cached.
  const ackD = await d.request(body);
  assert.equal(ackD.status, 'cached');
  assert.equal((await d.collect(ackD.taskId as string)).text, rb.text);
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 1);
});

test('the model call stops only when every subscriber has cancelled, and a cancelled reply is not cached', async (t) => {
  // 1000 tokens at 20 ms: the call would run 20 s if nothing stopped it.
  const server = await startServer({ devTokenDelayMs: 20, modelTokensPerMinute: 100_000 });
  t.after(() => server.close());
  const x = await WsClient.connect(server.ws, { user: 'sx' });
  const y = await WsClient.connect(server.ws, { user: 'sy' });
  t.after(() => Promise.all([x.close(), y.close()]));
  const body = { type: 'chat.send', text: 'Tell me everything about roofing', params: { maxTokens: 1000 } };
  const [ackX, ackY] = await Promise.all([x.request(body), y.request(body)]);
  await x.nextOfType('chat.delta');
  await y.nextOfType('chat.delta');

  await x.request({ type: 'chat.cancel', taskId: ackX.taskId });
  const endX = (await x.collect(ackX.taskId as string)).end;
  assert.equal(endX.finishReason, 'cancelled');
  // y still streams: the call goes on for its last subscriber.
  const before = y.received.filter((m) => m.type === 'chat.delta').length;
  await y.next((m) => m.type === 'chat.delta' && y.received.filter((r) => r.type === 'chat.delta').length > before + 2);
  assert.equal(await metric(server, 'chatwire_model_calls_in_flight'), 1);

  await y.request({ type: 'chat.cancel', taskId: ackY.taskId });
  const restY = await y.collect(ackY.taskId as string);
  assert.equal(restY.end.finishReason, 'cancelled');
  // The worker stops the call: nothing is in flight well before the 20 s it would take.
  const deadline = Date.now() + 10_000;
  while ((await metric(server, 'chatwire_model_calls_in_flight')) !== 0) {
    assert.ok(Date.now() < deadline, 'the model call was not stopped');
    await sleep(50);
  }
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 1);

  // Nothing was cached: the same chat calls the model again.
  const again = await x.request(body);
  assert.equal(again.status, 'queued');
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 2);
  await x.request({ type: 'chat.cancel', taskId: again.taskId });
  assert.equal((await x.collect(again.taskId as string)).end.finishReason, 'cancelled');
});

test('a chat sent right after the last subscriber cancelled starts a new call instead of joining the one being stopped', async (t) => {
  const server = await startServer({ devTokenDelayMs: 5 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'quick' });
  t.after(() => c.close());
  const body = { type: 'chat.send', text: 'Change my mind quickly', params: { maxTokens: 50 } };
  const first = await c.request(body);
  await c.nextOfType('chat.delta');
  // Both frames go out together: the second chat arrives while the cancelled call is still winding down.
  c.send({ type: 'chat.cancel', id: 'cancel-1', taskId: first.taskId });
  const second = await c.request(body);
  assert.equal(second.type, 'chat.ack');
  assert.equal(second.status, 'queued');
  const reply = await c.collect(second.taskId as string);
  assert.equal(reply.end.type, 'chat.done');
  assert.equal(reply.end.finishReason, 'length');
  assert.equal(reply.text.split(' ').length, 50);
  assertContiguous(reply.deltas);
  assert.equal(await metric(server, 'chatwire_singleflight_joins_total'), 0);
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 2);
  const firstEnd = c.received.find((m) => m.type === 'chat.done' && m.taskId === first.taskId);
  assert.equal(firstEnd?.finishReason, 'cancelled');
});

test('an upstream error reaches every subscriber of the call, and is not cached', async (t) => {
  // One worker slot: a long chat holds it, so the failing call waits in the queue while every subscriber joins.
  const server = await startServer({ devFaults: true, devTokenDelayMs: 20, workerThreads: 1, tasksPerWorker: 1 });
  t.after(() => server.close());
  const blocker = await WsClient.connect(server.ws, { user: 'blocker' });
  const clients = await Promise.all(['e1', 'e2', 'e3'].map((user) => WsClient.connect(server.ws, { user })));
  t.after(() => Promise.all([blocker, ...clients].map((c) => c.close())));
  const long = await blocker.request({ type: 'chat.send', text: 'keep the worker busy', params: { maxTokens: 500 } });
  await blocker.nextOfType('chat.delta');

  const body = { type: 'chat.send', text: '/fault upstream' };
  const acks = await Promise.all(clients.map((c) => c.request(body)));
  assert.deepEqual(
    acks.map((a) => a.status),
    ['queued', 'queued', 'queued'],
  );
  assert.equal(await metric(server, 'chatwire_singleflight_joins_total'), 2);
  await blocker.request({ type: 'chat.cancel', taskId: long.taskId });

  const replies = await Promise.all(clients.map((c, i) => c.collect(acks[i]?.taskId as string)));
  for (const [i, r] of replies.entries()) {
    assert.equal(r.deltas.length, 0);
    assert.equal(r.end.type, 'chat.error');
    assert.equal(r.end.taskId, acks[i]?.taskId);
    assert.equal(r.end.code, 'upstream_error');
    assert.equal(r.end.retryable, true);
    const task = await clients[i]?.request({ type: 'task.get', taskId: acks[i]?.taskId });
    assert.equal((task?.task as { status: string } | undefined)?.status, 'error');
  }
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 2);

  // A failure is never cached: the next identical chat calls the model again and fails again.
  const again = await clients[0]?.request(body);
  assert.equal(again?.status, 'queued');
  const end = (await clients[0]?.collect(again?.taskId as string))?.end;
  assert.equal(end?.code, 'upstream_error');
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 3);
  assert.equal(await metric(server, 'chatwire_cache_hits_total'), 0);
});

test('cache: bypass chats neither join a call in flight nor lend theirs to plain chats', async (t) => {
  const server = await startServer({ devTokenDelayMs: 10 });
  t.after(() => server.close());
  const [a, b] = await Promise.all(['ba', 'bb'].map((user) => WsClient.connect(server.ws, { user })));
  if (!a || !b) throw new Error('connect failed');
  t.after(() => Promise.all([a.close(), b.close()]));
  const body = { type: 'chat.send', text: 'Fresh answer wanted', params: { maxTokens: 30 } };

  // A bypass first, a plain chat while it runs: the plain chat computes (and caches) its own reply.
  const bypass = await a.request({ ...body, cache: 'bypass' });
  const firstDelta = await a.nextOfType('chat.delta');
  const plain = await b.request(body);
  assert.equal(plain.status, 'queued');
  const [rBypass, rPlain] = await Promise.all([a.collect(bypass.taskId as string), b.collect(plain.taskId as string)]);
  assert.equal((firstDelta.text as string) + rBypass.text, rPlain.text);
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 2);
  assert.equal(await metric(server, 'chatwire_singleflight_joins_total'), 0);
  const cached = await b.request(body);
  assert.equal(cached.status, 'cached');
  await b.collect(cached.taskId as string);

  // A plain chat (refresh) in flight, a bypass while it runs: the bypass makes its own call.
  const refresh = await a.request({ ...body, cache: 'refresh' });
  await a.nextOfType('chat.delta');
  const bypass2 = await b.request({ ...body, cache: 'bypass' });
  await Promise.all([a.collect(refresh.taskId as string), b.collect(bypass2.taskId as string)]);
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 4);
  assert.equal(await metric(server, 'chatwire_singleflight_joins_total'), 0);
});

test('calls saved by joining and by the cache are counted, with the tokens the saved calls would have cost', async (t) => {
  const server = await startServer({ devTokenDelayMs: 10 });
  t.after(() => server.close());
  const [a, b, c] = await Promise.all(['save-a', 'save-b', 'save-c'].map((user) => WsClient.connect(server.ws, { user })));
  t.after(() => Promise.all([a, b, c].map((x) => x?.close())));
  if (!a || !b || !c) throw new Error('connect failed');
  const savedMetric = async (name: string, reason: string) => {
    const text = await (await fetch(`${server.http}/metrics`)).text();
    const m = new RegExp(`^${name}\\{reason="${reason}"\\} (\\S+)$`, 'm').exec(text);
    return m ? Number(m[1]) : 0;
  };
  const body = { type: 'chat.send', text: 'How long does a roof inspection take?', params: { maxTokens: 20 } };

  const ackA = await a.request(body);
  await a.nextOfType('chat.delta');
  const ackB = await b.request(body);
  const [replyA, replyB] = await Promise.all([a.collect(ackA.taskId as string), b.collect(ackB.taskId as string)]);
  assert.equal(replyA.end.type, 'chat.done');
  assert.equal(replyB.end.cached, false);
  const usage = replyA.end.usage as { promptTokens: number; completionTokens: number };
  const cost = usage.promptTokens + usage.completionTokens;
  assert.ok(usage.completionTokens === 20 && cost > 20);
  assert.equal(await savedMetric('chatwire_model_calls_saved_total', 'joined'), 1);
  assert.equal(await savedMetric('chatwire_model_tokens_saved_total', 'joined'), cost);

  const ackC = await c.request(body);
  assert.equal(ackC.status, 'cached');
  const replyC = await c.collect(ackC.taskId as string);
  assert.equal(replyC.end.cached, true);
  assert.equal(await savedMetric('chatwire_model_calls_saved_total', 'cache'), 1);
  assert.equal(await savedMetric('chatwire_model_tokens_saved_total', 'cache'), cost);
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 1);
});
