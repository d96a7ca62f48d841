/**
 * One user flooding frames that cost more to decode than they are worth, spread over many connections, on /ws
 * and socket.io. Every frame is charged before it is decoded, a frame with more structure than any message is
 * refused without being decoded, the refusals of all the user's connections count together toward the flood
 * close, and the replies stay small; another user is served meanwhile. What this costs the main thread is
 * measured by `npm run bench:flood-frames` (a figure, not a test assertion).
 */
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import { FLOOD_REFUSALS, FLOOD_REFUSALS_PER_CONNECTION } from '../../src/transport/session.js';
import { RawSocketIO, refusedUpgrade, WsClient } from '../helpers/clients.js';
import { startServer, type TestServer } from '../helpers/server.js';

const FRAME_BYTES = 64 * 1024;
// 32,000 nested arrays: 64,000 bytes, just under the frame limit.
const NESTED = '['.repeat(32_000) + ']'.repeat(32_000);

/** Sends `frame` until the server closes the connection (or `cap` frames went); the close code, or null if it stayed open. */
async function floodWs(c: WsClient, frame: string, cap: number): Promise<number | null> {
  for (let i = 0; i < cap && c.closeCode === null; i++) {
    c.socket.send(frame);
    if (i % 8 === 7) await sleep(1);
  }
  return Promise.race([c.closed, sleep(5000).then(() => null)]);
}

async function floodSocketIO(s: RawSocketIO, packet: string, cap: number): Promise<number | null> {
  let closed = false;
  void s.closed.then(() => {
    closed = true;
  });
  for (let i = 0; i < cap && !closed; i++) {
    s.socket.send(packet);
    if (i % 8 === 7) await sleep(1);
  }
  return Promise.race([s.closed, sleep(5000).then(() => null)]);
}

/** Another user's ping and chat, answered while the flood runs. */
async function bystanderServed(server: TestServer): Promise<void> {
  const c = await WsClient.connect(server.ws, { user: 'bystander' });
  try {
    assert.equal((await c.request({ type: 'ping' })).type, 'pong');
    const ack = await c.request({ type: 'chat.send', text: 'still served?', cache: 'bypass' });
    assert.equal(ack.type, 'chat.ack');
    assert.equal((await c.collect(ack.taskId as string)).end.type, 'chat.done');
  } finally {
    await c.close();
  }
}

describe('frames that cost more to decode than they are worth', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ maxFrameBytes: FRAME_BYTES, messagesPerSecond: 50, maxConnectionsPerUser: 16 });
  });
  after(() => server.close());

  test('64 KiB frames of 32,000 nested arrays over 16 /ws connections: refused undecoded, every connection closed 1008, another user served', async () => {
    const conns = await Promise.all(Array.from({ length: 16 }, () => WsClient.connect(server.ws, { user: 'deep' })));
    await Promise.all(conns.map((c) => c.nextOfType('hello')));
    // Each connection alone stays far under FLOOD_REFUSALS: only the user's refusals counted together close them.
    const PER_CONNECTION = 60;
    assert.ok(PER_CONNECTION < FLOOD_REFUSALS);
    const [codes] = await Promise.all([Promise.all(conns.map((c) => floodWs(c, NESTED, PER_CONNECTION))), bystanderServed(server)]);
    assert.deepEqual(
      codes,
      conns.map(() => 1008),
    );
    const replies = conns.flatMap((c) => c.received.filter((m) => m.type === 'error'));
    const refused = replies.filter((m) => m.code === 'rate_limited').length;
    const answered = replies.filter((m) => m.code === 'bad_request');
    // Admitted frames were refused by the scan, never decoded; the rest were refused for the rate until the close.
    for (const m of answered) assert.equal(m.message, 'frame nests deeper than any message (at most 2 levels)');
    assert.ok(answered.length >= 50 && answered.length < 100, `answered ${answered.length}`);
    assert.ok(refused > FLOOD_REFUSALS && refused <= FLOOD_REFUSALS + 16 * (FLOOD_REFUSALS_PER_CONNECTION + 1), `refused ${refused}`);
    // The user is held back from coming straight back.
    assert.equal((await refusedUpgrade(`${server.ws}?user=deep`)).status, 429);
  });

  test('the same frames over 4 socket.io connections: never handed to socket.io, every connection closed, another user served', async () => {
    const conns = await Promise.all(Array.from({ length: 4 }, () => RawSocketIO.connect(server.http, { user: 'deep-sio' })));
    await Promise.all(conns.map((s) => s.next((p) => p.startsWith('40'))));
    const PER_CONNECTION = 150;
    assert.ok(PER_CONNECTION < FLOOD_REFUSALS);
    const packet = `421["ping",${NESTED}]`;
    const [codes] = await Promise.all([Promise.all(conns.map((s) => floodSocketIO(s, packet, PER_CONNECTION))), bystanderServed(server)]);
    for (const code of codes) assert.notEqual(code, null, 'closed by the server');
    // Replies are ACK packets (the event asked for one): `431[{...}]`.
    const replies = conns.flatMap((s) => s.packets.filter((p) => p.startsWith('431[')).map((p) => (JSON.parse(p.slice(3)) as Record<string, unknown>[])[0]!));
    const answered = replies.filter((m) => m.code === 'bad_request');
    for (const m of answered) assert.equal(m.message, 'frame nests deeper than any message (at most 3 levels)');
    assert.ok(answered.length >= 50, `answered ${answered.length}`);
    assert.ok(replies.filter((m) => m.code === 'rate_limited').length > FLOOD_REFUSALS);
  });

  test('a flood of flat frames just under the size limit over 4 /ws connections gets small replies and is closed; another user served', async () => {
    const conns = await Promise.all(Array.from({ length: 4 }, () => WsClient.connect(server.ws, { user: 'wide' })));
    await Promise.all(conns.map((c) => c.nextOfType('hello')));
    const frame = JSON.stringify({ type: 'ping', id: 'p', pad: 'x'.repeat(FRAME_BYTES - 100) });
    assert.ok(frame.length <= FRAME_BYTES && frame.length > FRAME_BYTES - 100);
    const [codes] = await Promise.all([Promise.all(conns.map((c) => floodWs(c, frame, 200))), bystanderServed(server)]);
    assert.deepEqual(
      codes,
      conns.map(() => 1008),
    );
    for (const c of conns) {
      for (const m of c.received.filter((x) => x.type === 'error')) {
        assert.ok(JSON.stringify(m).length < 300, `a reply of ${JSON.stringify(m).length} bytes`);
        assert.equal(m.id, 'p');
      }
    }
  });

  test('a frame of 6,400 unknown keys gets a small bad_request on /ws; such a body, or a deeply nested one, a small 400 over HTTP', async () => {
    const keys: Record<string, number> = {};
    for (let i = 0; i < 6400; i++) keys[`k${i.toString(36)}`] = 0;
    const c = await WsClient.connect(server.ws, { user: 'keys' });
    c.send({ type: 'ping', id: 'k', ...keys });
    const reply = await c.nextOfType('error');
    assert.equal(reply.code, 'bad_request');
    assert.equal(reply.id, 'k');
    assert.ok(JSON.stringify(reply).length < 300, `${JSON.stringify(reply).length} bytes`);
    await c.close();
    // Over HTTP the body is refused before it is decoded, just as small.
    const res = await fetch(`${server.http}/v1/chat?user=keys`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ text: 'hi', ...keys }),
    });
    assert.equal(res.status, 400);
    const body = await res.text();
    assert.ok(body.length < 300, `${body.length} bytes`);
    assert.match(body, /body holds more values than any message \(at most 11\)/);
    const deep = await fetch(`${server.http}/v1/chat?user=keys`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: `{"text":"hi","params":${NESTED}}`,
    });
    assert.equal(deep.status, 400);
    assert.match(await deep.text(), /body nests deeper than any message \(at most 2 levels\)/);
  });
});
