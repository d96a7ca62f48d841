/**
 * Sync and idempotency (PROTOCOL.md): idempotent sends on every transport, the conversation list, and chat.started
 * on a user's other connections.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import { connectSocketIO, emitWithAck, WsClient } from '../helpers/clients.js';
import { metric, startServer, type TestServer } from '../helpers/server.js';

type Msg = Record<string, unknown>;

const postChat = (server: TestServer, user: string, body: Msg, headers: Record<string, string> = {}) =>
  fetch(`${server.http}/v1/chat?user=${user}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });

async function history(server: TestServer, user: string, conversationId: string): Promise<{ role: string; text: string }[]> {
  const res = await fetch(`${server.http}/v1/conversations/${conversationId}/messages?user=${user}`);
  assert.equal(res.status, 200);
  return ((await res.json()) as { messages: { role: string; text: string }[] }).messages.map((m) => ({ role: m.role, text: m.text }));
}

async function conversations(server: TestServer, user: string, query = ''): Promise<{ status: number; body: Msg }> {
  const res = await fetch(`${server.http}/v1/conversations?user=${user}${query}`);
  return { status: res.status, body: (await res.json()) as Msg };
}

/** The user's remaining chats, read from the ack of a new chat (which takes one more). */
async function remainingAfterOneMore(server: TestServer, user: string): Promise<number> {
  const res = await postChat(server, user, { text: `probe ${Math.random()}`, params: { maxTokens: 1 } });
  assert.equal(res.status, 202);
  return ((await res.json()) as { rateLimit: { remaining: number } }).rateLimit.remaining;
}

const sameIds = (a: Msg, b: Msg) => {
  assert.equal(a.taskId, b.taskId);
  assert.equal(a.conversationId, b.conversationId);
  assert.equal(a.messageId, b.messageId);
};

describe('idempotent sends', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ devTokenDelayMs: 5 });
  });
  after(() => server.close());

  test('/ws: the same clientMessageId twice at once, then after a reconnect: one message, one task, one charge', async () => {
    const a = await WsClient.connect(server.ws, { user: 'ws-idem' });
    const b = await WsClient.connect(server.ws, { user: 'ws-idem' });
    const calls = await metric(server, 'chatwire_model_calls_total');
    const send = { type: 'chat.send', text: 'fix my sink', clientMessageId: 'key-1', params: { maxTokens: 6 }, cache: 'bypass' };
    const [first, second] = await Promise.all([a.request(send), b.request(send)]);
    assert.equal(first.type, 'chat.ack', JSON.stringify(first));
    assert.equal(second.type, 'chat.ack', JSON.stringify(second));
    sameIds(first, second);
    assert.deepEqual([first.duplicate, second.duplicate].sort(), [true, undefined]);
    assert.deepEqual(first.rateLimit, second.rateLimit);
    const [fresh, repeat] = first.duplicate === true ? [b, a] : [a, b];
    const { text } = await fresh.collect(first.taskId as string);
    // The repeat's connection was not subscribed: it follows the task with chat.resume.
    assert.equal(repeat.received.filter((m) => m.type === 'chat.delta').length, 0);
    await a.close();
    await b.close();

    const c = await WsClient.connect(server.ws, { user: 'ws-idem' });
    const again = await c.request(send);
    sameIds(again, first);
    assert.equal(again.duplicate, true);
    assert.equal((await c.request({ type: 'chat.resume', taskId: again.taskId, fromSeq: 0 })).type, 'ok');
    assert.equal((await c.collect(again.taskId as string)).text, text);
    assert.equal(await metric(server, 'chatwire_model_calls_total'), calls + 1);
    assert.deepEqual(await history(server, 'ws-idem', first.conversationId as string), [
      { role: 'user', text: 'fix my sink' },
      { role: 'assistant', text },
    ]);
    const remaining = (first.rateLimit as { remaining: number }).remaining;
    assert.equal(await remainingAfterOneMore(server, 'ws-idem'), remaining - 1);

    // The same key for another message: refused, nothing stored.
    const otherText = await c.request({ ...send, text: 'something else' });
    assert.equal(otherText.type, 'error');
    assert.equal(otherText.code, 'idempotency_conflict');
    const otherConversation = await c.request({ ...send, conversationId: 'conv_elsewhere' });
    assert.equal(otherConversation.code, 'idempotency_conflict');
    // Naming the conversation the first send made is the same message.
    const named = await c.request({ ...send, conversationId: first.conversationId });
    sameIds(named, first);
    assert.equal(((await conversations(server, 'ws-idem')).body.items as unknown[]).length, 2);
    await c.close();
  });

  test('socket.io: the same clientMessageId twice at once and again on a new connection: one message, one task, one charge', async () => {
    const s1 = await connectSocketIO(server.http, { user: 'sio-idem' });
    const s2 = await connectSocketIO(server.http, { user: 'sio-idem' });
    const calls = await metric(server, 'chatwire_model_calls_total');
    const send = { text: 'paint my fence', clientMessageId: 'sio:key.1', params: { maxTokens: 5 }, cache: 'bypass' };
    const [x, y] = await Promise.all([emitWithAck(s1, 'chat.send', send), emitWithAck(s2, 'chat.send', send)]);
    assert.equal(x.type, 'chat.ack', JSON.stringify(x));
    sameIds(x, y);
    assert.deepEqual([x.duplicate, y.duplicate].sort(), [true, undefined]);
    s1.disconnect();
    s2.disconnect();
    const s3 = await connectSocketIO(server.http, { user: 'sio-idem' });
    const z = await emitWithAck(s3, 'chat.send', send);
    sameIds(z, x);
    assert.equal(z.duplicate, true);
    const conflict = await emitWithAck(s3, 'chat.send', { ...send, text: 'paint my house' });
    assert.equal(conflict.code, 'idempotency_conflict');
    s3.disconnect();
    // Wait for the reply to be stored, then look: one question, one answer, one model call, one chat taken.
    await waitFor(async () => (await history(server, 'sio-idem', x.conversationId as string)).length === 2);
    assert.deepEqual(
      (await history(server, 'sio-idem', x.conversationId as string)).map((m) => m.role),
      ['user', 'assistant'],
    );
    assert.equal(await metric(server, 'chatwire_model_calls_total'), calls + 1);
    assert.equal(await remainingAfterOneMore(server, 'sio-idem'), (x.rateLimit as { remaining: number }).remaining - 1);
  });

  test('POST /v1/chat: the same Idempotency-Key twice at once gets the same 202 and body, the repeat marked Idempotent-Replayed', async () => {
    const body = { text: 'mow my lawn', params: { maxTokens: 4 }, cache: 'bypass' };
    const [r1, r2] = await Promise.all([
      postChat(server, 'http-idem', body, { 'idempotency-key': 'h-1' }),
      postChat(server, 'http-idem', body, { 'idempotency-key': 'h-1' }),
    ]);
    assert.equal(r1.status, 202);
    assert.equal(r2.status, 202);
    const [b1, b2] = [await r1.text(), await r2.text()];
    assert.equal(b1, b2);
    assert.deepEqual([r1.headers.get('idempotent-replayed'), r2.headers.get('idempotent-replayed')].sort(), [null, 'true']);
    const ack = JSON.parse(b1) as Msg;
    // The key in the body is the same key.
    const viaBody = await postChat(server, 'http-idem', { ...body, clientMessageId: 'h-1' });
    assert.equal(viaBody.status, 202);
    assert.equal(await viaBody.text(), b1);
    assert.equal(viaBody.headers.get('idempotent-replayed'), 'true');
    const conflict = await postChat(server, 'http-idem', { ...body, text: 'mow the other lawn' }, { 'idempotency-key': 'h-1' });
    assert.equal(conflict.status, 422);
    assert.equal(((await conflict.json()) as { error: { code: string } }).error.code, 'idempotency_conflict');
    const differ = await postChat(server, 'http-idem', { ...body, clientMessageId: 'h-2' }, { 'idempotency-key': 'h-1' });
    assert.equal(differ.status, 400);
    await waitFor(async () => (await history(server, 'http-idem', ack.conversationId as string)).length === 2);
    assert.equal((await history(server, 'http-idem', ack.conversationId as string)).filter((m) => m.role === 'user').length, 1);
    assert.equal(await remainingAfterOneMore(server, 'http-idem'), (ack.rateLimit as { remaining: number }).remaining - 1);
  });

  test('a key is found after a restart (it is stored with the message)', async () => {
    const own = await startServer({ devTokenDelayMs: 1 });
    try {
      const body = { text: 'remember me', params: { maxTokens: 2 } };
      const first = await postChat(own, 'restart', body, { 'idempotency-key': 'r-1' });
      const text = await first.text();
      await own.stop();
      const again = await startServer({ devTokenDelayMs: 1 }, own.dataDir);
      try {
        const repeat = await postChat(again, 'restart', body, { 'idempotency-key': 'r-1' });
        assert.equal(repeat.status, 202);
        assert.equal(repeat.headers.get('idempotent-replayed'), 'true');
        assert.equal(await repeat.text(), text);
      } finally {
        await again.close();
      }
    } finally {
      await own.close();
    }
  });

  test('POST /v1/chat/completions and /api/chat: a repeated Idempotency-Key gets the first task, its stream from the start', async () => {
    const completion = (stream: boolean) =>
      fetch(`${server.http}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': `oa-${stream}` },
        body: JSON.stringify({ model: server.config.model, user: 'oa-idem', stream, messages: [{ role: 'user', content: 'tile my floor' }] }),
      });
    const calls = await metric(server, 'chatwire_model_calls_total');
    const [c1, c2] = await Promise.all([completion(false), completion(false)]);
    assert.equal(c1.status, 200);
    assert.equal(c2.status, 200);
    assert.equal(c1.headers.get('x-request-id'), c2.headers.get('x-request-id'));
    assert.deepEqual([c1.headers.get('idempotent-replayed'), c2.headers.get('idempotent-replayed')].sort(), [null, 'true']);
    const [j1, j2] = [(await c1.json()) as Msg, (await c2.json()) as Msg];
    assert.deepEqual(j1, j2);
    // A retry a while later (past a second of `created`) still gets the first answer's body, whole.
    await new Promise((resolve) => setTimeout(resolve, 1100));
    const c3 = await completion(false);
    assert.equal(c3.headers.get('idempotent-replayed'), 'true');
    assert.deepEqual(await c3.json(), j1);
    const s1 = await completion(true);
    const whole = await s1.text();
    const s2 = await completion(true);
    assert.equal(s2.headers.get('idempotent-replayed'), 'true');
    assert.equal(s2.headers.get('x-request-id'), s1.headers.get('x-request-id'));
    const contents = (sse: string) =>
      sse
        .split('\n\n')
        .filter((e) => e.startsWith('data: {'))
        .map((e) => (JSON.parse(e.slice(6)) as { choices: { delta: { content?: string } }[] }).choices[0]?.delta.content ?? '')
        .join('');
    assert.equal(contents(await s2.text()), contents(whole));
    // The same messages twice, under two keys: the second is a cache hit, so one model call for each key at most.
    assert.ok((await metric(server, 'chatwire_model_calls_total')) <= calls + 2);

    const aiSdk = (text: string) =>
      fetch(`${server.http}/api/chat?user=ai-idem`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': 'ai-1' },
        body: JSON.stringify({ id: 'chat-idem', messages: [{ id: 'm1', role: 'user', parts: [{ type: 'text', text }] }], trigger: 'submit-message' }),
      });
    const a1 = await aiSdk('grout my tiles');
    const first = await a1.text();
    const a2 = await aiSdk('grout my tiles');
    assert.equal(a2.headers.get('idempotent-replayed'), 'true');
    assert.equal(a2.headers.get('x-chatwire-task-id'), a1.headers.get('x-chatwire-task-id'));
    assert.equal(await a2.text(), first);
    const a3 = await aiSdk('grout my walls');
    assert.equal(a3.status, 422);
    await waitFor(async () => (await history(server, 'ai-idem', 'chat-idem')).length === 2);
    assert.equal((await history(server, 'ai-idem', 'chat-idem')).length, 2);
  });

  test('bad Idempotency-Key headers and conversation queries are a 400 in the error shape, never a 500', async () => {
    // A user per request: the properties send more requests than one user's bucket holds in a second.
    let n = 0;
    const fuzzUser = () => `fuzz-${++n}`;
    const badKey = fc.oneof(
      fc.string({ minLength: 1, maxLength: 80 }).filter((s) => !/^[A-Za-z0-9._:-]{1,64}$/.test(s) && /^[\x21-\x7e]+$/.test(s)),
      fc.stringMatching(/^[A-Za-z0-9]{65,90}$/),
    );
    await fc.assert(
      fc.asyncProperty(badKey, fc.constantFrom('/v1/chat', '/api/chat'), async (key, route) => {
        const body = route === '/v1/chat' ? { text: 'x' } : { id: 'chat-fuzz', messages: [{ id: 'm', role: 'user', parts: [{ type: 'text', text: 'x' }] }] };
        const res = await fetch(`${server.http}${route}?user=${fuzzUser()}`, {
          method: 'POST',
          headers: { 'content-type': 'application/json', 'idempotency-key': key },
          body: JSON.stringify(body),
        });
        assert.equal(res.status, 400, `${route} ${JSON.stringify(key)}`);
        assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'bad_request');
      }),
      { numRuns: 40, seed: 19 },
    );
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.string({ minLength: 1, maxLength: 20 }).filter((s) => !/^[0-9]+$/.test(s) || Number(s) < 1 || Number(s) > 100),
          fc.constant('0'),
        ),
        fc.string({ maxLength: 40 }),
        async (limit, cursor) => {
          const q = new URLSearchParams({ user: fuzzUser(), limit, ...(cursor === '' ? {} : { cursor }) });
          const res = await fetch(`${server.http}/v1/conversations?${q}`);
          assert.equal(res.status, 400, q.toString());
          assert.equal(((await res.json()) as { error: { code: string } }).error.code, 'bad_request');
        },
      ),
      { numRuns: 40, seed: 19 },
    );
    await fc.assert(
      fc.asyncProperty(fc.string({ minLength: 1, maxLength: 1500 }), async (cursor) => {
        const res = await fetch(`${server.http}/v1/conversations?${new URLSearchParams({ user: fuzzUser(), cursor })}`);
        assert.equal(res.status, 400);
      }),
      { numRuns: 40, seed: 19 },
    );
  });
});

async function waitFor(check: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

describe('conversations.list', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ devTokenDelayMs: 0 });
  });
  after(() => server.close());

  test('newest activity first, paged by cursor, over HTTP and the sockets alike; only the caller’s', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      const res = await postChat(server, 'lister', { text: `question ${i} ${'x'.repeat(100)}`, params: { maxTokens: 1 } });
      ids.push(((await res.json()) as { conversationId: string }).conversationId);
      await new Promise((resolve) => setTimeout(resolve, 3));
    }
    await postChat(server, 'someone-else', { text: 'not listed', params: { maxTokens: 1 } });
    await waitFor(async () => (await history(server, 'lister', ids[4] as string)).length === 2);
    const first = await conversations(server, 'lister', '&limit=2');
    assert.equal(first.status, 200);
    const items = first.body.items as { conversationId: string; title: string; messageCount: number; lastMessageAt: string }[];
    assert.deepEqual(
      items.map((c) => c.conversationId),
      [ids[4], ids[3]],
    );
    assert.equal(items[0]?.title, `question 4 ${'x'.repeat(100)}`.slice(0, 80));
    assert.equal(items[0]?.messageCount, 2);
    assert.match(items[0]?.lastMessageAt ?? '', /^\d{4}-\d\d-\d\dT/);
    const walked = items.map((c) => c.conversationId);
    let cursor = first.body.nextCursor as string | null;
    const ws = await WsClient.connect(server.ws, { user: 'lister' });
    while (cursor !== null) {
      const page = await ws.request({ type: 'conversations.list', limit: 2, cursor });
      assert.equal(page.type, 'conversations.list', JSON.stringify(page));
      walked.push(...(page.items as { conversationId: string }[]).map((c) => c.conversationId));
      cursor = page.nextCursor as string | null;
    }
    assert.deepEqual(walked, [...ids].reverse());
    // Another user's cursor is not this user's.
    const theirs = await ws.request({ type: 'conversations.list', cursor: first.body.nextCursor });
    assert.equal(theirs.type, 'conversations.list');
    const other = await WsClient.connect(server.ws, { user: 'someone-else' });
    const refused = await other.request({ type: 'conversations.list', cursor: first.body.nextCursor });
    assert.equal(refused.code, 'bad_request');
    const sio = await connectSocketIO(server.http, { user: 'lister' });
    const viaSio = await emitWithAck(sio, 'conversations.list', { limit: 100 });
    assert.deepEqual(
      (viaSio.items as { conversationId: string }[]).map((c) => c.conversationId),
      [...ids].reverse(),
    );
    sio.disconnect();
    await ws.close();
    await other.close();
  });
});

describe('chat.started', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ devTokenDelayMs: 5 });
  });
  after(() => server.close());

  test('a chat acked on /ws reaches the user’s other /ws and socket.io connections, not the sender and not other users', async () => {
    const sender = await WsClient.connect(server.ws, { user: 'synced' });
    const tab = await WsClient.connect(server.ws, { user: 'synced' });
    const phone = await connectSocketIO(server.http, { user: 'synced' });
    const stranger = await WsClient.connect(server.ws, { user: 'stranger' });
    await Promise.all([sender.nextOfType('hello'), tab.nextOfType('hello'), stranger.nextOfType('hello')]);
    const ack = await sender.request({ type: 'chat.send', text: 'book a plumber', params: { maxTokens: 5 } });
    const started = await tab.nextOfType('chat.started');
    assert.deepEqual(
      { ...started },
      {
        type: 'chat.started',
        taskId: ack.taskId,
        conversationId: ack.conversationId,
        messageId: ack.messageId,
        text: 'book a plumber',
        createdAt: started.createdAt,
      },
    );
    assert.match(started.createdAt as string, /^\d{4}-\d\d-\d\dT.*Z$/);
    // The other tab follows the reply from seq 0, as the sender sees it.
    assert.equal((await tab.request({ type: 'chat.resume', taskId: ack.taskId, fromSeq: 0 })).type, 'ok');
    const [mine, theirs] = await Promise.all([sender.collect(ack.taskId as string), tab.collect(ack.taskId as string)]);
    assert.equal(theirs.text, mine.text);
    await waitFor(async () => phone.received.some((m) => m.type === 'chat.started'));
    const heard = phone.received.find((m) => m.type === 'chat.started');
    assert.equal(heard?.taskId, ack.taskId);
    // An HTTP chat is heard by every socket of the user, the sender's included.
    const res = await postChat(server, 'synced', { text: 'over http', params: { maxTokens: 2 } });
    const httpAck = (await res.json()) as Msg;
    const fromHttp = await sender.nextOfType('chat.started');
    assert.equal(fromHttp.taskId, httpAck.taskId);
    assert.equal((await tab.nextOfType('chat.started')).text, 'over http');
    await waitFor(async () => phone.received.filter((m) => m.type === 'chat.started').length === 2);
    // A repeated key is not announced again; the sender never heard of its own chat.
    const keyed = { type: 'chat.send', text: 'only once', clientMessageId: 'once', params: { maxTokens: 2 } };
    await sender.request(keyed);
    await sender.request(keyed);
    await tab.nextOfType('chat.started', (m) => m.text === 'only once');
    await postChat(server, 'synced', { text: 'a marker', params: { maxTokens: 1 } });
    await tab.nextOfType('chat.started', (m) => m.text === 'a marker');
    assert.equal(tab.received.filter((m) => m.type === 'chat.started' && m.text === 'only once').length, 1);
    assert.equal(sender.received.filter((m) => m.type === 'chat.started' && m.taskId === ack.taskId).length, 0);
    assert.equal(stranger.received.filter((m) => m.type === 'chat.started').length, 0);
    // socket.io as the sender: /ws hears it, the socket.io sender does not.
    const sioAck = await emitWithAck(phone, 'chat.send', { text: 'from the phone', params: { maxTokens: 2 } });
    assert.equal((await tab.nextOfType('chat.started', (m) => m.taskId === sioAck.taskId)).text, 'from the phone');
    await postChat(server, 'synced', { text: 'second marker', params: { maxTokens: 1 } });
    await waitFor(async () => phone.received.some((m) => m.type === 'chat.started' && m.text === 'second marker'));
    assert.equal(phone.received.filter((m) => m.type === 'chat.started' && m.taskId === sioAck.taskId).length, 0);
    phone.disconnect();
    await Promise.all([sender.close(), tab.close(), stranger.close()]);
  });
});
