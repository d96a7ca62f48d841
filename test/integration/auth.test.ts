import assert from 'node:assert/strict';
import type { IncomingHttpHeaders } from 'node:http';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import { SignJWT } from 'jose';
import { pino } from 'pino';
import WebSocket from 'ws';
import { createApp, SQLITE_FILE } from '../../src/app.js';
import { signToken } from '../../src/auth/sign.js';
import { loadConfig } from '../../src/config.js';
import { Database } from '../../src/db/database.js';
import { formatId } from '../../src/db/marketplace-ids.js';
import { seedMarketplace } from '../../src/db/marketplace-seed.js';
import { migrate } from '../../src/db/migrate.js';
import { connectSocketIO, emitWithAck, RawSocketIO, readSse, WsClient, refusedSocketIO, refusedUpgrade } from '../helpers/clients.js';
import { startServer, tempDataDir, type TestServer } from '../helpers/server.js';

const SECRET = 'auth-integration-secret-0123456789-abcdefgh';
const OTHER_SECRET = 'some-other-issuers-secret-0123456789-abcdef';

type ErrorBody = { error: { code: string; message: string } };

const b64 = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url');
const nowSec = () => Math.floor(Date.now() / 1000);

/** Every way a token can be wrong, each refused the same way on every transport. */
async function badTokens(): Promise<{ name: string; token: string | undefined }[]> {
  const valid = await signToken({ secret: SECRET, sub: 'mallory' });
  const [header, payload, signature] = valid.split('.') as [string, string, string];
  const forgedPayload = b64({ ...JSON.parse(Buffer.from(payload, 'base64url').toString()), sub: 'alice' });
  return [
    { name: 'missing', token: undefined },
    { name: 'garbage', token: 'not-a-jwt' },
    { name: 'expired', token: await signToken({ secret: SECRET, sub: 'mallory', ttlSec: 60, now: () => Date.now() - 3_600_000 }) },
    { name: 'alg none', token: `${b64({ alg: 'none', typ: 'JWT' })}.${b64({ sub: 'alice', role: 'staff', exp: nowSec() + 3600 })}.` },
    { name: 'wrong secret', token: await signToken({ secret: OTHER_SECRET, sub: 'alice', role: 'staff' }) },
    { name: 'tampered payload', token: `${header}.${forgedPayload}.${signature}` },
    {
      name: 'HS512 with the right secret',
      token: await new SignJWT({ role: 'staff' })
        .setProtectedHeader({ alg: 'HS512' })
        .setSubject('alice')
        .setExpirationTime(nowSec() + 3600)
        .sign(new TextEncoder().encode(SECRET)),
    },
    {
      name: 'unknown role',
      token: await new SignJWT({ role: 'admin' })
        .setProtectedHeader({ alg: 'HS256' })
        .setSubject('alice')
        .setExpirationTime(nowSec() + 3600)
        .sign(new TextEncoder().encode(SECRET)),
    },
  ];
}

/** Frames sent over /ws so far, from /metrics: every opened socket gets a hello. */
async function wsFramesOut(server: TestServer): Promise<number> {
  const text = await (await fetch(`${server.http}/metrics`)).text();
  return Number(/^chatwire_frames_out_total\{transport="ws"\} (\d+)$/m.exec(text)?.[1] ?? 0);
}

function bearer(token: string): Record<string, string> {
  return { authorization: `Bearer ${token}` };
}

describe('with CHATWIRE_JWT_SECRET set, every transport needs an HS256 token', () => {
  let server: TestServer;
  let alice: string;
  let bob: string;
  let staff: string;
  let provider: string;
  // Requests per consumer in the seeded data set, read before the server starts.
  let requestsOf: Map<string, number>;
  let bookingsOf: Map<string, number>;

  before(async () => {
    const dataDir = tempDataDir();
    const db = new Database(path.join(dataDir, SQLITE_FILE));
    migrate(db);
    seedMarketplace(db, { consumers: 3, providers: 8, requests: 40, seed: 11 });
    const count = (table: string) =>
      new Map(
        (db.raw.prepare(`SELECT consumer_id AS id, count(*) AS n FROM ${table} GROUP BY consumer_id`).all() as { id: number; n: number }[]).map((r) => [
          formatId('consumer', r.id),
          r.n,
        ]),
      );
    requestsOf = count('requests');
    bookingsOf = count('bookings');
    db.close();
    server = await startServer({ jwtSecret: SECRET, devTokenDelayMs: 5 }, dataDir);
    alice = await signToken({ secret: SECRET, sub: 'alice' });
    bob = await signToken({ secret: SECRET, sub: 'bob' });
    staff = await signToken({ secret: SECRET, sub: 'sam-staff', role: 'staff' });
    provider = await signToken({ secret: SECRET, sub: 'c_0000000001', role: 'provider' });
  });
  after(() => server.close());

  test('a token in ?token= opens /ws as its subject, and ?user= is ignored', async () => {
    const c = await WsClient.connect(server.ws, { token: alice, user: 'bob' });
    const hello = await c.nextOfType('hello');
    assert.equal(hello.userId, 'alice');
    await c.close();
  });

  test('a token offered as the subprotocol bearer.<token> opens /ws, and only chatwire.v1 is echoed', async () => {
    const socket = new WebSocket(server.ws, ['chatwire.v1', `bearer.${alice}`]);
    const upgradeHeaders = new Promise<IncomingHttpHeaders>((resolve) => socket.once('upgrade', (res) => resolve(res.headers)));
    const hello = new Promise<Record<string, unknown>>((resolve, reject) => {
      socket.once('message', (data) => resolve(JSON.parse(data.toString()) as Record<string, unknown>));
      socket.once('error', reject);
    });
    const headers = await upgradeHeaders;
    assert.equal(headers['sec-websocket-protocol'], 'chatwire.v1');
    assert.ok(!JSON.stringify(headers).includes(alice), 'the token is not copied into the response');
    const first = await hello;
    assert.equal(first.type, 'hello');
    assert.equal(first.userId, 'alice');
    assert.equal(socket.protocol, 'chatwire.v1');
    const closed = new Promise((resolve) => socket.once('close', resolve));
    socket.close();
    await closed;
  });

  test('socket.io takes the token from auth.token', async () => {
    const s = await connectSocketIO(server.http, { token: alice, user: 'bob' });
    try {
      const pong = await emitWithAck(s, 'ping', { id: 'p' });
      assert.deepEqual(pong, { type: 'pong', id: 'p' });
      assert.equal(s.received.find((e) => e.type === 'hello')?.userId, 'alice');
    } finally {
      s.close();
    }
  });

  test('HTTP takes the token from Authorization: Bearer, for reads and for a chat with a body', async () => {
    const res = await fetch(`${server.http}/v1/requests?limit=2`, { headers: bearer(alice) });
    assert.equal(res.status, 200);
    assert.equal(((await res.json()) as { items: unknown[] }).items.length, 2);
    // The body must survive the asynchronous token check (uWS drops chunks nobody listens for yet).
    const posted = await fetch(`${server.http}/v1/chat`, {
      method: 'POST',
      headers: { ...bearer(alice), 'content-type': 'application/json' },
      body: JSON.stringify({ id: 'h1', text: 'Posted over HTTP with a token', params: { maxTokens: 3 } }),
    });
    assert.equal(posted.status, 202);
    const ack = (await posted.json()) as { id: string; taskId: string };
    assert.equal(ack.id, 'h1');
    const task = await fetch(`${server.http}/v1/tasks/${ack.taskId}/stream`, { headers: bearer(alice) });
    const events = await readSse(task);
    assert.deepEqual(
      events.map((e) => e.event),
      ['delta', 'delta', 'delta', 'done'],
    );
  });

  test('a token without exp is accepted (the protocol requires only sub); CHATWIRE_JWT_REQUIRE_EXP refuses it', async () => {
    const noExp = await new SignJWT({ role: 'consumer' })
      .setProtectedHeader({ alg: 'HS256' })
      .setSubject('alice')
      .setIssuedAt()
      .sign(new TextEncoder().encode(SECRET));
    const c = await WsClient.connect(server.ws, { token: noExp });
    assert.equal((await c.nextOfType('hello')).userId, 'alice');
    await c.close();
    assert.equal((await fetch(`${server.http}/v1/requests?limit=1`, { headers: bearer(noExp) })).status, 200);

    const strict = await startServer({ jwtSecret: SECRET, jwtRequireExp: true });
    try {
      const res = await fetch(`${strict.http}/v1/requests?limit=1`, { headers: bearer(noExp) });
      assert.equal(res.status, 401);
      assert.deepEqual(((await res.json()) as ErrorBody).error, { code: 'unauthorized', message: 'token has no exp claim' });
      assert.equal((await fetch(`${strict.http}/v1/requests?limit=1`, { headers: bearer(alice) })).status, 200);
    } finally {
      await strict.close();
    }

    // CHATWIRE_JWT_AUDIENCE / CHATWIRE_JWT_ISSUER: a token minted for another service sharing the secret is refused.
    const scoped = await startServer({ jwtSecret: SECRET, jwtAudience: 'chatwire', jwtIssuer: 'https://id.example' });
    try {
      const mint = (aud: string) =>
        new SignJWT({})
          .setProtectedHeader({ alg: 'HS256' })
          .setSubject('alice')
          .setAudience(aud)
          .setIssuer('https://id.example')
          .setExpirationTime(nowSec() + 3600)
          .sign(new TextEncoder().encode(SECRET));
      assert.equal((await fetch(`${scoped.http}/v1/requests?limit=1`, { headers: bearer(await mint('chatwire')) })).status, 200);
      const res = await fetch(`${scoped.http}/v1/requests?limit=1`, { headers: bearer(await mint('billing')) });
      assert.equal(res.status, 401);
      assert.equal(((await res.json()) as ErrorBody).error.message, 'token audience (aud) is not this service');
      const refusal = await refusedUpgrade(`${scoped.ws}?token=${await mint('billing')}`);
      assert.equal(refusal.status, 401);
    } finally {
      await scoped.close();
    }
  });

  test('CHATWIRE_JWT_MAX_TTL_SEC refuses a token valid for longer (exp 1e300) on HTTP and the /ws upgrade, and accepts one within it', async () => {
    const mint = (exp: number) =>
      new SignJWT({}).setProtectedHeader({ alg: 'HS256' }).setSubject('alice').setIssuedAt().setExpirationTime(exp).sign(new TextEncoder().encode(SECRET));
    const forever = await new SignJWT({ exp: 1e300 }).setProtectedHeader({ alg: 'HS256' }).setSubject('alice').sign(new TextEncoder().encode(SECRET));
    // Without the setting the lifetime is not bounded (as before).
    assert.equal((await fetch(`${server.http}/v1/requests?limit=1`, { headers: bearer(forever) })).status, 200);
    const bounded = await startServer({ jwtSecret: SECRET, jwtMaxTtlSec: 3600 });
    try {
      const res = await fetch(`${bounded.http}/v1/requests?limit=1`, { headers: bearer(forever) });
      assert.equal(res.status, 401);
      assert.deepEqual(((await res.json()) as ErrorBody).error, {
        code: 'unauthorized',
        message: 'token lifetime too long: exp is more than 3600 s after now; this server accepts tokens valid for at most 3600 s',
      });
      assert.equal((await refusedUpgrade(`${bounded.ws}?token=${forever}`)).status, 401);
      assert.equal((await fetch(`${bounded.http}/v1/requests?limit=1`, { headers: bearer(await mint(nowSec() + 86_400)) })).status, 401);
      assert.equal((await fetch(`${bounded.http}/v1/requests?limit=1`, { headers: bearer(await mint(nowSec() + 3000)) })).status, 200);
    } finally {
      await bounded.close();
    }
  });

  test('a missing, bad, expired, alg-none, wrong-secret or tampered token refuses the /ws upgrade with 401 before any socket opens', async () => {
    const framesOutBefore = await wsFramesOut(server);
    for (const { name, token } of await badTokens()) {
      const url = new URL(server.ws);
      if (token !== undefined) url.searchParams.set('token', token);
      url.searchParams.set('user', 'alice');
      const refusal = await refusedUpgrade(url.toString());
      assert.equal(refusal.status, 401, name);
      assert.equal(refusal.headers['www-authenticate'], 'Bearer', name);
      const body = JSON.parse(refusal.body) as ErrorBody;
      assert.equal(body.error.code, 'unauthorized', name);
      if (token !== undefined) assert.ok(!refusal.body.includes(token), `${name}: the token is not echoed`);
      assert.doesNotMatch(body.error.message, /\n\s+at /, name);
    }
    const viaSubprotocol = await refusedUpgrade(server.ws, ['chatwire.v1', `bearer.${(await badTokens())[4]!.token!}`]);
    assert.equal(viaSubprotocol.status, 401);
    assert.equal(await wsFramesOut(server), framesOutBefore, 'no socket opened, so no hello went out');
  });

  test('a bad token makes socket.io refuse the handshake with connect_error data unauthorized', async () => {
    for (const { name, token } of await badTokens()) {
      const { error, events } = await refusedSocketIO(server.http, token === undefined ? { user: 'alice' } : { token, user: 'alice' });
      assert.deepEqual({ code: (error.data as { code: string }).code, events }, { code: 'unauthorized', events: [] }, name);
      assert.equal(typeof (error.data as { message: string }).message, 'string', name);
    }
  });

  test('a refused socket.io handshake closes the connection: no half-open socket is left', async () => {
    for (const { name, token } of (await badTokens()).slice(0, 3)) {
      const raw = await RawSocketIO.connect(server.http, token === undefined ? {} : { token });
      const refusal = await raw.next((p) => p.startsWith('44'));
      assert.equal((JSON.parse(refusal.slice(2)) as { data: { code: string } }).data.code, 'unauthorized', name);
      // Closed by the server well before socket.io's own connectTimeout (45 s) would have.
      const closedSoon = await Promise.race([raw.closed.then(() => true), sleep(10_000).then(() => false)]);
      assert.ok(closedSoon, `${name}: the refused connection is still open`);
      assert.deepEqual(raw.events('hello'), [], name);
    }
  });

  test('a bad token gets HTTP 401 with the error body on every route', async () => {
    const tokens = await badTokens();
    for (const { name, token } of tokens) {
      const headers = token === undefined ? {} : bearer(token);
      for (const [method, route] of [
        ['GET', '/v1/requests'],
        ['GET', '/v1/tasks/task_x'],
        ['GET', '/v1/tasks/task_x/stream'],
        ['POST', '/v1/chat'],
      ] as const) {
        const init: RequestInit = { method, headers: { ...headers, 'content-type': 'application/json' } };
        if (method === 'POST') init.body = JSON.stringify({ text: 'hello' });
        const res = await fetch(`${server.http}${route}?user=alice`, init);
        assert.equal(res.status, 401, `${name} ${method} ${route}`);
        assert.equal(res.headers.get('www-authenticate'), 'Bearer', `${name} ${route}`);
        const text = await res.text();
        assert.equal((JSON.parse(text) as ErrorBody).error.code, 'unauthorized', `${name} ${route}`);
        if (token !== undefined) assert.ok(!text.includes(token), `${name}: the token is not echoed`);
      }
    }
    // A token in ?token= counts on HTTP too, and a bad one there is refused alike.
    assert.equal((await fetch(`${server.http}/v1/requests?token=${alice}`)).status, 200);
    assert.equal((await fetch(`${server.http}/v1/requests?token=${tokens[4]!.token!}`)).status, 401);
  });

  test("a consumer reads only its own records; staff reads any consumer's", async () => {
    const own = 'c_0000000001';
    const other = 'c_0000000002';
    assert.ok((requestsOf.get(own) ?? 0) > 0 && (requestsOf.get(other) ?? 0) > 0, 'the seed gives both consumers requests');
    const consumer = await signToken({ secret: SECRET, sub: own });

    const c = await WsClient.connect(server.ws, { token: consumer });
    const mine = await c.request({ type: 'consumer.requests', consumerId: own, limit: 100 });
    assert.equal(mine.type, 'consumer.requests');
    assert.equal((mine.items as unknown[]).length, requestsOf.get(own));
    assert.ok((mine.items as { consumerId: string }[]).every((i) => i.consumerId === own));
    const myBookings = await c.request({ type: 'consumer.bookings', consumerId: own, limit: 100 });
    assert.equal((myBookings.items as unknown[]).length, bookingsOf.get(own) ?? 0);
    for (const type of ['consumer.requests', 'consumer.bookings']) {
      const theirs = await c.request({ type, consumerId: other });
      assert.deepEqual([theirs.type, theirs.code], ['error', 'forbidden'], type);
      // Forbidden whether or not the consumer exists: the answer does not reveal which ids are taken.
      const nobody = await c.request({ type, consumerId: 'c_0000009999' });
      assert.deepEqual([nobody.type, nobody.code], ['error', 'forbidden'], type);
    }
    await c.close();

    // A provider token whose sub happens to equal a consumer id is still that consumer's id: the rule is sub == consumerId.
    const asProvider = await fetch(`${server.http}/v1/consumers/${other}/requests`, { headers: bearer(provider) });
    assert.equal(asProvider.status, 403);
    assert.equal(((await asProvider.json()) as ErrorBody).error.code, 'forbidden');

    const theirsOverHttp = await fetch(`${server.http}/v1/consumers/${other}/bookings`, { headers: bearer(consumer) });
    assert.equal(theirsOverHttp.status, 403);
    assert.equal(((await theirsOverHttp.json()) as ErrorBody).error.code, 'forbidden');

    const s = await connectSocketIO(server.http, { token: staff });
    try {
      for (const id of [own, other]) {
        const page = await emitWithAck(s, 'consumer.requests', { consumerId: id, limit: 100 });
        assert.equal((page.items as unknown[]).length, requestsOf.get(id), id);
        assert.ok((page.items as { consumerId: string }[]).every((i) => i.consumerId === id));
      }
      const missing = await emitWithAck(s, 'consumer.bookings', { consumerId: 'c_0000009999' });
      assert.deepEqual([missing.type, missing.code], ['error', 'not_found']);
    } finally {
      s.close();
    }
    const staffHttp = await fetch(`${server.http}/v1/consumers/${other}/bookings?limit=100`, { headers: bearer(staff) });
    assert.equal(staffHttp.status, 200);
    assert.equal(((await staffHttp.json()) as { items: unknown[] }).items.length, bookingsOf.get(other) ?? 0);
  });

  test("another user's task and conversation are forbidden on every transport, and its task runs on untouched", async () => {
    const a = await WsClient.connect(server.ws, { token: alice });
    const ack = await a.request({ type: 'chat.send', text: 'Private: my door code is 4411', params: { maxTokens: 60 } });
    assert.equal(ack.type, 'chat.ack');
    const { taskId, conversationId } = ack as unknown as { taskId: string; conversationId: string };

    const b = await WsClient.connect(server.ws, { token: bob });
    await b.nextOfType('hello');
    for (const message of [
      { type: 'chat.resume', taskId, fromSeq: 0 },
      { type: 'task.get', taskId },
      { type: 'chat.cancel', taskId },
      { type: 'conversation.history', conversationId },
      { type: 'chat.send', conversationId, text: 'let me in' },
    ]) {
      const reply = await b.request(message);
      assert.deepEqual([reply.type, reply.code], ['error', 'forbidden'], message.type);
    }
    const unknown = await b.request({ type: 'task.get', taskId: 'task_AAAAAAAAAAAAAAAAAAAAAA' });
    assert.deepEqual([unknown.type, unknown.code], ['error', 'not_found']);

    const s = await connectSocketIO(server.http, { token: bob });
    try {
      for (const [event, payload] of [
        ['chat.resume', { taskId, fromSeq: 0 }],
        ['task.get', { taskId }],
        ['chat.cancel', { taskId }],
        ['conversation.history', { conversationId }],
      ] as const) {
        const reply = await emitWithAck(s, event, payload);
        assert.deepEqual([reply.type, reply.code], ['error', 'forbidden'], event);
      }
    } finally {
      s.close();
    }

    for (const [route, init] of [
      [`/v1/tasks/${taskId}`, {}],
      [`/v1/tasks/${taskId}/stream`, {}],
      [`/v1/conversations/${conversationId}/messages`, {}],
      ['/v1/chat', { method: 'POST', body: JSON.stringify({ conversationId, text: 'let me in' }), headers: { 'content-type': 'application/json' } }],
    ] as const) {
      const res = await fetch(`${server.http}${route}`, { ...init, headers: { ...('headers' in init ? init.headers : {}), ...bearer(bob) } });
      assert.equal(res.status, 403, route);
      assert.equal(((await res.json()) as ErrorBody).error.code, 'forbidden', route);
    }

    // Alice's task was neither cancelled nor joined by anyone else, and her conversation holds only her exchange.
    const { end, text, deltas } = await a.collect(taskId);
    assert.equal(end.type, 'chat.done');
    assert.equal(end.finishReason, 'length');
    assert.equal(deltas.length > 0, true);
    assert.equal(
      b.received.some((m) => m.type === 'chat.delta'),
      false,
      'bob received none of her deltas',
    );
    const history = await a.request({ type: 'conversation.history', conversationId });
    assert.deepEqual(
      (history.messages as { text: string }[]).map((m) => m.text),
      ['Private: my door code is 4411', text],
    );
    // Alice herself reads her task and stream over HTTP.
    const own = await fetch(`${server.http}/v1/tasks/${taskId}/stream`, { headers: bearer(alice) });
    assert.equal(own.status, 200);
    assert.equal((await readSse(own)).at(-1)?.event, 'done');
    await a.close();
    await b.close();
  });

  test('task ids carry at least 96 random bits and do not repeat', async () => {
    const c = await WsClient.connect(server.ws, { token: alice });
    const ids = new Set<string>();
    for (let i = 0; i < 20; i++) {
      const ack = await c.request({ type: 'chat.send', text: `id check ${i}`, params: { maxTokens: 1 } });
      const taskId = ack.taskId as string;
      // task_, the time as 9 base-36 digits, then the random part.
      const match = /^task_[0-9a-z]{9}([A-Za-z0-9_-]{22})$/.exec(taskId);
      assert.ok(match, taskId);
      assert.ok(Buffer.from(match[1]!, 'base64url').length * 8 >= 96);
      ids.add(taskId);
    }
    assert.equal(ids.size, 20);
    await c.close();
  });
});

/** Starts an app with a pino logger writing JSON lines into memory, as main.ts would with stdout. */
async function startWithLog(overrides: Parameters<typeof loadConfig>[1]): Promise<{ lines: Record<string, unknown>[]; close(): Promise<void>; port: number }> {
  const lines: Record<string, unknown>[] = [];
  const dataDir = tempDataDir();
  const config = loadConfig({}, { port: 0, host: '127.0.0.1', dataDir, devTokenDelayMs: 0, workerThreads: 1, logLevel: 'info', ...overrides });
  const log = pino({ level: 'info' }, { write: (line: string) => void lines.push(JSON.parse(line) as Record<string, unknown>) });
  const app = await createApp(config, { log });
  return {
    lines,
    port: app.port,
    async close() {
      await app.close();
      const fs = await import('node:fs');
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

describe('open mode (no CHATWIRE_JWT_SECRET)', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({});
  });
  after(() => server.close());

  test('a warning that the server is open is logged at start, and none with a secret', async () => {
    const open = await startWithLog({});
    try {
      const warnings = open.lines.filter((l) => l.level === 40).map((l) => l.msg as string);
      assert.equal(warnings.filter((m) => /open mode/.test(m)).length, 1, JSON.stringify(warnings));
      assert.equal(warnings.filter((m) => /token settings/.test(m)).length, 0, JSON.stringify(warnings));
    } finally {
      await open.close();
    }
    // Token settings without a secret would silently do nothing: said at start.
    const openScoped = await startWithLog({ jwtAudience: 'chatwire', jwtRequireExp: true });
    try {
      const warning = openScoped.lines.find((l) => l.level === 40 && /token settings do nothing/.test(l.msg as string));
      assert.deepEqual(warning?.settings, ['CHATWIRE_JWT_REQUIRE_EXP', 'CHATWIRE_JWT_AUDIENCE']);
    } finally {
      await openScoped.close();
    }
    const secured = await startWithLog({ jwtSecret: SECRET });
    try {
      assert.deepEqual(
        secured.lines.filter((l) => l.level === 40),
        [],
      );
    } finally {
      await secured.close();
    }
    const weak = await startWithLog({ jwtSecret: 'short-secret' });
    try {
      const warnings = weak.lines.filter((l) => l.level === 40).map((l) => l.msg as string);
      assert.equal(warnings.filter((m) => /shorter than 32 bytes/.test(m)).length, 1, JSON.stringify(warnings));
      assert.ok(!JSON.stringify(weak.lines).includes('short-secret'), 'the secret itself is never logged');
    } finally {
      await weak.close();
    }
  });

  test('?user= (or socket.io auth.user) is trusted as the user id, and a token is not needed', async () => {
    const c = await WsClient.connect(server.ws, { user: 'olivia' });
    assert.equal((await c.nextOfType('hello')).userId, 'olivia');
    await c.close();
    const s = await connectSocketIO(server.http, { user: 'olivia' });
    assert.equal((await emitWithAck(s, 'ping', {})).type, 'pong');
    assert.equal(s.received.find((e) => e.type === 'hello')?.userId, 'olivia');
    s.close();
    const ack = await fetch(`${server.http}/v1/chat?user=olivia`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"text":"hi"}' });
    assert.equal(ack.status, 202);
    const { taskId } = (await ack.json()) as { taskId: string };
    assert.equal((await fetch(`${server.http}/v1/tasks/${taskId}?user=olivia`)).status, 200);
    assert.equal((await fetch(`${server.http}/v1/tasks/${taskId}?user=oscar`)).status, 403);
  });

  test('an open-mode user id outside the safe character set is refused with 401', async () => {
    const url = new URL(server.ws);
    url.searchParams.set('user', 'eve\nadmin');
    const refusal = await refusedUpgrade(url.toString());
    assert.equal(refusal.status, 401);
    assert.equal((JSON.parse(refusal.body) as ErrorBody).error.code, 'unauthorized');
  });
});
