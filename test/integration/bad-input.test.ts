import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { connectSocketIO, emitWithAck, RawSocketIO, WsClient } from '../helpers/clients.js';
import { startServer, type TestServer } from '../helpers/server.js';

const BAD_FRAMES: { name: string; frame: string; code: string; path?: string }[] = [
  { name: 'not JSON', frame: '{"type": "ping"', code: 'bad_request' },
  { name: 'a JSON array', frame: '[1,2,3]', code: 'bad_request' },
  { name: 'a JSON number', frame: '42', code: 'bad_request' },
  { name: 'JSON null', frame: 'null', code: 'bad_request' },
  { name: 'a JSON string', frame: '"chat.send"', code: 'bad_request' },
  { name: 'no type', frame: '{"text":"hi"}', code: 'bad_request', path: 'type' },
  { name: 'an unknown type', frame: '{"type":"chat.explode"}', code: 'bad_request', path: 'type' },
  { name: 'a missing field', frame: '{"type":"chat.send"}', code: 'bad_request', path: 'text' },
  { name: 'an empty text', frame: '{"type":"chat.send","text":""}', code: 'bad_request', path: 'text' },
  { name: 'a wrong field type', frame: '{"type":"chat.send","text":42}', code: 'bad_request', path: 'text' },
  { name: 'an unknown field', frame: '{"type":"ping","extra":true}', code: 'bad_request' },
  { name: 'a huge number', frame: '{"type":"chat.resume","taskId":"t","fromSeq":1e400}', code: 'bad_request', path: 'fromSeq' },
  { name: 'a negative seq', frame: '{"type":"chat.resume","taskId":"t","fromSeq":-1}', code: 'bad_request', path: 'fromSeq' },
  { name: 'a fractional seq', frame: '{"type":"chat.resume","taskId":"t","fromSeq":1.5}', code: 'bad_request', path: 'fromSeq' },
  { name: 'a temperature out of range', frame: '{"type":"chat.send","text":"x","params":{"temperature":9}}', code: 'bad_request', path: 'params.temperature' },
  { name: 'maxTokens out of range', frame: '{"type":"chat.send","text":"x","params":{"maxTokens":100000}}', code: 'bad_request', path: 'params.maxTokens' },
  { name: 'a bad cache mode', frame: '{"type":"chat.send","text":"x","cache":"always"}', code: 'bad_request', path: 'cache' },
  { name: 'an id too long', frame: JSON.stringify({ type: 'ping', id: 'x'.repeat(65) }), code: 'bad_request', path: 'id' },
  { name: 'deep nesting', frame: `{"type":"ping","a":${'['.repeat(1500)}${']'.repeat(1500)}}`, code: 'bad_request' },
  { name: 'an unknown task id', frame: '{"type":"task.get","taskId":"task_nope"}', code: 'not_found' },
  { name: 'cancelling an unknown task', frame: '{"type":"chat.cancel","taskId":"task_nope"}', code: 'not_found' },
  { name: 'resuming an unknown task', frame: '{"type":"chat.resume","taskId":"task_nope","fromSeq":0}', code: 'not_found' },
  { name: 'an unknown conversation', frame: '{"type":"conversation.history","conversationId":"conv_nope"}', code: 'not_found' },
];

describe('bad input', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ maxFrameBytes: 4096, messagesPerSecond: 10_000 });
  });
  after(() => server.close());

  test('over /ws every bad frame gets the documented error and the connection stays usable', async () => {
    const c = await WsClient.connect(server.ws, { user: 'fuzzy' });
    await c.nextOfType('hello');
    for (const bad of BAD_FRAMES) {
      c.send(bad.frame);
      const reply = await c.nextOfType('error');
      assert.equal(reply.code, bad.code, bad.name);
      assert.equal(typeof reply.message, 'string', bad.name);
      assert.doesNotMatch(reply.message as string, /\n\s+at /, `${bad.name}: no stack trace`);
      if (bad.path)
        assert.ok(
          (reply.details as { path: string }[]).some((d) => d.path === bad.path),
          `${bad.name}: details name ${bad.path}`,
        );
      const pong = await c.request({ type: 'ping' });
      assert.equal(pong.type, 'pong', `${bad.name}: still usable`);
    }
    await c.close();
  });

  test('the id of a failed message is echoed in its error', async () => {
    const c = await WsClient.connect(server.ws, { user: 'fuzzy' });
    c.send({ type: 'chat.send', id: 'abc', text: 7 });
    const reply = await c.nextOfType('error');
    assert.equal(reply.id, 'abc');
    await c.close();
  });

  test('a limit that is not a JSON integer 1..100 is refused on /ws and socket.io, never coerced', async () => {
    const c = await WsClient.connect(server.ws, { user: 'fuzzy' });
    const s = await connectSocketIO(server.http, { user: 'fuzzy' });
    try {
      const messages: Record<string, unknown>[] = [];
      for (const limit of [true, false, '3', '', null, [3], 1.5, 0, 101]) {
        messages.push({ type: 'requests.list', limit });
        messages.push({ type: 'conversation.history', conversationId: 'conv_x', limit });
        messages.push({ type: 'consumer.requests', consumerId: 'fuzzy', limit });
        messages.push({ type: 'consumer.bookings', consumerId: 'fuzzy', limit });
      }
      for (const m of messages) {
        const name = JSON.stringify(m);
        const overWs = await c.request(m);
        assert.deepEqual([overWs.type, overWs.code], ['error', 'bad_request'], `/ws ${name}`);
        assert.deepEqual(
          (overWs.details as { path: string }[]).map((d) => d.path),
          ['limit'],
          `/ws ${name}`,
        );
        const { type, ...payload } = m;
        const overSio = await emitWithAck(s, type as string, payload);
        assert.deepEqual([overSio.type, overSio.code], ['error', 'bad_request'], `socket.io ${name}`);
      }
      // A JSON integer in range still works.
      assert.equal((await c.request({ type: 'requests.list', limit: 3 })).type, 'requests.list');
      assert.equal((await emitWithAck(s, 'requests.list', { limit: 100 })).type, 'requests.list');
    } finally {
      await c.close();
      s.close();
    }
  });

  test('a binary frame is refused as bad_request', async () => {
    const c = await WsClient.connect(server.ws, { user: 'fuzzy' });
    await c.nextOfType('hello');
    c.socket.send(Buffer.from([1, 2, 3]));
    const reply = await c.nextOfType('error');
    assert.equal(reply.code, 'bad_request');
    assert.equal((await c.request({ type: 'ping' })).type, 'pong');
    await c.close();
  });

  test('a frame over the limit gets payload_too_large and the socket closes with 1009', async () => {
    // Up to four times the limit (4096 here) a frame is read whole and refused; past that uWS drops it (1006).
    const far = await WsClient.connect(server.ws, { user: 'big' });
    await far.nextOfType('hello');
    far.send({ type: 'chat.send', text: 'x'.repeat(17_000) });
    assert.equal(await far.closed, 1006, 'past four times the limit the frame is not read: nothing is held for it');
    assert.deepEqual(
      far.received.filter((m) => m.type !== 'hello'),
      [],
    );
    for (const size of [5000, 16_000]) {
      const c = await WsClient.connect(server.ws, { user: 'big' });
      await c.nextOfType('hello');
      c.send({ type: 'chat.send', text: 'x'.repeat(size) });
      const reply = await c.nextOfType('error');
      assert.equal(reply.code, 'payload_too_large');
      assert.equal(await c.closed, 1009);
    }
    const other = await WsClient.connect(server.ws, { user: 'big' });
    assert.equal((await other.request({ type: 'ping' })).type, 'pong');
    await other.close();
  });

  test('over socket.io a message over the limit gets payload_too_large and the websocket closes with 1009, as on /ws', async () => {
    // Past four times the limit engine.io's socket does not read it either (the connection is dropped, 1006).
    const far = await RawSocketIO.connect(server.http, { user: 'sio-big' });
    await far.next((p) => p.startsWith('42["hello"'));
    far.emit('chat.send', { text: 'x'.repeat(17_000) });
    assert.equal(await far.closed, 1006);
    for (const size of [5000, 16_000]) {
      const raw = await RawSocketIO.connect(server.http, { user: 'sio-big' });
      await raw.next((p) => p.startsWith('42["hello"'));
      raw.emit('chat.send', { id: 'big', text: 'x'.repeat(size) });
      assert.equal(await raw.closed, 1009, String(size));
      const errors = raw.events('error');
      assert.deepEqual(
        errors.map((e) => [e.type, e.code]),
        [['error', 'payload_too_large']],
        String(size),
      );
      assert.match(String(errors[0]!.message), /^frame of \d+ bytes is over the 4096-byte limit$/);
      // Refused before socket.io decoded it: no ack, no chat.
      assert.equal(raw.packets.filter((p) => p.startsWith('43') || p.includes('chat.ack')).length, 0, String(size));
    }
    // socket.io-client sees the error event, then the disconnect; a new connection of the same user works.
    const s = await connectSocketIO(server.http, { user: 'sio-big' });
    const disconnected = new Promise<string>((resolve) => s.once('disconnect', resolve));
    s.emit('chat.send', { text: 'y'.repeat(5000) });
    assert.equal(await disconnected, 'transport close');
    assert.deepEqual(
      s.received.filter((m) => m.type === 'error').map((m) => m.code),
      ['payload_too_large'],
    );
    s.close();
    const again = await connectSocketIO(server.http, { user: 'sio-big' });
    try {
      assert.equal((await emitWithAck(again, 'ping', {})).type, 'pong');
    } finally {
      again.close();
    }
  });

  test('over socket.io bad payloads get the documented error through the ack', async () => {
    const s = await connectSocketIO(server.http, { user: 'sio-fuzzy' });
    try {
      const cases: [string, unknown, string][] = [
        ['chat.explode', {}, 'bad_request'],
        ['chat.send', {}, 'bad_request'],
        ['chat.send', { text: 5 }, 'bad_request'],
        ['chat.send', 'not an object', 'bad_request'],
        ['chat.send', [1, 2], 'bad_request'],
        ['task.get', { taskId: 'task_nope' }, 'not_found'],
      ];
      for (const [event, payload, code] of cases) {
        const reply = (await s.timeout(5000).emitWithAck(event, payload)) as { type: string; code: string };
        assert.equal(reply.type, 'error', event);
        assert.equal(reply.code, code, `${event} ${JSON.stringify(payload)}`);
      }
      // Two payloads: refused, with the first one's id echoed.
      const two = (await s.timeout(5000).emitWithAck('ping', { id: 'two' }, 2)) as { type: string; code: string; id?: string };
      assert.deepEqual([two.type, two.code, two.id], ['error', 'bad_request', 'two']);
      const pong = await emitWithAck(s, 'ping', {});
      assert.equal(pong.type, 'pong');
    } finally {
      s.close();
    }
  });

  test('over HTTP bad bodies get 400 with an error body, and huge ones 413', async () => {
    const post = (body: string, type = 'application/json') =>
      fetch(`${server.http}/v1/chat?user=http-fuzzy`, { method: 'POST', headers: { 'content-type': type }, body });
    for (const body of ['{', '[]', '{"text":""}', '{"text":1}', '{"text":"x","type":"chat.send"}', '']) {
      const res = await post(body);
      assert.equal(res.status, 400, body);
      const json = (await res.json()) as { error: { code: string; message: string } };
      assert.equal(json.error.code, 'bad_request', body);
    }
    const big = await post(JSON.stringify({ text: 'x'.repeat(5000) }));
    assert.equal(big.status, 413);
    assert.equal(((await big.json()) as { error: { code: string } }).error.code, 'payload_too_large');
    const notFound = await fetch(`${server.http}/v1/tasks/task_nope?user=http-fuzzy`);
    assert.equal(notFound.status, 404);
    assert.equal(((await notFound.json()) as { error: { code: string } }).error.code, 'not_found');
    const badQuery = await fetch(`${server.http}/v1/conversations/conv_x/messages?user=http-fuzzy&limit=1000`);
    assert.equal(badQuery.status, 400);
    const noRoute = await fetch(`${server.http}/v2/nothing`);
    assert.equal(noRoute.status, 404);
  });

  test('over HTTP a limit in the query must be decimal digits for an integer 1..100', async () => {
    const routes = ['/v1/requests', '/v1/conversations/conv_x/messages', '/v1/consumers/http-fuzzy/requests', '/v1/consumers/http-fuzzy/bookings'];
    for (const route of routes) {
      for (const limit of ['', 'abc', '1e2', '0x10', '3.0', ' 3', '+3', '-1', '0', '101', 'true', 'Infinity', '9'.repeat(400)]) {
        const res = await fetch(`${server.http}${route}?user=http-fuzzy&limit=${encodeURIComponent(limit)}`);
        assert.equal(res.status, 400, `${route} limit=${JSON.stringify(limit)}`);
        const error = ((await res.json()) as { error: { code: string; details: { path: string }[] } }).error;
        assert.equal(error.code, 'bad_request');
        assert.deepEqual(
          error.details.map((d) => d.path),
          ['limit'],
        );
      }
    }
    for (const limit of ['1', '100', '007']) {
      const res = await fetch(`${server.http}/v1/requests?user=http-fuzzy&limit=${limit}`);
      assert.equal(res.status, 200, `limit=${limit}`);
      await res.arrayBuffer();
    }
  });
});
