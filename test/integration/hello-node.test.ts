import assert from 'node:assert/strict';
import { test } from 'node:test';
import { connectSocketIO, WsClient } from '../helpers/clients.js';
import { startServer, type TestServer } from '../helpers/server.js';

async function wsHello(server: TestServer): Promise<Record<string, unknown>> {
  const ws = await WsClient.connect(server.ws, { user: 'alice' });
  const hello = await ws.nextOfType('hello');
  await ws.close();
  return hello;
}

async function socketIoHello(server: TestServer): Promise<Record<string, unknown>> {
  const sio = await connectSocketIO(server.http, { user: 'bob' });
  const hello = sio.received.find((m) => m.type === 'hello') ?? (await new Promise<Record<string, unknown>>((r) => sio.once('hello', r)));
  sio.close();
  return hello;
}

test('hello names the serving process: one nodeId per server on /ws and socket.io alike, another for another server', async () => {
  const [a, b] = await Promise.all([startServer(), startServer()]);
  try {
    const [aWs, aIo, bWs] = [await wsHello(a), await socketIoHello(a), await wsHello(b)];
    assert.equal(typeof aWs.nodeId, 'string');
    assert.match(aWs.nodeId as string, /^[A-Za-z0-9_-]{12}$/);
    assert.equal(aIo.nodeId, aWs.nodeId);
    assert.equal(typeof bWs.nodeId, 'string');
    assert.notEqual(bWs.nodeId, aWs.nodeId);
  } finally {
    await Promise.all([a.close(), b.close()]);
  }
});
