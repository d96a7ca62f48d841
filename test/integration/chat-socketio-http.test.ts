import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { connectSocketIO, emitWithAck, readSse, WsClient } from '../helpers/clients.js';
import { startServer, type TestServer } from '../helpers/server.js';

type Msg = Record<string, unknown> & { type: string };

describe('socket.io and HTTP drive the same chat service', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ devTokenDelayMs: 2 });
  });
  after(() => server.close());

  test('over socket.io: hello event, ack through the callback, deltas and done as events', async () => {
    const s = await connectSocketIO(server.http, { user: 'sio-user' });
    const events = s.received;
    const hello = events[0] ?? (await new Promise<Msg>((resolve) => s.once('hello', resolve)));
    assert.equal(hello.type, 'hello');
    assert.equal(hello.userId, 'sio-user');
    const ack = await emitWithAck(s, 'chat.send', { id: 'q', text: 'Need a gardener on Sunday' });
    assert.equal(ack.type, 'chat.ack');
    assert.equal(ack.id, 'q');
    const done =
      events.find((e) => e.type === 'chat.done' && e.taskId === ack.taskId) ??
      (await new Promise<Msg>((resolve) => s.on('chat.done', (m: Msg) => m.taskId === ack.taskId && resolve(m))));
    const deltas = events.filter((e) => e.type === 'chat.delta' && e.taskId === ack.taskId);
    assert.deepEqual(
      deltas.map((d) => d.seq),
      deltas.map((_, i) => i),
    );
    assert.equal(done.finishReason, 'stop');
    const text = deltas.map((d) => d.text).join('');

    // The same message over /ws behaves exactly alike: same reply text from the deterministic provider.
    const c = await WsClient.connect(server.ws, { user: 'sio-user' });
    const wsAck = await c.request({ type: 'chat.send', text: 'Need a gardener on Sunday', cache: 'bypass' });
    assert.equal((await c.collect(wsAck.taskId as string)).text, text);

    const history = await emitWithAck(s, 'conversation.history', { conversationId: ack.conversationId });
    assert.deepEqual(
      (history.messages as { text: string }[]).map((m) => m.text),
      ['Need a gardener on Sunday', text],
    );
    const task = await emitWithAck(s, 'task.get', { taskId: ack.taskId });
    assert.equal((task.task as { status: string }).status, 'done');
    await c.close();
    s.close();
  });

  test('over socket.io, a reply to a message sent without an ack callback arrives as an event', async () => {
    const s = await connectSocketIO(server.http, { user: 'sio-noack' });
    const pong = new Promise<Msg>((resolve) => s.once('pong', resolve));
    s.emit('ping', { id: 'p1' });
    assert.deepEqual(await pong, { type: 'pong', id: 'p1' });
    s.close();
  });

  test('a task started over socket.io resumes over /ws from any seq', async () => {
    const s = await connectSocketIO(server.http, { user: 'cross' });
    const ack = await emitWithAck(s, 'chat.send', { text: 'cross transport', params: { maxTokens: 20 } });
    if (!s.received.some((e) => e.type === 'chat.done' && e.taskId === ack.taskId)) {
      await new Promise<void>((resolve) => s.on('chat.done', (m: Msg) => m.taskId === ack.taskId && resolve()));
    }
    s.close();
    const c = await WsClient.connect(server.ws, { user: 'cross' });
    await c.request({ type: 'chat.resume', taskId: ack.taskId, fromSeq: 3 });
    const { deltas, end } = await c.collect(ack.taskId as string);
    assert.equal(deltas[0]?.seq, 3);
    assert.equal(end.type, 'chat.done');
    await c.close();
  });

  test('over HTTP: POST /v1/chat answers 202 with the ack, then the task and its SSE stream', async () => {
    const res = await fetch(`${server.http}/v1/chat?user=http-user`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ id: 'h1', text: 'Any electricians free today?', params: { maxTokens: 200 } }),
    });
    assert.equal(res.status, 202);
    const ack = (await res.json()) as Msg;
    assert.equal(ack.id, 'h1');
    assert.equal(ack.status, 'queued');
    assert.ok(res.headers.get('ratelimit'));
    assert.ok(res.headers.get('ratelimit-policy'));

    const stream = await fetch(`${server.http}/v1/tasks/${ack.taskId as string}/stream?user=http-user`);
    assert.equal(stream.status, 200);
    assert.match(stream.headers.get('content-type') ?? '', /^text\/event-stream/);
    const events = await readSse(stream);
    const deltas = events.filter((e) => e.event === 'delta');
    assert.deepEqual(
      deltas.map((e) => e.id),
      deltas.map((_, i) => String(i)),
    );
    assert.deepEqual(
      deltas.map((e) => e.data.seq),
      deltas.map((_, i) => i),
    );
    const last = events.at(-1);
    assert.equal(last?.event, 'done');
    assert.equal(last?.data.type, 'chat.done');
    const text = deltas.map((e) => e.data.text).join('');

    const task = (await (await fetch(`${server.http}/v1/tasks/${ack.taskId as string}?user=http-user`)).json()) as Msg;
    assert.equal(task.status, 'done');
    assert.equal(task.text, text);
    assert.equal(task.seq, deltas.length);

    const lastSeen = Math.floor(deltas.length / 2) - 1;
    assert.ok(lastSeen >= 0, 'the stream has at least two deltas');
    const resumed = await fetch(`${server.http}/v1/tasks/${ack.taskId as string}/stream?user=http-user`, { headers: { 'last-event-id': String(lastSeen) } });
    const rest = await readSse(resumed);
    const restDeltas = rest.filter((e) => e.event === 'delta');
    assert.equal(restDeltas[0]?.id, String(lastSeen + 1));
    assert.equal(
      restDeltas.map((e) => e.data.text).join(''),
      deltas
        .slice(lastSeen + 1)
        .map((e) => e.data.text)
        .join(''),
    );
    assert.equal(rest.at(-1)?.event, 'done');

    const messages = (await (await fetch(`${server.http}/v1/conversations/${ack.conversationId as string}/messages?user=http-user`)).json()) as Msg;
    assert.deepEqual(
      (messages.messages as { text: string }[]).map((m) => m.text),
      ['Any electricians free today?', text],
    );
    assert.equal(messages.hasMore, false);

    const forbidden = await fetch(`${server.http}/v1/tasks/${ack.taskId as string}?user=someone-else`);
    assert.equal(forbidden.status, 403);
    assert.equal(((await forbidden.json()) as { error: { code: string } }).error.code, 'forbidden');
  });

  test('health, readiness and the page answer', async () => {
    const health = await fetch(`${server.http}/healthz`);
    assert.equal(health.status, 200);
    const ready = await fetch(`${server.http}/readyz`);
    assert.equal(ready.status, 200);
    assert.deepEqual(await ready.json(), { status: 'ready' });
    const page = await fetch(`${server.http}/`);
    assert.equal(page.status, 200);
    assert.match(page.headers.get('content-type') ?? '', /^text\/html/);
    assert.match(await page.text(), /chatwire/);
  });
});
