import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, test } from 'node:test';
import { signToken } from '../../src/auth/sign.js';
import { connectSocketIO, emitWithAck, refusedUpgrade, WsClient } from '../helpers/clients.js';
import { startServer, type TestServer } from '../helpers/server.js';

interface Answer {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
}

/** One HTTP request on `agent` (keep-alive, as a flooding client uses it). */
function request(server: TestServer, path: string, agent: http.Agent, headers: Record<string, string> = {}, timeoutMs = 10_000): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port: server.port, path, agent, headers, timeout: timeoutMs }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (body += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`no answer to ${path} within ${timeoutMs} ms`)));
    req.on('error', reject);
  });
}

const HANDSHAKE = '/socket.io/?EIO=4&transport=polling';

/** A client without credentials looping polling handshakes on `loops` keep-alive connections until `stop()`. */
function flood(server: TestServer, forwardedFor: string, loops: number) {
  const agent = new http.Agent({ keepAlive: true, maxSockets: loops });
  const tally = new Map<number, number>();
  let stopped = false;
  let retryAfter: string | undefined;
  const loop = async () => {
    while (!stopped) {
      try {
        const a = await request(server, HANDSHAKE, agent, { 'x-forwarded-for': forwardedFor });
        tally.set(a.status, (tally.get(a.status) ?? 0) + 1);
        if (a.status !== 200) retryAfter = a.headers['retry-after'];
      } catch {
        // The server went away (its close is part of the test): the flood ends.
        return;
      }
    }
  };
  const running = Array.from({ length: loops }, loop);
  return {
    tally,
    retryAfter: () => retryAfter,
    count: () => [...tally.values()].reduce((a, b) => a + b, 0),
    async stop() {
      stopped = true;
      await Promise.all(running);
      agent.destroy();
    },
  };
}

async function pendingGauge(server: TestServer): Promise<number> {
  const text = await (await fetch(`${server.http}/metrics`)).text();
  const m = /^chatwire_pending_connections (\S+)$/m.exec(text);
  assert.ok(m, 'chatwire_pending_connections is exported');
  return Number(m[1]);
}

describe('connections before login are bounded', () => {
  let server: TestServer;
  before(async () => {
    // The handshake timeout at its maximum: no session frees its place by timing out while the test runs, so
    // the counts below are exact.
    server = await startServer({ trustProxy: '127.0.0.1', maxPendingPerAddress: 32, maxPendingConnections: 64, handshakeTimeoutMs: 60_000 });
  });
  after(() => server.close());

  test('a client looping polling handshakes without credentials holds at most its share; a logged-in user is served meanwhile', async () => {
    const user = await WsClient.connect(server.ws, { user: 'legit' });
    const flooder = flood(server, '10.0.0.1', 8);
    let chats = 0;
    while (flooder.count() < 3000 || chats < 20) {
      if (chats < 40) {
        const ack = await user.request({ type: 'chat.send', text: `during the flood ${chats++}` });
        assert.equal(ack.type, 'chat.ack');
        assert.equal((await user.collect(ack.taskId as string)).end.type, 'chat.done');
      }
      await new Promise((r) => setTimeout(r, 25));
    }
    // A new user from another address still gets in, on socket.io too.
    const late = await connectSocketIO(server.http, { user: 'late' });
    assert.equal((await emitWithAck(late, 'ping', {})).type, 'pong');
    late.close();
    await flooder.stop();
    assert.equal(flooder.tally.get(200), 32, `sessions made: ${JSON.stringify([...flooder.tally])}`);
    assert.equal(flooder.tally.get(429), flooder.count() - 32);
    assert.equal(flooder.retryAfter(), '1');
    assert.equal(await pendingGauge(server), 32);
    await user.close();
  });

  test('past the total bound every address is refused with 503, on socket.io, /ws and HTTP alike', async () => {
    // 10.0.0.1 holds 32 places from the test above; 10.0.0.2 takes the other 32 of the 64.
    const agent = new http.Agent({ keepAlive: true });
    for (let i = 0; i < 32; i++) assert.equal((await request(server, HANDSHAKE, agent, { 'x-forwarded-for': '10.0.0.2' })).status, 200);
    const third = await request(server, HANDSHAKE, agent, { 'x-forwarded-for': '10.0.0.3' });
    assert.equal(third.status, 503);
    assert.equal(third.headers['retry-after'], '1');
    assert.equal((JSON.parse(third.body) as { error: { code: string } }).error.code, 'overloaded');
    const upgrade = await refusedUpgrade(`${server.ws}?user=someone`, [], { 'x-forwarded-for': '10.0.0.3' });
    assert.equal(upgrade.status, 503);
    const viaHttp = await fetch(`${server.http}/v1/requests?user=someone`, { headers: { 'x-forwarded-for': '10.0.0.3' } });
    assert.equal(viaHttp.status, 503);
    assert.equal(viaHttp.headers.get('retry-after'), '1');
    // /healthz never waits on authentication: it is always answered.
    assert.equal((await fetch(`${server.http}/healthz`)).status, 200);
    agent.destroy();
  });
});

test('graceful shutdown finishes while a client floods handshakes', async () => {
  const server = await startServer({ trustProxy: '127.0.0.1', handshakeTimeoutMs: 60_000 });
  const flooder = flood(server, '10.0.0.9', 8);
  while (flooder.count() < 1000) await new Promise((r) => setTimeout(r, 20));
  await server.close();
  await flooder.stop();
  assert.ok((flooder.tally.get(200) ?? 0) <= server.config.maxPendingPerAddress);
});

test('a session that has not connected with credentials within the handshake timeout is closed and frees its place', async () => {
  const server = await startServer({ handshakeTimeoutMs: 500 });
  try {
    const agent = new http.Agent({ keepAlive: true });
    const open = await request(server, HANDSHAKE, agent);
    assert.equal(open.status, 200);
    const sid = (JSON.parse(open.body.slice(1)) as { sid: string }).sid;
    assert.equal(await pendingGauge(server), 1);
    // The long poll is answered when the server closes the session (engine.io's close packet is `1`).
    const poll = await request(server, `${HANDSHAKE}&sid=${sid}`, agent, {}, 10_000);
    assert.equal(poll.status, 200);
    // biome-ignore lint/suspicious/noControlCharactersInRegex: \x1e is engine.io's separator between the packets of one poll
    assert.match(poll.body, /^1$|\x1e1$/);
    assert.equal(await pendingGauge(server), 0);
    agent.destroy();
  } finally {
    await server.close();
  }
});

describe('credentials in the handshake request are checked there', () => {
  const SECRET = 'admission-integration-secret-0123456789abcdef';
  let server: TestServer;
  before(async () => {
    server = await startServer({ jwtSecret: SECRET, allowedOrigins: 'https://app.example' });
  });
  after(() => server.close());

  test('a bad token in ?token= or Authorization is refused before a session exists; a good one is let through', async () => {
    const agent = new http.Agent({ keepAlive: true });
    const good = await signToken({ secret: SECRET, sub: 'alice' });
    assert.equal((await request(server, `${HANDSHAKE}&token=not-a-token`, agent)).status, 403);
    assert.equal((await request(server, HANDSHAKE, agent, { authorization: 'Bearer not-a-token' })).status, 403);
    assert.equal(await pendingGauge(server), 0);
    const ok = await request(server, `${HANDSHAKE}&token=${good}`, agent);
    assert.equal(ok.status, 200);
    assert.match(ok.body, /^0\{"sid"/);
    agent.destroy();
  });

  test("socket.io's 403 to a refused origin carries no CORS grant at all; an allowed origin gets one", async () => {
    const agent = new http.Agent({ keepAlive: true });
    const refused = await request(server, HANDSHAKE, agent, { origin: 'https://evil.example' });
    assert.equal(refused.status, 403);
    assert.equal(refused.headers['access-control-allow-origin'], undefined);
    assert.equal(refused.headers['access-control-allow-credentials'], undefined);
    const allowed = await request(server, HANDSHAKE, agent, { origin: 'https://app.example' });
    assert.equal(allowed.status, 200);
    assert.equal(allowed.headers['access-control-allow-origin'], 'https://app.example');
    assert.equal(allowed.headers['access-control-allow-credentials'], 'true');
    agent.destroy();
  });
});

test('the addresses of one IPv6 /64 share one address share of the places waiting to authenticate', async () => {
  const server = await startServer({ trustProxy: '127.0.0.1', maxPendingPerAddress: 4, maxPendingConnections: 64, handshakeTimeoutMs: 60_000 });
  try {
    const agent = new http.Agent({ keepAlive: true });
    const statuses: number[] = [];
    for (let i = 1; i <= 10; i++) statuses.push((await request(server, HANDSHAKE, agent, { 'x-forwarded-for': `2001:db8:1:2::${i.toString(16)}` })).status);
    assert.deepEqual(statuses, [200, 200, 200, 200, 429, 429, 429, 429, 429, 429]);
    const upgrade = await refusedUpgrade(`${server.ws}?user=someone`, [], { 'x-forwarded-for': '2001:db8:1:2:ffff::1' });
    assert.equal(upgrade.status, 429);
    // The next /64 is another client.
    assert.equal((await request(server, HANDSHAKE, agent, { 'x-forwarded-for': '2001:db8:1:3::1' })).status, 200);
    assert.equal(await pendingGauge(server), 5);
    agent.destroy();
  } finally {
    await server.close();
  }
});
