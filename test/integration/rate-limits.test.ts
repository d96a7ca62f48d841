import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { SQLITE_FILE } from '../../src/app.js';
import { signToken } from '../../src/auth/sign.js';
import { Database } from '../../src/db/database.js';
import { FLOOD_REFUSALS } from '../../src/transport/session.js';
import { connectSocketIO, emitWithAck, readSse, WsClient, refusedSocketIO, refusedUpgrade } from '../helpers/clients.js';
import { startServer, type TestServer } from '../helpers/server.js';

type ErrorBody = { error: { code: string; message: string; retryAfterMs?: number } };
type Msg = Record<string, unknown> & { type: string };

/** One sample of /metrics; `labels` like `bucket="messages"`. Absent = 0. */
async function metric(server: TestServer, name: string, labels = ''): Promise<number> {
  const text = await (await fetch(`${server.http}/metrics`)).text();
  const series = labels === '' ? name : `${name}{${labels}}`;
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  return line === undefined ? 0 : Number(line.slice(series.length + 1));
}

/** What SQLite holds for a user, read through a second, read-only connection (WAL lets it read beside the server). */
function stored(server: TestServer, userId: string): { tasks: string[]; messages: string[] } {
  const db = new Database(path.join(server.dataDir, SQLITE_FILE), { readonly: true });
  try {
    const tasks = (db.raw.prepare('SELECT status FROM tasks WHERE user_id = ? ORDER BY rowid').all(userId) as { status: string }[]).map((r) => r.status);
    const messages = (
      db.raw
        .prepare('SELECT m.text FROM messages m JOIN conversations c ON c.conversation_id = m.conversation_id WHERE c.user_id = ? ORDER BY m.seq')
        .all(userId) as { text: string }[]
    ).map((r) => r.text);
    return { tasks, messages };
  } finally {
    db.close();
  }
}

/** Waits until every task of the user has ended (HTTP-only callers have no socket to watch). */
async function tasksEnded(server: TestServer, userId: string, count: number): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const { tasks } = stored(server, userId);
    if (tasks.length === count && tasks.every((s) => s === 'done' || s === 'error' || s === 'cancelled')) return;
    if (Date.now() > deadline) throw new Error(`tasks of ${userId} did not end: ${JSON.stringify(tasks)}`);
    await sleep(20);
  }
}

function onSocketIO(s: { once(event: string, fn: (m: Msg) => void): unknown; received: Msg[] }, type: string, match: (m: Msg) => boolean): Promise<Msg> {
  const seen = s.received.find((m) => m.type === type && match(m));
  if (seen) return Promise.resolve(seen);
  return new Promise((resolve) => {
    const listen = () =>
      s.once(type, (m: Msg) => {
        if (match({ ...m, type })) resolve({ ...m, type });
        else listen();
      });
    listen();
  });
}

/** Parses a Structured Field List of `"name";k=v;...` items (RFC 9651), the form docs/rate-limits.md documents. */
function sfList(field: string): { name: string; params: Record<string, string> }[] {
  return field.split(/,\s*/).map((item) => {
    const [name, ...params] = item.split(';');
    assert.match(name ?? '', /^"[a-z]+"$/, `item name is an sf-string: ${item}`);
    const out: Record<string, string> = {};
    for (const p of params) {
      const m = /^([a-z][a-z0-9_.*-]*)=(\d+|"[^"]*")$/.exec(p);
      assert.ok(m, `parameter ${p} is key=integer or key="string"`);
      out[m[1] as string] = m[2] as string;
    }
    return { name: (name as string).slice(1, -1), params: out };
  });
}

function rateLimitOf(res: Response): Record<string, { r: number; t: number }> {
  const field = res.headers.get('ratelimit');
  assert.ok(field, 'RateLimit is present');
  const out: Record<string, { r: number; t: number }> = {};
  for (const item of sfList(field)) out[item.name] = { r: Number(item.params.r), t: Number(item.params.t) };
  return out;
}

const json = { 'content-type': 'application/json' };

describe('frames: one bucket per user, shared by every connection and transport', () => {
  let server: TestServer;
  before(async () => {
    // 0.05 per second: a burst of one frame, the next one 20 s later, so every refusal below is certain.
    server = await startServer({ messagesPerSecond: 0.05 });
  });
  after(() => server.close());

  test('a second /ws connection, a socket.io socket and HTTP of the same user all find the bucket empty', async () => {
    const a = await WsClient.connect(server.ws, { user: 'sharer' });
    const b = await WsClient.connect(server.ws, { user: 'sharer' });
    const s = await connectSocketIO(server.http, { user: 'sharer' });
    const limitedBefore = await metric(server, 'chatwire_rate_limited_total', 'bucket="messages"');

    assert.deepEqual(await a.request({ type: 'ping', id: 'p1' }), { type: 'pong', id: 'p1' });
    const overWs = await b.request({ type: 'ping', id: 'p2' });
    assert.deepEqual([overWs.type, overWs.code, overWs.id], ['error', 'rate_limited', 'p2']);
    assert.ok(
      Number.isInteger(overWs.retryAfterMs) && (overWs.retryAfterMs as number) > 15_000 && (overWs.retryAfterMs as number) <= 20_000,
      String(overWs.retryAfterMs),
    );
    const overSio = await emitWithAck(s, 'ping', { id: 'p3' });
    assert.deepEqual([overSio.type, overSio.code, overSio.id], ['error', 'rate_limited', 'p3']);
    assert.ok((overSio.retryAfterMs as number) > 15_000 && (overSio.retryAfterMs as number) <= 20_000);
    const overHttp = await fetch(`${server.http}/v1/requests?user=sharer`);
    assert.equal(overHttp.status, 429);
    assert.equal(overHttp.headers.get('retry-after'), '20');
    const body = (await overHttp.json()) as ErrorBody;
    assert.equal(body.error.code, 'rate_limited');
    assert.ok((body.error.retryAfterMs as number) > 15_000 && (body.error.retryAfterMs as number) <= 20_000);
    assert.equal(rateLimitOf(overHttp).messages?.r, 0);
    assert.equal(rateLimitOf(overHttp).messages?.t, 20, 'on a 429 the effective window is Retry-After');

    // Another user is not touched by any of it.
    const other = await WsClient.connect(server.ws, { user: 'bystander' });
    assert.equal((await other.request({ type: 'ping' })).type, 'pong');
    assert.equal(await metric(server, 'chatwire_rate_limited_total', 'bucket="messages"'), limitedBefore + 3);
    await Promise.all([a.close(), b.close(), other.close()]);
    s.close();
  });

  test('a chat refused for the frame rate stores nothing and calls no model, over /ws and HTTP', async () => {
    const callsBefore = await metric(server, 'chatwire_model_calls_total');
    const c = await WsClient.connect(server.ws, { user: 'chatter' });
    const ack = await c.request({ type: 'chat.send', text: 'first, allowed', params: { maxTokens: 4 } });
    assert.equal(ack.type, 'chat.ack');
    const refused = await c.request({ type: 'chat.send', text: 'second, over the rate', conversationId: ack.conversationId, cache: 'bypass' });
    assert.deepEqual([refused.type, refused.code], ['error', 'rate_limited']);
    const { text, end } = await c.collect(ack.taskId as string);
    assert.equal(end.type, 'chat.done');
    assert.deepEqual(stored(server, 'chatter'), { tasks: ['done'], messages: ['first, allowed', text] });

    const first = await fetch(`${server.http}/v1/chat?user=poster`, {
      method: 'POST',
      headers: json,
      body: JSON.stringify({ text: 'over HTTP, allowed', params: { maxTokens: 4 } }),
    });
    assert.equal(first.status, 202);
    const second = await fetch(`${server.http}/v1/chat?user=poster`, {
      method: 'POST',
      headers: json,
      body: JSON.stringify({ text: 'over HTTP, refused', cache: 'bypass' }),
    });
    assert.equal(second.status, 429);
    assert.equal(second.headers.get('retry-after'), '20');
    assert.equal(((await second.json()) as ErrorBody).error.code, 'rate_limited');
    await tasksEnded(server, 'poster', 1);
    assert.deepEqual(stored(server, 'poster').messages.length, 2);
    assert.equal(stored(server, 'poster').messages[0], 'over HTTP, allowed');
    assert.equal(await metric(server, 'chatwire_model_calls_total'), callsBefore + 2, 'one model call per allowed chat, none for the refused ones');
    await c.close();
  });

  test('a /v1 path that no route serves, or a known one asked with another method, is charged like any other call', async () => {
    const miss = await fetch(`${server.http}/v1/nosuch?user=prober`);
    assert.equal(miss.status, 404);
    assert.deepEqual(await miss.json(), { error: { code: 'not_found', message: 'no route GET /v1/nosuch' } });
    assert.deepEqual(rateLimitOf(miss).messages, { r: 0, t: 20 }, 'it took the one frame of the burst');
    const wrongMethod = await fetch(`${server.http}/v1/tasks/task_x?user=prober`, { method: 'DELETE' });
    assert.equal(wrongMethod.status, 429, 'the bucket is empty: refused before the route is looked at');
    assert.equal(wrongMethod.headers.get('retry-after'), '20');
    assert.equal(((await wrongMethod.json()) as ErrorBody).error.code, 'rate_limited');
    assert.deepEqual(rateLimitOf(wrongMethod).messages, { r: 0, t: 20 });

    const other = await fetch(`${server.http}/v1/chat?user=prober2`);
    assert.equal(other.status, 405);
    assert.deepEqual(rateLimitOf(other).messages, { r: 0, t: 20 });
    assert.equal((await fetch(`${server.http}/v1/requests?user=prober2`)).status, 429);
  });

  test('a CORS preflight under /v1 carries the fields of its caller and charges nothing', async () => {
    const preflight = () =>
      fetch(`${server.http}/v1/requests?user=preflighter`, {
        method: 'OPTIONS',
        headers: { origin: 'https://app.example', 'access-control-request-method': 'GET' },
      });
    for (let i = 0; i < 3; i++) {
      const res = await preflight();
      assert.equal(res.status, 204);
      assert.equal(res.headers.get('ratelimit-policy'), '"messages";q=1;w=20, "chats";q=60;w=60, "tokens";q=20000;w=60;chatwire-unit="model-tokens"');
      assert.deepEqual(rateLimitOf(res).messages, { r: 1, t: 20 }, `preflight ${i + 1} left the one frame`);
    }
    assert.equal((await fetch(`${server.http}/v1/requests?user=preflighter`)).status, 200, 'the preflights took nothing');
    assert.deepEqual(rateLimitOf(await preflight()).messages, { r: 0, t: 20 }, "then it shows the user's empty bucket");
    // Other paths are not /v1: their preflight carries no fields.
    const elsewhere = await fetch(`${server.http}/socket.io/?user=preflighter`, { method: 'OPTIONS', headers: { origin: 'https://app.example' } });
    assert.equal(elsewhere.status, 204);
    assert.equal(elsewhere.headers.get('ratelimit'), null);
  });
});

describe('frames per second under a burst, and floods', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ messagesPerSecond: 5 });
  });
  after(() => server.close());

  test('30 frames sent at once from three connections of one user pass only as far as the one bucket allows', async () => {
    const conns = await Promise.all([0, 1, 2].map(() => WsClient.connect(server.ws, { user: 'burst' })));
    await Promise.all(conns.map((c) => c.nextOfType('hello')));
    conns.forEach((c, k) => {
      for (let i = 0; i < 10; i++) c.send({ type: 'ping', id: `c${k}-${i}` });
    });
    const replies: Msg[] = [];
    for (const [k, c] of conns.entries()) {
      for (let i = 0; i < 10; i++) replies.push(await c.next((m) => m.id === `c${k}-${i}`));
    }
    const passed = replies.filter((r) => r.type === 'pong').length;
    const refused = replies.filter((r) => r.type === 'error');
    // Per connection, each would have let its first 5 through (15 in all). One user-wide bucket holds 5, plus
    // whatever dripped in (one per 200 ms) while the burst was handled.
    assert.ok(passed >= 5 && passed < 15, `passed ${passed}`);
    assert.equal(passed + refused.length, 30);
    for (const r of refused) {
      assert.equal(r.code, 'rate_limited');
      assert.ok(Number.isInteger(r.retryAfterMs) && (r.retryAfterMs as number) >= 1 && (r.retryAfterMs as number) <= 200, String(r.retryAfterMs));
    }
    await Promise.all(conns.map((c) => c.close()));
  });

  test('a /ws connection that keeps sending after rate_limited is closed with 1008, undecodable frames counting too', async () => {
    const calm = await WsClient.connect(server.ws, { user: 'flooder' });
    await calm.nextOfType('hello');
    const flood = await WsClient.connect(server.ws, { user: 'flooder' });
    await flood.nextOfType('hello');
    // Not even JSON: such frames are charged like any other, or a flood of garbage would never be limited.
    for (let i = 0; i < 1000; i++) flood.send('not json');
    assert.equal(await flood.closed, 1008);
    assert.equal(flood.closeReason, 'rate limit ignored: wait retryAfterMs after rate_limited');
    const errors = flood.received.filter((m) => m.type === 'error');
    const answered = errors.filter((m) => m.code === 'bad_request').length;
    assert.ok(answered >= 5 && answered < 50, `answered ${answered}`);
    assert.equal(errors.filter((m) => m.code === 'rate_limited').length, FLOOD_REFUSALS + 1, 'refused until the limit, then closed');
    assert.equal(errors.length, answered + FLOOD_REFUSALS + 1, 'nothing answered after the close');

    // Coming straight back is refused (429, answered only after a hold, so that a reconnect loop stays slow)
    // until the user's frame bucket is full again: here 5 frames at 5 per second, at most a second.
    const back = await refusedUpgrade(`${server.ws}?user=flooder`);
    assert.equal(back.status, 429);
    const body = JSON.parse(back.body) as ErrorBody;
    assert.equal(body.error.code, 'rate_limited');
    assert.match(body.error.message, /closed for sending past its rate limit/);
    assert.ok((body.error.retryAfterMs as number) > 0 && (body.error.retryAfterMs as number) <= 1000, String(body.error.retryAfterMs));
    assert.equal(back.headers['retry-after'], '1');

    // Only the flooding connection went: the user's other one still answers, and it may connect again later.
    const wait = await calm.request({ type: 'ping' });
    if (wait.type === 'error') await sleep(wait.retryAfterMs as number);
    assert.equal((await calm.request({ type: 'ping' })).type, 'pong');
    await sleep(1000);
    const again = await WsClient.connect(server.ws, { user: 'flooder' });
    assert.equal((await again.nextOfType('hello')).userId, 'flooder');

    // Flooding again doubles the wait.
    for (let i = 0; i < 1000; i++) again.send('not json');
    assert.equal(await again.closed, 1008);
    const second = await refusedUpgrade(`${server.ws}?user=flooder`);
    assert.equal(second.status, 429);
    const wait2 = (JSON.parse(second.body) as ErrorBody).error.retryAfterMs as number;
    // 2 s from the close (counted when the upgrade arrived; the refusal is then held up to 1 s before it is sent).
    assert.ok(wait2 > 1500 && wait2 <= 2000, String(wait2));
    assert.equal(second.headers['retry-after'], '2');
    await calm.close();
  });

  test('a socket.io socket that keeps emitting after rate_limited is disconnected', async () => {
    const s = await connectSocketIO(server.http, { user: 'sio-flooder' });
    const disconnected = new Promise<string>((resolve) => s.once('disconnect', (reason) => resolve(reason)));
    for (let i = 0; i < 1000; i++) s.emit('ping', 'not an object');
    assert.equal(await disconnected, 'io server disconnect');
    const errors = s.received.filter((m) => m.type === 'error');
    assert.equal(errors.filter((m) => m.code === 'rate_limited').length, FLOOD_REFUSALS + 1);
    assert.ok(errors.filter((m) => m.code === 'bad_request').length >= 5);
    s.close();
    const back = await refusedSocketIO(server.http, { user: 'sio-flooder' });
    const data = back.error.data as { code: string; retryAfterMs: number };
    assert.equal(data.code, 'rate_limited');
    assert.ok(data.retryAfterMs > 0 && data.retryAfterMs <= 1000, String(data.retryAfterMs));
  });
});

describe('chats per minute, reported in hello and the ack', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ messagesPerSecond: 1000, chatsPerMinute: 2 });
  });
  after(() => server.close());

  test('hello.limits reports the limits on /ws and socket.io', async () => {
    const expected = { maxFrameBytes: 65536, messagesPerSecond: 1000, chatsPerMinute: 2 };
    const c = await WsClient.connect(server.ws, { user: 'greeted' });
    assert.deepEqual((await c.nextOfType('hello')).limits, expected);
    await c.close();
    const s = await connectSocketIO(server.http, { user: 'greeted' });
    assert.deepEqual((await onSocketIO(s, 'hello', () => true)).limits, expected);
    s.close();
  });

  test("two chats pass with the ack's rateLimit counting down, the third is refused on any transport with nothing stored", async () => {
    const callsBefore = await metric(server, 'chatwire_model_calls_total');
    const c = await WsClient.connect(server.ws, { user: 'chatty' });
    const first = await c.request({ type: 'chat.send', text: 'chat one', params: { maxTokens: 2 } });
    assert.equal(first.type, 'chat.ack');
    const rl1 = first.rateLimit as { limit: number; remaining: number; resetMs: number };
    assert.deepEqual([rl1.limit, rl1.remaining], [2, 1]);
    // One chat back takes 30 s at 2 per minute.
    assert.ok(rl1.resetMs > 25_000 && rl1.resetMs <= 30_000, String(rl1.resetMs));

    const s = await connectSocketIO(server.http, { user: 'chatty' });
    const second = await emitWithAck(s, 'chat.send', { text: 'chat two', params: { maxTokens: 2 } });
    assert.equal(second.type, 'chat.ack');
    const rl2 = second.rateLimit as { limit: number; remaining: number; resetMs: number };
    assert.deepEqual([rl2.limit, rl2.remaining], [2, 0]);
    assert.ok(rl2.resetMs > 55_000 && rl2.resetMs <= 60_000, String(rl2.resetMs));

    const overWs = await c.request({ type: 'chat.send', text: 'chat three', cache: 'bypass' });
    assert.deepEqual([overWs.type, overWs.code], ['error', 'rate_limited']);
    assert.ok((overWs.retryAfterMs as number) > 25_000 && (overWs.retryAfterMs as number) <= 30_000);
    const overSio = await emitWithAck(s, 'chat.send', { text: 'chat three', cache: 'bypass' });
    assert.deepEqual([overSio.type, overSio.code], ['error', 'rate_limited']);
    const overHttp = await fetch(`${server.http}/v1/chat?user=chatty`, { method: 'POST', headers: json, body: '{"text":"chat three","cache":"bypass"}' });
    assert.equal(overHttp.status, 429);
    assert.equal(overHttp.headers.get('retry-after'), '30');
    assert.equal(rateLimitOf(overHttp).chats?.r, 0);

    await c.collect(first.taskId as string);
    await onSocketIO(s, 'chat.done', (m) => m.taskId === second.taskId);
    assert.deepEqual(stored(server, 'chatty').tasks, ['done', 'done']);
    assert.equal(stored(server, 'chatty').messages.filter((m) => m === 'chat three').length, 0);
    assert.equal(await metric(server, 'chatwire_model_calls_total'), callsBefore + 2);
    assert.equal(await metric(server, 'chatwire_rate_limited_total', 'bucket="chats"'), 3);
    // Other calls of the same user still pass: only the chats bucket is empty.
    assert.equal((await c.request({ type: 'ping' })).type, 'pong');
    await c.close();
    s.close();
  });
});

describe('model tokens: reserved at send, settled when the task ends', () => {
  let server: TestServer;
  before(async () => {
    // 100 tokens a minute; the dev provider streams one token every 20 ms, so a task can be cancelled midway.
    server = await startServer({ messagesPerSecond: 1000, chatsPerMinute: 1000, modelTokensPerMinute: 100, devTokenDelayMs: 20 });
  });
  after(() => server.close());

  test('a chat whose maxTokens exceeds what is left is refused, and a cancelled chat gives its unused tokens back', async () => {
    const c = await WsClient.connect(server.ws, { user: 'spender' });
    const big = await c.request({ type: 'chat.send', text: 'a long answer please', params: { maxTokens: 80 }, cache: 'bypass' });
    assert.equal(big.type, 'chat.ack');

    // 20 tokens left: 30 more cannot be reserved; the wait is for the 10 missing ones at 100 per minute.
    const refused = await c.request({ type: 'chat.send', text: 'thirty more', params: { maxTokens: 30 }, cache: 'bypass' });
    assert.deepEqual([refused.type, refused.code], ['error', 'rate_limited']);
    assert.match(refused.message as string, /model token/);
    assert.ok((refused.retryAfterMs as number) > 5_000 && (refused.retryAfterMs as number) <= 6_000, String(refused.retryAfterMs));
    const headers = await fetch(`${server.http}/v1/requests?user=spender&limit=1`);
    const tokensLeft = rateLimitOf(headers).tokens?.r as number;
    assert.ok(tokensLeft >= 20 && tokensLeft <= 22, `tokens left ${tokensLeft}`);
    assert.equal(await metric(server, 'chatwire_rate_limited_total', 'bucket="tokens"'), 1);

    // Cancel the big one after a few tokens: it used k of its 80, the other 80 - k come back at once.
    await c.next((m) => m.type === 'chat.delta' && m.taskId === big.taskId && (m.seq as number) >= 2);
    assert.equal((await c.request({ type: 'chat.cancel', taskId: big.taskId })).type, 'ok');
    const { end } = await c.collect(big.taskId as string);
    assert.equal(end.finishReason, 'cancelled');
    const used = (end.usage as { completionTokens: number }).completionTokens;
    assert.ok(used >= 3 && used < 80, `used ${used}`);

    const retried = await c.request({ type: 'chat.send', text: 'thirty more', params: { maxTokens: 30 }, cache: 'bypass' });
    assert.equal(retried.type, 'chat.ack', 'the refund made room without waiting 6 s');
    const done = await c.collect(retried.taskId as string);
    assert.equal((done.end.usage as { completionTokens: number }).completionTokens, 30);
    const after = rateLimitOf(await fetch(`${server.http}/v1/requests?user=spender&limit=1`)).tokens?.r as number;
    // 100 - 80 + (80 - used) - 30, plus what dripped in meanwhile (well under the other 30).
    assert.ok(after >= 70 - used && after < 100 - used, `tokens after ${after}, used ${used}`);
    assert.deepEqual(stored(server, 'spender').tasks, ['cancelled', 'done'], 'the refused chat stored nothing');
    await c.close();
  });
});

describe('RateLimit-Policy and RateLimit on every /v1 response', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ messagesPerSecond: 50, chatsPerMinute: 10, modelTokensPerMinute: 5000 });
  });
  after(() => server.close());

  test('successes and errors after identification carry both fields in the documented structured-field form', async () => {
    const user = 'headers';
    const post = (body: string) => fetch(`${server.http}/v1/chat?user=${user}`, { method: 'POST', headers: json, body });
    const chat = await post(JSON.stringify({ text: 'count me', params: { maxTokens: 40 } }));
    assert.equal(chat.status, 202);
    const { taskId, conversationId } = (await chat.json()) as { taskId: string; conversationId: string };
    const stream = await fetch(`${server.http}/v1/tasks/${taskId}/stream?user=${user}`);
    assert.equal(stream.status, 200);
    await readSse(stream);
    const read = await fetch(`${server.http}/v1/tasks/${taskId}?user=${user}`);
    const responses: [string, Response, number][] = [
      ['202 chat', chat, 202],
      ['200 stream', stream, 200],
      ['200 task', read, 200],
      [
        '304 not modified',
        await fetch(`${server.http}/v1/tasks/${taskId}?user=${user}`, { headers: { 'if-none-match': read.headers.get('etag') ?? '' } }),
        304,
      ],
      ['200 history', await fetch(`${server.http}/v1/conversations/${conversationId}/messages?user=${user}`), 200],
      ['200 requests', await fetch(`${server.http}/v1/requests?user=${user}`), 200],
      ['400 bad body', await post('{"text":'), 400],
      ['400 bad query', await fetch(`${server.http}/v1/requests?user=${user}&limit=0`), 400],
      ['403 forbidden', await fetch(`${server.http}/v1/tasks/${taskId}?user=intruder`), 403],
      ['404 no task', await fetch(`${server.http}/v1/tasks/task_nope?user=${user}`), 404],
      ['404 no task stream', await fetch(`${server.http}/v1/tasks/task_nope/stream?user=${user}`), 404],
      ['413 too large', await post(JSON.stringify({ text: 'x'.repeat(70_000) })), 413],
    ];
    const policy = '"messages";q=50;w=1, "chats";q=10;w=60, "tokens";q=5000;w=60;chatwire-unit="model-tokens"';
    for (const [name, res, status] of responses) {
      assert.equal(res.status, status, name);
      assert.equal(res.headers.get('ratelimit-policy'), policy, name);
      const limits = rateLimitOf(res);
      assert.deepEqual(Object.keys(limits), ['messages', 'chats', 'tokens'], name);
      for (const [bucket, { r, t }] of Object.entries(limits)) {
        assert.ok(Number.isInteger(r) && r >= 0 && Number.isInteger(t) && t >= 0, `${name} ${bucket}`);
      }
      assert.ok(limits.messages!.r <= 50 && limits.chats!.r <= 10 && limits.tokens!.r <= 5000, name);
    }
    // Exact where the clock cannot move it: one chat taken of 10 (the next drips in after 6 s).
    assert.deepEqual(rateLimitOf(responses[0]![1]).chats, { r: 9, t: 6 });
    // The browser may read them cross-origin.
    const cors = await fetch(`${server.http}/v1/requests?user=${user}`, { headers: { origin: 'https://anywhere.example' } });
    assert.equal(cors.headers.get('access-control-allow-origin'), '*');
    assert.match(cors.headers.get('access-control-expose-headers') ?? '', /RateLimit, RateLimit-Policy, Retry-After/);
  });

  test('a /v1 path no route serves gets 404, a known route asked with another method 405 with Allow, both with the fields', async () => {
    const user = 'prober';
    const cases: [string, string, string, number, string | null][] = [
      ['GET', '/v1/nosuch', '', 404, null],
      ['GET', '/v1', '', 404, null],
      ['GET', '/v1/tasks/', '', 404, null],
      ['DELETE', '/v1/tasks/task_x', '', 405, 'GET, OPTIONS'],
      ['PUT', '/v1/tasks/task_x/stream', '{}', 405, 'GET, OPTIONS'],
      ['GET', '/v1/chat', '', 405, 'POST, OPTIONS'],
      ['POST', '/v1/requests', '{"limit":1}', 405, 'GET, OPTIONS'],
      ['PATCH', '/v1/conversations/conv_x/messages', '{}', 405, 'GET, OPTIONS'],
      ['DELETE', '/v1/consumers/c_1/bookings', '', 405, 'GET, OPTIONS'],
    ];
    const policy = '"messages";q=50;w=1, "chats";q=10;w=60, "tokens";q=5000;w=60;chatwire-unit="model-tokens"';
    for (const [method, path, body, status, allow] of cases) {
      const name = `${method} ${path}`;
      const res = await fetch(`${server.http}${path}?user=${user}`, { method, ...(body ? { body, headers: json } : {}) });
      assert.equal(res.status, status, name);
      assert.equal(res.headers.get('allow'), allow, name);
      assert.equal(res.headers.get('ratelimit-policy'), policy, name);
      assert.deepEqual(Object.keys(rateLimitOf(res)), ['messages', 'chats', 'tokens'], name);
      assert.equal(res.headers.get('content-type'), 'application/json', name);
      const error = ((await res.json()) as ErrorBody).error;
      assert.deepEqual(Object.keys(error), ['code', 'message'], name);
      assert.equal(error.code, status === 404 ? 'not_found' : 'bad_request', name);
      if (status === 405) assert.equal(error.message, `${method} is not allowed on ${path}; allowed: ${allow}`);
    }
    // Outside /v1 nothing changes: a plain 404 without the fields.
    const elsewhere = await fetch(`${server.http}/v2/nothing?user=${user}`);
    assert.equal(elsewhere.status, 404);
    assert.equal(elsewhere.headers.get('ratelimit'), null);
  });

  test('HEAD on a /v1 route is a 405 without content, so the next response on the connection is read right', async () => {
    const raw = await new Promise<string>((resolve, reject) => {
      const sock = net.connect(server.port, '127.0.0.1', () => {
        sock.write(
          'HEAD /v1/requests?user=header HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/requests?user=header&limit=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
        );
      });
      let text = '';
      sock.on('data', (d) => (text += d.toString('latin1')));
      sock.on('end', () => resolve(text));
      sock.on('error', reject);
    });
    const [head, rest] = raw.split('\r\n\r\n', 2) as [string, string];
    assert.match(head, /^HTTP\/1\.1 405 /);
    assert.match(head, /\r\nallow: GET, OPTIONS\r\n/i);
    assert.match(head, /\r\nratelimit: "messages";r=\d+;t=\d+/i);
    assert.match(rest, /^HTTP\/1\.1 200 OK\r\n/, 'the HEAD answer had no content');
  });
});

describe('connections per user and the origin policy', () => {
  const SECRET = 'rate-limit-integration-secret-0123456789abc';
  let server: TestServer;
  let many: string;
  before(async () => {
    server = await startServer({ jwtSecret: SECRET, maxConnectionsPerUser: 2, allowedOrigins: 'https://app.example, https://admin.example' });
    many = await signToken({ secret: SECRET, sub: 'many' });
  });
  after(() => server.close());

  /** Connects over /ws, retrying while the server has not yet seen an earlier close. */
  async function connectWhenFree(token: string): Promise<WsClient> {
    const deadline = Date.now() + 5_000;
    for (;;) {
      try {
        return await WsClient.connect(server.ws, { token });
      } catch (err) {
        if ((err as { statusCode?: number }).statusCode !== 429 || Date.now() > deadline) throw err;
        await sleep(20);
      }
    }
  }

  test('past maxConnectionsPerUser the next upgrade is refused with 429 and a reason, on /ws and socket.io', async () => {
    const a = await WsClient.connect(server.ws, { token: many });
    const s = await connectSocketIO(server.http, { token: many });
    const third = await refusedUpgrade(`${server.ws}?token=${many}`);
    assert.equal(third.status, 429);
    assert.deepEqual(JSON.parse(third.body), {
      error: { code: 'rate_limited', message: 'too many connections for this user: 2 open, at most 2 allowed' },
    });
    assert.equal(third.headers['retry-after'], undefined, 'no time would help: a connection has to close');
    const viaSio = await refusedSocketIO(server.http, { token: many });
    assert.deepEqual(viaSio.error.data, { code: 'rate_limited', message: 'too many connections for this user: 2 open, at most 2 allowed' });
    assert.deepEqual(viaSio.events, []);

    // Other users, and HTTP calls of this one, are not affected.
    const other = await WsClient.connect(server.ws, { token: await signToken({ secret: SECRET, sub: 'few' }) });
    assert.equal((await fetch(`${server.http}/v1/requests?limit=1`, { headers: { authorization: `Bearer ${many}` } })).status, 200);

    // Closing one frees its slot, whichever transport it was.
    await a.close();
    const b = await connectWhenFree(many);
    s.close();
    const c = await connectWhenFree(many);
    assert.equal((await c.request({ type: 'ping' })).type, 'pong');
    await Promise.all([b.close(), c.close(), other.close()]);
  });

  test('clients that give up during the handshake do not keep a slot', async () => {
    const token = await signToken({ secret: SECRET, sub: 'quitter' });
    for (let i = 0; i < 3; i++) {
      // socket.io: the CONNECT packet goes out and the socket is dropped while the token is being verified.
      await new Promise<void>((resolve) => {
        const raw = new WebSocket(`ws://127.0.0.1:${server.port}/socket.io/?EIO=4&transport=websocket`);
        raw.on('message', (data) => {
          if (data.toString().startsWith('0')) {
            raw.send(`40${JSON.stringify({ token })}`);
            raw.terminate();
          }
        });
        raw.on('close', () => resolve());
      });
      // /ws: the upgrade request goes out and the TCP connection is dropped before the answer.
      await new Promise<void>((resolve) => {
        const sock = net.connect(server.port, '127.0.0.1', () => {
          sock.write(
            `GET /ws?token=${token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
              'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n',
            () => sock.destroy(),
          );
        });
        sock.on('close', () => resolve());
      });
    }
    const first = await connectWhenFree(token);
    const second = await connectSocketIO(server.http, { token });
    assert.equal((await emitWithAck(second, 'ping', {})).type, 'pong');
    await first.close();
    second.close();
  });

  test('an upgrade from an origin not in allowedOrigins is refused with 403; allowed and origin-less ones open', async () => {
    const refused = await refusedUpgrade(`${server.ws}?token=${many}`, [], { origin: 'https://evil.example' });
    assert.equal(refused.status, 403);
    assert.equal((JSON.parse(refused.body) as ErrorBody).error.code, 'forbidden');
    const viaSio = await refusedSocketIO(server.http, { token: many }, { origin: 'https://evil.example' });
    assert.deepEqual(viaSio.events, []);

    const allowed = await WsClient.connect(server.ws, { token: many, headers: { origin: 'https://admin.example' } });
    assert.equal((await allowed.nextOfType('hello')).userId, 'many');
    const noOrigin = await connectWhenFree(many);
    await Promise.all([allowed.close(), noOrigin.close()]);
    const s = await connectWhenFree(many);
    await s.close();
  });

  test('HTTP answers an allowed origin with CORS headers, a disallowed one without, and preflight works', async () => {
    const auth = { authorization: `Bearer ${many}` };
    const allowed = await fetch(`${server.http}/v1/requests?limit=1`, { headers: { ...auth, origin: 'https://app.example' } });
    assert.equal(allowed.status, 200);
    assert.equal(allowed.headers.get('access-control-allow-origin'), 'https://app.example');
    assert.equal(allowed.headers.get('vary'), 'Origin');
    const disallowed = await fetch(`${server.http}/v1/requests?limit=1`, { headers: { ...auth, origin: 'https://evil.example' } });
    assert.equal(disallowed.headers.get('access-control-allow-origin'), null);
    assert.equal(disallowed.headers.get('access-control-expose-headers'), null);
    // Errors carry them too, so a browser client can read why it was refused.
    const unauthorized = await fetch(`${server.http}/v1/requests`, { headers: { origin: 'https://app.example' } });
    assert.equal(unauthorized.status, 401);
    assert.equal(unauthorized.headers.get('access-control-allow-origin'), 'https://app.example');

    const preflight = (origin: string) =>
      fetch(`${server.http}/v1/chat`, {
        method: 'OPTIONS',
        headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization, content-type' },
      });
    const ok = await preflight('https://app.example');
    assert.equal(ok.status, 204);
    assert.equal(ok.headers.get('access-control-allow-origin'), 'https://app.example');
    assert.match(ok.headers.get('access-control-allow-methods') ?? '', /\bPOST\b/);
    assert.match(ok.headers.get('access-control-allow-headers') ?? '', /\bauthorization\b/);
    assert.match(ok.headers.get('access-control-allow-headers') ?? '', /\bcontent-type\b/);
    const evil = await preflight('https://evil.example');
    assert.equal(evil.headers.get('access-control-allow-origin'), null);
  });

  test('a 401 carries the policy and the fields of a caller not identified: every bucket full, nothing charged', async () => {
    const policy = '"messages";q=50;w=1, "chats";q=60;w=60, "tokens";q=20000;w=60;chatwire-unit="model-tokens"';
    const fresh = '"messages";r=50;t=1, "chats";r=60;t=1, "tokens";r=20000;t=1';
    const bad = { authorization: 'Bearer not-a-token' };
    const cases: [string, Promise<Response>][] = [
      ['no token', fetch(`${server.http}/v1/requests`)],
      ['bad token', fetch(`${server.http}/v1/requests`, { headers: bad })],
      ['bad ?token=', fetch(`${server.http}/v1/tasks/task_x?token=nope`)],
      ['stream', fetch(`${server.http}/v1/tasks/task_x/stream`, { headers: bad })],
      ['chat', fetch(`${server.http}/v1/chat`, { method: 'POST', headers: json, body: '{"text":"hi"}' })],
      ['no route', fetch(`${server.http}/v1/nosuch`)],
      ['wrong method', fetch(`${server.http}/v1/tasks/task_x`, { method: 'DELETE', headers: bad })],
    ];
    for (const [name, pending] of cases) {
      const res = await pending;
      assert.equal(res.status, 401, name);
      assert.equal(res.headers.get('www-authenticate'), 'Bearer', name);
      assert.equal(res.headers.get('ratelimit-policy'), policy, name);
      assert.equal(res.headers.get('ratelimit'), fresh, name);
      assert.equal(((await res.json()) as ErrorBody).error.code, 'unauthorized', name);
    }
    // An identified caller's miss is its own: a 404 charged to its bucket.
    const token = await signToken({ secret: SECRET, sub: 'lost' });
    const miss = await fetch(`${server.http}/v1/nosuch`, { headers: { authorization: `Bearer ${token}` } });
    assert.equal(miss.status, 404);
    assert.equal(rateLimitOf(miss).messages?.r, 49);
    // A preflight with a bad token is still answered (a browser would otherwise report a CORS failure), as unidentified.
    const preflight = await fetch(`${server.http}/v1/chat?token=nope`, {
      method: 'OPTIONS',
      headers: { origin: 'https://app.example', 'access-control-request-method': 'POST' },
    });
    assert.equal(preflight.status, 204);
    assert.equal(preflight.headers.get('ratelimit-policy'), policy);
    assert.equal(preflight.headers.get('ratelimit'), fresh);
  });
});

test('an allowed origin written with capitals or its default port matches the Origin browsers send, on /ws, socket.io and HTTP', async () => {
  const server = await startServer({ allowedOrigins: 'https://App.Example:443, http://localhost:5173' });
  try {
    const ws = await WsClient.connect(server.ws, { user: 'ann', headers: { origin: 'https://app.example' } });
    assert.equal((await ws.nextOfType('hello')).userId, 'ann');
    await ws.close();
    const refused = await refusedUpgrade(`${server.ws}?user=ann`, [], { origin: 'http://localhost:5174' });
    assert.equal(refused.status, 403);
    assert.deepEqual((await refusedSocketIO(server.http, { user: 'ann' }, { origin: 'https://evil.example' })).events, []);

    const res = await fetch(`${server.http}/v1/requests?limit=1&user=ann`, { headers: { origin: 'https://app.example' } });
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('access-control-allow-origin'), 'https://app.example');
    const local = await fetch(`${server.http}/v1/requests?limit=1&user=ann`, { headers: { origin: 'http://localhost:5173' } });
    assert.equal(local.headers.get('access-control-allow-origin'), 'http://localhost:5173');
  } finally {
    await server.close();
  }
});
