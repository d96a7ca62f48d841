import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { SQLITE_FILE } from '../../src/app.js';
import { Database } from '../../src/db/database.js';
import { seedMarketplace } from '../../src/db/marketplace-seed.js';
import { migrate } from '../../src/db/migrate.js';
import { WsClient } from '../helpers/clients.js';
import { startServer, tempDataDir, type TestServer } from '../helpers/server.js';

type Json = Record<string, unknown>;

const LIVE = 'private, no-cache';
const FINAL = 'private, max-age=300';
const LISTING = 'private, max-age=5, must-revalidate';
// A strong entity tag: quoted, no W/ prefix.
const STRONG_ETAG = /^"[A-Za-z0-9_-]+"$/;

/** Checks one GET /v1 route: 200 with a strong ETag and the expected Cache-Control, then every If-None-Match form. */
async function assertRevalidates(url: string, cacheControl: string): Promise<{ etag: string; body: string }> {
  const first = await fetch(url);
  assert.equal(first.status, 200, url);
  const body = await first.text();
  const etag = first.headers.get('etag') ?? '';
  assert.match(etag, STRONG_ETAG, url);
  assert.equal(first.headers.get('cache-control'), cacheControl, url);
  assert.ok(first.headers.get('ratelimit'), `${url} carries RateLimit`);

  // The same representation gets the same tag.
  const again = await fetch(url);
  assert.equal(again.headers.get('etag'), etag, url);
  assert.equal(await again.text(), body, url);

  for (const ifNoneMatch of [etag, `"not-it", ${etag}`, `W/${etag}`, '*']) {
    const res = await fetch(url, { headers: { 'if-none-match': ifNoneMatch } });
    assert.equal(res.status, 304, `${url} If-None-Match: ${ifNoneMatch}`);
    assert.equal(await res.text(), '', '304 has no body');
    assert.equal(res.headers.get('etag'), etag);
    assert.equal(res.headers.get('cache-control'), cacheControl);
    assert.ok(res.headers.get('ratelimit'), '304 carries RateLimit too');
  }
  const stale = await fetch(url, { headers: { 'if-none-match': '"not-it"' } });
  assert.equal(stale.status, 200);
  assert.equal(await stale.text(), body);
  return { etag, body };
}

describe('HTTP caching of GET /v1 reads', () => {
  let server: TestServer;
  let consumerId: string;
  before(async () => {
    const dataDir = tempDataDir();
    const db = new Database(path.join(dataDir, SQLITE_FILE));
    migrate(db);
    seedMarketplace(db, { consumers: 20, providers: 10, requests: 300 });
    db.close();
    server = await startServer({ devTokenDelayMs: 2 }, dataDir);
    const booked = (await (await fetch(`${server.http}/v1/requests?status=booked&limit=1&user=anyone`)).json()) as { items: { consumerId: string }[] };
    consumerId = booked.items[0]?.consumerId as string;
    assert.ok(consumerId, 'the seed has a booked request');
  });
  after(() => server.close());

  test('marketplace listings carry a strong ETag, may be kept 5 s, and If-None-Match gets 304 with no body', async () => {
    const all = await assertRevalidates(`${server.http}/v1/requests?user=anyone`, LISTING);
    const open = await assertRevalidates(`${server.http}/v1/requests?status=open&limit=3&user=anyone`, LISTING);
    assert.notEqual(open.etag, all.etag, 'another page is another representation');
    const requests = await assertRevalidates(`${server.http}/v1/consumers/${consumerId}/requests?user=${consumerId}`, LISTING);
    const bookings = await assertRevalidates(`${server.http}/v1/consumers/${consumerId}/bookings?user=${consumerId}`, LISTING);
    assert.ok((JSON.parse(bookings.body) as { items: unknown[] }).items.length > 0);
    assert.notEqual(requests.etag, bookings.etag);
  });

  test('conversation messages are revalidated on every read, and a new chat in the conversation changes their ETag', async () => {
    const c = await WsClient.connect(server.ws, { user: 'conv-owner' });
    const ack = await c.request({ type: 'chat.send', text: 'Need a cleaner on Monday' });
    await c.collect(ack.taskId as string);
    const url = `${server.http}/v1/conversations/${ack.conversationId as string}/messages?user=conv-owner`;
    const before = await assertRevalidates(url, LIVE);
    assert.equal((JSON.parse(before.body) as { messages: unknown[] }).messages.length, 2);

    const next = await c.request({ type: 'chat.send', text: 'And on Tuesday?', conversationId: ack.conversationId });
    await c.collect(next.taskId as string);
    const changed = await fetch(url, { headers: { 'if-none-match': before.etag } });
    assert.equal(changed.status, 200);
    const etag = changed.headers.get('etag') ?? '';
    assert.match(etag, STRONG_ETAG);
    assert.notEqual(etag, before.etag);
    assert.deepEqual(
      ((await changed.json()) as { messages: { text: string }[] }).messages.map((m) => m.text).filter((_, i) => i % 2 === 0),
      ['Need a cleaner on Monday', 'And on Tuesday?'],
    );
    assert.equal((await fetch(url, { headers: { 'if-none-match': etag } })).status, 304);

    // An ETag never stands in for authorization: another user gets 403, not 304.
    const other = await fetch(`${server.http}/v1/conversations/${ack.conversationId as string}/messages?user=someone-else`, {
      headers: { 'if-none-match': etag },
    });
    assert.equal(other.status, 403);
    await c.close();
  });

  test('a running task is revalidated and its ETag follows its deltas; a finished task may be kept 5 minutes', async () => {
    const res = await fetch(`${server.http}/v1/chat?user=tasker`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ text: 'A long plan for my garden', params: { maxTokens: 400 } }),
    });
    assert.equal(res.status, 202);
    assert.equal(res.headers.get('cache-control'), 'no-store');
    const ack = (await res.json()) as Json;
    const url = `${server.http}/v1/tasks/${ack.taskId as string}?user=tasker`;

    const running = await fetch(url);
    assert.equal(running.status, 200);
    assert.equal(running.headers.get('cache-control'), LIVE);
    const runningEtag = running.headers.get('etag') ?? '';
    const runningBody = (await running.json()) as { status: string; seq: number };
    assert.notEqual(runningBody.status, 'done');

    const c = await WsClient.connect(server.ws, { user: 'tasker' });
    await c.request({ type: 'chat.resume', taskId: ack.taskId, fromSeq: 0 });
    await c.collect(ack.taskId as string);
    await c.close();
    const done = await fetch(url, { headers: { 'if-none-match': runningEtag } });
    assert.equal(done.status, 200, 'the task changed since that ETag');
    assert.equal(done.headers.get('cache-control'), FINAL);
    assert.notEqual(done.headers.get('etag'), runningEtag);
    assert.equal(((await done.json()) as { status: string }).status, 'done');
    await assertRevalidates(url, FINAL);
  });

  test('errors, writes and the SSE stream are never stored and carry no ETag', async () => {
    const missing = await fetch(`${server.http}/v1/tasks/task_nope?user=anyone`);
    assert.equal(missing.status, 404);
    assert.equal(missing.headers.get('cache-control'), 'no-store');
    assert.equal(missing.headers.get('etag'), null);
    await missing.text();

    const bad = await fetch(`${server.http}/v1/requests?limit=zero&user=anyone`, { headers: { 'if-none-match': '*' } });
    assert.equal(bad.status, 400);
    assert.equal(bad.headers.get('cache-control'), 'no-store');
    await bad.text();

    const post = await fetch(`${server.http}/v1/chat?user=streamer`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ text: 'stream this', params: { maxTokens: 3 } }),
    });
    assert.equal(post.headers.get('etag'), null);
    const ack = (await post.json()) as Json;
    const stream = await fetch(`${server.http}/v1/tasks/${ack.taskId as string}/stream?user=streamer`);
    assert.equal(stream.status, 200);
    assert.equal(stream.headers.get('cache-control'), 'no-store');
    assert.equal(stream.headers.get('etag'), null);
    await stream.text();
  });
});
