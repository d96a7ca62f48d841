/**
 * Limits that the node:http mount enforces in its own dispatch (node-http.ts), against chatwire attached to a plain
 * node:http server: handshakes the `ws` package would refuse, socket.io admission, keep-alive refusals.
 */
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { refusedUpgrade, WsClient } from '../helpers/clients.js';
import { startServer, type TestServer } from '../helpers/server.js';

// test/helpers/server.ts mounts chatwire on a node:http server when this is set.
process.env.CHATWIRE_TEST_SERVER = 'node';

/** Sends one raw upgrade request and resolves with the status line the server answers (or '' if it just closes). */
function rawUpgrade(port: number, path: string, headers: Record<string, string>): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1', () => {
      const lines = [`GET ${path} HTTP/1.1`, 'Host: 127.0.0.1', ...Object.entries(headers).map(([k, v]) => `${k}: ${v}`)];
      socket.write(`${lines.join('\r\n')}\r\n\r\n`);
    });
    let got = '';
    socket.setEncoding('utf8');
    socket.on('data', (c: string) => (got += c));
    socket.on('close', () => resolve(got.split('\r\n')[0] ?? ''));
    socket.on('error', reject);
  });
}

describe('/ws on the node:http mount', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ maxConnectionsPerUser: 3 });
  });
  after(() => server.close());

  test('an upgrade the WebSocket handshake rules refuse is answered 400 and holds none of the user connection slots', async () => {
    const base = { Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==' };
    const bad = [{ ...base, 'Sec-WebSocket-Version': '12' }, { ...base, 'Sec-WebSocket-Version': '13', 'Sec-WebSocket-Key': 'short' }, { ...base }];
    for (const headers of bad) assert.match(await rawUpgrade(server.port, '/ws?user=mallory', headers), /^HTTP\/1\.1 400 /);
    const clients: WsClient[] = [];
    for (let i = 0; i < 3; i++) clients.push(await WsClient.connect(server.ws, { user: 'mallory' }));
    assert.equal((await refusedUpgrade(`${server.ws}?user=mallory`)).status, 429);
    for (const c of clients) await c.close();
  });
});

/** One GET on a fresh connection: its status and Retry-After. */
async function get(server: TestServer, path: string, headers: Record<string, string> = {}): Promise<{ status: number; retryAfter: string | null }> {
  const res = await fetch(`${server.http}${path}`, { headers });
  await res.arrayBuffer();
  return { status: res.status, retryAfter: res.headers.get('retry-after') };
}

describe('socket.io on the node:http mount', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ trustProxy: '127.0.0.1', maxPendingPerAddress: 4, maxPendingConnections: 64, handshakeTimeoutMs: 60_000 });
  });
  after(() => server.close());

  test('handshakes without credentials from one address hold at most its share of the places waiting to authenticate', async () => {
    const handshake = '/socket.io/?EIO=4&transport=polling';
    const answers = [];
    for (let i = 0; i < 10; i++) answers.push(await get(server, handshake, { 'x-forwarded-for': '10.0.0.1' }));
    assert.deepEqual(
      answers.map((a) => a.status),
      [200, 200, 200, 200, 429, 429, 429, 429, 429, 429],
    );
    assert.equal(answers.at(-1)?.retryAfter, '1');
    const upgrade = await refusedUpgrade(`${server.ws.replace('/ws', '/socket.io/')}?EIO=4&transport=websocket`, [], { 'x-forwarded-for': '10.0.0.1' });
    assert.equal(upgrade.status, 429);
    // Another address is still let in.
    assert.equal((await get(server, handshake, { 'x-forwarded-for': '10.0.0.2' })).status, 200);
  });
});
