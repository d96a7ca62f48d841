/**
 * One client's share: anonymous callers in open mode are one user per address (their buckets shared however many
 * connections they open), the anonymous users tracked are bounded, and the model queue serves waiting users
 * round-robin with a cap on each one's waiting chats. Under a flood of either kind a user sending one chat a second
 * gets every chat acknowledged and answered, and none `overloaded`.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { pino } from 'pino';
import { createApp } from '../../src/app.js';
import { loadConfig } from '../../src/config.js';
import { connectSocketIO, emitWithAck, refusedSocketIO, refusedUpgrade, WsClient } from '../helpers/clients.js';
import { startServer, tempDataDir, type TestServer } from '../helpers/server.js';

type Msg = Awaited<ReturnType<WsClient['next']>>;

test('anonymous callers from one address share one user and its buckets, over every connection and transport', async (t) => {
  const server = await startServer({ chatsPerMinute: 3 });
  t.after(() => server.close());
  const a = await WsClient.connect(server.ws);
  const b = await WsClient.connect(server.ws);
  const userId = (await a.nextOfType('hello')).userId as string;
  assert.equal((await b.nextOfType('hello')).userId, userId);
  const io = await connectSocketIO(server.http);

  assert.equal((await a.request({ type: 'chat.send', text: 'first' })).type, 'chat.ack');
  assert.equal((await b.request({ type: 'chat.send', text: 'second' })).type, 'chat.ack');
  const posted = await fetch(`${server.http}/v1/chat`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"text":"third"}' });
  assert.equal(posted.status, 202);
  // The fourth chat of the minute, on yet another connection: the shared bucket is empty.
  const fourth = await emitWithAck(io, 'chat.send', { text: 'fourth' });
  assert.equal(fourth.type, 'error');
  assert.equal(fourth.code, 'rate_limited');
  // A new connection brings no fresh bucket either.
  const c = await WsClient.connect(server.ws);
  assert.equal((await c.request({ type: 'chat.send', text: 'fifth' })).code, 'rate_limited');
  // The HTTP chat is this user's too: its task is readable from the socket.
  const { taskId } = (await posted.json()) as { taskId: string };
  assert.equal((await a.request({ type: 'task.get', taskId })).type, 'task');
  io.close();
  await Promise.all([a.close(), b.close(), c.close()]);
});

test('behind a trusted proxy each forwarded address is its own anonymous user, up to CHATWIRE_MAX_ANONYMOUS_USERS; past it new ones get 503 overloaded', async (t) => {
  const server = await startServer({ trustProxy: '127.0.0.1', maxAnonymousUsers: 3 });
  t.after(() => server.close());
  const from = (address: string) => ({ 'x-forwarded-for': address });
  const ids: string[] = [];
  const open: WsClient[] = [];
  for (const address of ['198.51.100.1', '198.51.100.2', '2001:db8:1:2::1']) {
    const c = await WsClient.connect(server.ws, { headers: from(address) });
    ids.push((await c.nextOfType('hello')).userId as string);
    open.push(c);
  }
  assert.equal(new Set(ids).size, 3);
  // The same /64 is the same user: it is let in, and counts once.
  const sameNet = await WsClient.connect(server.ws, { headers: from('2001:db8:1:2::abcd') });
  assert.equal((await sameNet.nextOfType('hello')).userId, ids[2]);

  // A fourth address, on every transport: refused at once, nothing opened.
  const refusedWs = await refusedUpgrade(server.ws, [], from('198.51.100.4'));
  assert.equal(refusedWs.status, 503);
  assert.deepEqual(JSON.parse(refusedWs.body), { error: { code: 'overloaded', message: 'too many anonymous users right now; retry later' } });
  const refusedHttp = await fetch(`${server.http}/v1/requests?limit=1`, { headers: from('198.51.100.4') });
  assert.equal(refusedHttp.status, 503);
  assert.equal(((await refusedHttp.json()) as { error: { code: string } }).error.code, 'overloaded');
  const refusedIo = await refusedSocketIO(server.http, {}, from('198.51.100.4'));
  assert.deepEqual(refusedIo.error.data, { code: 'overloaded', message: 'too many anonymous users right now; retry later' });
  assert.deepEqual(refusedIo.events, []);

  // A known address and a named user are still served.
  assert.equal((await fetch(`${server.http}/v1/requests?limit=1`, { headers: from('198.51.100.1') })).status, 200);
  const named = await WsClient.connect(server.ws, { user: 'alice', headers: from('198.51.100.5') });
  assert.equal((await named.nextOfType('hello')).userId, 'alice');
  for (const c of [...open, sameNet, named]) await c.close();
});

test('a CORS preflight from an anonymous address past the bound is answered, and logs no error', async (t) => {
  const lines: Record<string, unknown>[] = [];
  const dataDir = tempDataDir();
  const config = loadConfig({}, { port: 0, host: '127.0.0.1', dataDir, workerThreads: 1, logLevel: 'info', trustProxy: '127.0.0.1', maxAnonymousUsers: 1 });
  const app = await createApp(config, {
    log: pino({ level: 'info' }, { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) }),
  });
  t.after(async () => {
    await app.close();
    fs.rmSync(dataDir, { recursive: true, force: true });
  });
  const base = `http://127.0.0.1:${app.port}`;
  const preflight = (address: string) =>
    fetch(`${base}/v1/requests`, {
      method: 'OPTIONS',
      headers: { origin: 'https://app.example', 'access-control-request-method': 'GET', 'x-forwarded-for': address },
    });
  assert.equal((await preflight('198.51.100.1')).status, 204);
  for (let i = 2; i <= 20; i++) assert.equal((await preflight(`198.51.100.${i}`)).status, 204);
  assert.equal((await fetch(`${base}/v1/requests?limit=1`, { headers: { 'x-forwarded-for': '198.51.100.2' } })).status, 503);
  assert.deepEqual(
    lines.filter((l) => (l.level as number) >= 50).map((l) => l.msg),
    [],
  );
});

test('without a trusted proxy X-Forwarded-For is ignored: the peer address is the anonymous user', async (t) => {
  const server = await startServer({ maxAnonymousUsers: 1 });
  t.after(() => server.close());
  const first = await WsClient.connect(server.ws, { headers: { 'x-forwarded-for': '198.51.100.1' } });
  const second = await WsClient.connect(server.ws, { headers: { 'x-forwarded-for': '198.51.100.2' } });
  assert.equal((await second.nextOfType('hello')).userId, (await first.nextOfType('hello')).userId);
  await Promise.all([first.close(), second.close()]);
});

/** Sends one chat a second, `count` times, and returns each one's ack or error and the end of each acked task. */
async function steadyUser(server: TestServer, count: number): Promise<{ replies: Msg[]; ends: Msg[] }> {
  const c = await WsClient.connect(server.ws, { user: 'steady' });
  const replies: Msg[] = [];
  const tasks: string[] = [];
  for (let i = 0; i < count; i++) {
    const started = Date.now();
    const reply = await c.request({ type: 'chat.send', text: `steady question ${i}`, cache: 'bypass' });
    replies.push(reply);
    if (reply.type === 'chat.ack') tasks.push(reply.taskId as string);
    await sleep(Math.max(0, 1000 - (Date.now() - started)));
  }
  const ends: Msg[] = [];
  for (const taskId of tasks) ends.push((await c.collect(taskId)).end);
  await c.close();
  return { replies, ends };
}

function assertServed({ replies, ends }: { replies: Msg[]; ends: Msg[] }, count: number): void {
  assert.deepEqual(
    replies.map((r) => (r.type === 'chat.ack' ? 'ack' : `${r.type} ${r.code as string}`)),
    new Array(count).fill('ack'),
  );
  assert.deepEqual(
    ends.map((e) => `${e.type} ${(e.finishReason ?? e.code) as string}`),
    new Array(count).fill('chat.done stop'),
  );
}

/** Reads one counter of /metrics with its labels; absent = 0. */
async function counter(server: TestServer, name: string, labels: string): Promise<number> {
  const text = await (await fetch(`${server.http}/metrics`)).text();
  const m = new RegExp(`^${name}\\{${labels}\\} (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : 0;
}

/**
 * Keeps sending chats from `clients`: `perTick` on each every `intervalMs`, so that a place freed in the queue is
 * taken within a few ms. Resolves, when stopped, with how many were sent.
 */
function flood(clients: WsClient[], perTick: number, intervalMs: number): { stop(): number } {
  let sent = 0;
  const timer = setInterval(() => {
    for (const c of clients) {
      for (let i = 0; i < perTick; i++) c.send({ type: 'chat.send', text: `flood ${sent++}`, cache: 'bypass' });
    }
  }, intervalMs);
  return {
    stop() {
      clearInterval(timer);
      return sent;
    },
  };
}

// A slow provider: 20 ms a token, 32 tokens, so 0.64 s a chat.
const SLOW_TOKEN_MS = 20;

test('open mode: one client flooding chats without ?user over many connections is refused rate_limited; a user sending one chat a second gets every one acked and answered', {
  timeout: 60_000,
}, async (t) => {
  // 4 slots (6 chats a second), room for 32 waiting: one user per connection would fill it in a moment.
  const server = await startServer({ devTokenDelayMs: SLOW_TOKEN_MS, workerThreads: 1, tasksPerWorker: 4, maxQueue: 32 });
  t.after(() => server.close());
  // Eight connections, each sending 160 chats a second: far past every limit, yet under the refusals a second that
  // would close a connection for flooding, so that the flood keeps its connections.
  const flooders = await Promise.all(Array.from({ length: 8 }, () => WsClient.connect(server.ws)));
  const floodStarted = Date.now();
  const flow = flood(flooders, 4, 25);
  await sleep(500);
  const steady = await steadyUser(server, 5);
  flow.stop();
  const floodSec = Math.ceil((Date.now() - floodStarted) / 1000);

  assertServed(steady, 5);
  const floodReplies = flooders.flatMap((c) => c.received.filter((m) => m.type === 'chat.ack' || m.type === 'error'));
  const codes = new Set(floodReplies.filter((m) => m.type === 'error').map((m) => m.code));
  assert.deepEqual([...codes].sort(), ['rate_limited']);
  // One user's chats bucket (60 a minute) let through at most 60 and one a second refilled, not a bucket per
  // connection; its share of the queue (4 running, 8 waiting) was full before that.
  const acked = floodReplies.filter((m) => m.type === 'chat.ack').length;
  assert.ok(acked >= 12 && acked <= 60 + floodSec, `flooder acked ${acked} in ${floodSec} s`);
  assert.ok((await counter(server, 'chatwire_rate_limited_total', 'bucket="queued"')) > 0);
  for (const c of flooders) await c.close();
});

test('twenty accounts each sending past their chat limit at a slow provider cannot fill the queue: a user sending one chat a second gets every one acked and answered', {
  timeout: 90_000,
}, async (t) => {
  // 16 slots (25 chats a second), room for 200 waiting: the twenty accounts' shares (8 each) fit, their chat
  // allowances (60 each, 1,200 in all) would not.
  const server = await startServer({ devTokenDelayMs: SLOW_TOKEN_MS, workerThreads: 1, tasksPerWorker: 16, maxQueue: 200 });
  t.after(() => server.close());
  const accounts = await Promise.all(Array.from({ length: 20 }, (_, i) => WsClient.connect(server.ws, { user: `account-${i}` })));
  // Each account sends a chat every 25 ms (40 a second, under its frame limit): it has its whole allowance of the
  // minute queued or refused within two seconds, and takes every place that frees up after that.
  const flow = flood(accounts, 1, 25);
  await sleep(500);
  const steady = await steadyUser(server, 5);
  flow.stop();

  assertServed(steady, 5);
  const codes = new Set(accounts.flatMap((c) => c.received.filter((m) => m.type === 'error').map((m) => m.code)));
  assert.deepEqual([...codes].sort(), ['rate_limited']);
  assert.ok((await counter(server, 'chatwire_rate_limited_total', 'bucket="queued"')) > 0);
  for (const c of accounts) await c.close();
});
