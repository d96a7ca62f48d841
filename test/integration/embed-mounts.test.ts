/**
 * The three ways to serve chatwire (listen, attach on a node:http server, attach on a host's uWS app), each driven
 * with real clients over /ws, socket.io and HTTP/SSE, and each leaving the host's own routes and server alone.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, test } from 'node:test';
import uWS from 'uWebSockets.js';
import WebSocket, { WebSocketServer } from 'ws';
import { createChatwire, type Chatwire } from '../../src/index.js';
import { emitWithAck, RawSocketIO, readSse, WsClient } from '../helpers/clients.js';
import { tempDataDir } from '../helpers/server.js';

const dirs: string[] = [];
after(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

function newChatwire(): Chatwire {
  const dataDir = tempDataDir();
  dirs.push(dataDir);
  return createChatwire({ dataDir, devTokenDelayMs: 0, workerThreads: 1 });
}

/** A host: its own pages, and its own WebSocket at /host-ws. */
function hostServer(): { server: http.Server; wss: WebSocketServer } {
  const server = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end(`host ${req.method} ${req.url}`);
  });
  const wss = new WebSocketServer({ noServer: true });
  server.on('upgrade', (req, socket, head) => {
    if (req.url === '/host-ws') wss.handleUpgrade(req, socket, head, (ws) => ws.send('host hello'));
  });
  return { server, wss };
}

function listenOn(server: http.Server): Promise<number> {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port)));
}

/** One chat over each transport against `base` (an http:// URL ending in the mount's prefix). */
async function chatEverywhere(base: string): Promise<void> {
  const ws = await WsClient.connect(`${base.replace('http', 'ws')}/ws`, { user: 'alice' });
  const hello = await ws.nextOfType('hello');
  assert.equal(hello.userId, 'alice');
  const ack = await ws.request({ type: 'chat.send', text: 'hello over ws' });
  assert.equal(ack.type, 'chat.ack');
  const { end, deltas } = await ws.collect(ack.taskId as string);
  assert.equal(end.type, 'chat.done');
  assert.ok(deltas.length > 0);
  await ws.close();

  const u = new URL(base);
  const sio = await connectSocketIOAt(`${u.origin}`, `${u.pathname.replace(/\/$/, '')}/socket.io`, { user: 'bob' });
  const sack = await emitWithAck(sio, 'chat.send', { text: 'hello over socket.io' });
  assert.equal(sack.type, 'chat.ack');
  await waitFor(() => sio.received.some((m) => m.type === 'chat.done' && m.taskId === sack.taskId));
  sio.close();

  const posted = await fetch(`${base}/v1/chat?user=carol`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ text: 'hello over http' }),
  });
  assert.equal(posted.status, 202);
  const { taskId } = (await posted.json()) as { taskId: string };
  const events = await readSse(await fetch(`${base}/v1/tasks/${taskId}/stream?user=carol`));
  assert.equal(events.at(-1)?.event, 'done');
  assert.ok(events.some((e) => e.event === 'delta'));
}

async function connectSocketIOAt(origin: string, path: string, auth: Record<string, unknown>) {
  const { io } = await import('socket.io-client');
  const socket = io(origin, { path, transports: ['websocket'], auth, reconnection: false, forceNew: true }) as ReturnType<typeof io> & {
    received: Record<string, unknown>[];
  };
  socket.received = [];
  socket.onAny((event: string, payload: Record<string, unknown>) => socket.received.push({ ...payload, type: event }));
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', () => resolve());
    socket.once('connect_error', reject);
  });
  return socket;
}

async function waitFor(check: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 20));
  }
}

function hostWsHello(port: number): Promise<string> {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/host-ws`);
    ws.once('message', (data) => {
      resolve(data.toString());
      ws.close();
    });
    ws.once('error', reject);
  });
}

test('attach(httpServer, { prefix }): chatwire under /chat, every other request and upgrade left to the host', async () => {
  const { server, wss } = hostServer();
  const hostRequestListeners = server.listeners('request');
  const chatwire = newChatwire();
  await chatwire.attach(server, { prefix: '/chat' });
  const port = await listenOn(server);
  const base = `http://127.0.0.1:${port}/chat`;
  try {
    assert.equal(await (await fetch(`${base}/healthz`)).text(), '{"status":"ok"}');
    assert.equal((await fetch(`${base}/readyz`)).status, 200);
    assert.match(await (await fetch(`${base}/metrics`)).text(), /chatwire_/);
    assert.equal(await (await fetch(`http://127.0.0.1:${port}/healthz`)).text(), 'host GET /healthz');
    assert.equal(await (await fetch(`http://127.0.0.1:${port}/`)).text(), 'host GET /');
    assert.equal(await (await fetch(`http://127.0.0.1:${port}/chatroom`)).text(), 'host GET /chatroom');
    const miss = await fetch(`${base}/nothing-here`);
    assert.equal(miss.status, 404);
    assert.equal(((await miss.json()) as { error: { code: string } }).error.code, 'not_found');
    assert.equal(await hostWsHello(port), 'host hello');
    await chatEverywhere(base);
  } finally {
    await chatwire.close();
  }
  // The host's server is still up and its own again, with its own listeners.
  assert.ok(server.listening);
  assert.deepEqual(server.listeners('request'), hostRequestListeners);
  assert.equal(await (await fetch(`${base}/healthz`)).text(), 'host GET /chat/healthz');
  assert.equal(await hostWsHello(port), 'host hello');
  wss.close();
  await new Promise((r) => server.close(r));
});

test('attach(httpServer) without a prefix takes only its own paths', async () => {
  const { server, wss } = hostServer();
  const chatwire = newChatwire();
  await chatwire.attach(server);
  const port = await listenOn(server);
  try {
    assert.equal(await (await fetch(`http://127.0.0.1:${port}/healthz`)).text(), '{"status":"ok"}');
    assert.equal(await (await fetch(`http://127.0.0.1:${port}/`)).text(), 'host GET /');
    assert.equal(await (await fetch(`http://127.0.0.1:${port}/about?x=1`)).text(), 'host GET /about?x=1');
    assert.equal(await hostWsHello(port), 'host hello');
    await chatEverywhere(`http://127.0.0.1:${port}`);
  } finally {
    await chatwire.close();
    wss.close();
    await new Promise((r) => server.close(r));
  }
});

test('attach(uwsApp, { prefix }): chatwire on the host uWS app, next to its own routes', async () => {
  const app = uWS.App();
  app.get('/hello', (res) => {
    res.end('host hello');
  });
  const chatwire = newChatwire();
  await chatwire.attach(app, { prefix: '/chat' });
  const listenSocket = await new Promise<uWS.us_listen_socket>((resolve, reject) =>
    app.listen('127.0.0.1', 0, (s) => (s ? resolve(s) : reject(new Error('no listen')))),
  );
  const port = uWS.us_socket_local_port(listenSocket as unknown as uWS.us_socket);
  const base = `http://127.0.0.1:${port}/chat`;
  try {
    assert.equal(await (await fetch(`http://127.0.0.1:${port}/hello`)).text(), 'host hello');
    assert.equal(await (await fetch(`${base}/healthz`)).text(), '{"status":"ok"}');
    await chatEverywhere(base);
  } finally {
    await chatwire.close();
  }
  // uWS cannot drop a route: chatwire's answer 404 once it is closed, socket.io's too; the host's are untouched.
  assert.equal((await fetch(`${base}/healthz`)).status, 404);
  assert.equal((await fetch(`${base}/socket.io/?EIO=4&transport=polling`)).status, 404);
  assert.equal(await (await fetch(`http://127.0.0.1:${port}/hello`)).text(), 'host hello');
  uWS.us_listen_socket_close(listenSocket);
});

test('listen(): its own uWS app, resolving to the bound port', async () => {
  const chatwire = newChatwire();
  const port = await chatwire.listen({ port: 0, host: '127.0.0.1' });
  try {
    assert.ok(port > 0);
    assert.equal((await fetch(`http://127.0.0.1:${port}/`)).status, 200);
    await chatEverywhere(`http://127.0.0.1:${port}`);
  } finally {
    await chatwire.close();
  }
  await assert.rejects(fetch(`http://127.0.0.1:${port}/healthz`));
});

test('attach(httpServer): a frame over the limit is refused as on uWS, payload_too_large then close 1009, on /ws and socket.io', async () => {
  const { server, wss } = hostServer();
  const dataDir = tempDataDir();
  dirs.push(dataDir);
  const chatwire = createChatwire({ dataDir, devTokenDelayMs: 0, workerThreads: 1, maxFrameBytes: 4096 });
  await chatwire.attach(server);
  const port = await listenOn(server);
  try {
    const ws = await WsClient.connect(`ws://127.0.0.1:${port}/ws`, { user: 'big' });
    await ws.nextOfType('hello');
    ws.send({ type: 'chat.send', text: 'x'.repeat(5000) });
    assert.equal((await ws.nextOfType('error')).code, 'payload_too_large');
    assert.equal(await ws.closed, 1009);
    const raw = await RawSocketIO.connect(`http://127.0.0.1:${port}`, { user: 'big' });
    await raw.next((p) => p.startsWith('42["hello"'));
    raw.emit('chat.send', { text: 'x'.repeat(5000) });
    assert.equal(await raw.closed, 1009);
    assert.deepEqual(
      raw.events('error').map((e) => e.code),
      ['payload_too_large'],
    );
  } finally {
    await chatwire.close();
    wss.close();
    await new Promise((r) => server.close(r));
  }
});

test('close() of a chatwire never started, and attach() to something else, are handled', async () => {
  const chatwire = newChatwire();
  await chatwire.close();
  await assert.rejects(chatwire.listen({ port: 0 }), /closed/);
  const other = newChatwire();
  await assert.rejects(other.attach({} as http.Server), TypeError);
  await assert.rejects(other.attach(http.createServer(), { prefix: 'chat' }), /invalid option prefix/);
  await other.close();
});
