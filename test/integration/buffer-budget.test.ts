/**
 * What the server holds for readers that stop reading: each socket at most its budget (maxBackpressureBytes) on
 * every transport, socket.io's long-polling (engine.io's writeBuffer) and websocket (uWS) included, and all of
 * them together at most maxBufferedBytes, past which the most backed-up are closed first. A client that reads
 * is served meanwhile. The RSS that 200 stalled readers cost is measured by `npm run bench:stalled-readers`.
 */
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import WebSocket from 'ws';
import { WsClient } from '../helpers/clients.js';
import { metric, startServer, type TestServer } from '../helpers/server.js';

const LIMITS = { messagesPerSecond: 1_000_000, chatsPerMinute: 1_000_000, modelTokensPerMinute: 1_000_000_000, maxConnectionsPerUser: 10_000 };

/** A finished 4,096-token reply of `user`: every task.get of it answers about 25 KB. */
async function bigTask(server: TestServer, user: string): Promise<string> {
  const owner = await WsClient.connect(server.ws, { user });
  const ack = await owner.request({ type: 'chat.send', text: 'a big reply', params: { maxTokens: 4096 } });
  await owner.collect(ack.taskId as string);
  await owner.close();
  return ack.taskId as string;
}

/** socket.io over long-polling, spoken by hand: connected, then it posts events and never polls again. */
async function stalledPoller(server: TestServer, user: string): Promise<{ post(packets: string[]): Promise<number>; poll(): Promise<number> }> {
  const url = `${server.http}/socket.io/?EIO=4&transport=polling`;
  const sid = (JSON.parse((await (await fetch(url)).text()).slice(1)) as { sid: string }).sid;
  const at = `${url}&sid=${sid}`;
  const post = async (packets: string[]) => (await fetch(at, { method: 'POST', body: packets.join('\x1e'), headers: { 'content-type': 'text/plain' } })).status;
  assert.equal(await post([`40${JSON.stringify({ user })}`]), 200);
  let seen = '';
  while (!seen.includes('"hello"')) seen += await (await fetch(at)).text();
  return { post, poll: async () => (await fetch(at)).status };
}

/** Waits until `check` holds; fails the test after 15 s instead of hanging it. */
async function until(what: string, check: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`not within 15 s: ${what}`);
    await sleep(20);
  }
}

async function chatServed(server: TestServer): Promise<void> {
  const reader = await WsClient.connect(server.ws, { user: 'reader' });
  const ack = await reader.request({ type: 'chat.send', text: 'served meanwhile?', cache: 'bypass' });
  assert.equal((await reader.collect(ack.taskId as string)).end.type, 'chat.done');
  await reader.close();
}

test('a socket.io poller that stops polling is closed once the replies it holds pass its budget, counted in bytes', async (t) => {
  const server = await startServer({ ...LIMITS, maxBackpressureBytes: 256 * 1024 });
  t.after(() => server.close());
  const taskId = await bigTask(server, 'poller');
  const poller = await stalledPoller(server, 'poller');
  // 40 replies of ~25 KB: a megabyte for a client that never fetches it.
  const get = `42${JSON.stringify(['task.get', { taskId }])}`;
  assert.equal(await poller.post(Array.from({ length: 40 }, () => get)), 200);
  await until('the poller closed', async () => (await metric(server, 'chatwire_slow_clients_closed_total')) >= 1);
  // Its session is gone, and with it what it held.
  assert.equal(await poller.poll(), 400);
  assert.ok((await metric(server, 'chatwire_buffered_bytes')) <= 256 * 1024);
  await chatServed(server);
});

test('stalled pollers each under their budget but over the server-wide bound: the most backed-up are closed until the sum is under it', async (t) => {
  const server = await startServer({ ...LIMITS, maxBackpressureBytes: 1024 * 1024, maxBufferedBytes: 1024 * 1024 });
  t.after(() => server.close());
  const taskId = await bigTask(server, 'pollers');
  const pollers = await Promise.all(Array.from({ length: 8 }, () => stalledPoller(server, 'pollers')));
  const get = `42${JSON.stringify(['task.get', { taskId }])}`;
  // Each holds ~300 KB (12 replies) and then 25 KB more per round: under its own budget, 2.4 MB in all.
  for (const [i, p] of pollers.entries()) assert.equal(await p.post(Array.from({ length: 12 + i }, () => get)), 200);
  await sleep(100);
  const closed = (await Promise.all(pollers.map((p) => p.poll()))).filter((status) => status === 400).length;
  // About 300 KB each: three or four fit in 1 MiB; the others, the fullest first, were closed.
  assert.ok(closed >= 4 && closed <= 6, `${closed} of 8 closed`);
  assert.equal(await metric(server, 'chatwire_slow_clients_closed_total'), closed);
  assert.ok((await metric(server, 'chatwire_buffered_bytes')) <= 1024 * 1024);
  await chatServed(server);
});

test('a stalled socket.io websocket reader, compression asked for or not, is closed past its budget instead of having frames dropped', async (t) => {
  const server = await startServer({ ...LIMITS, maxBackpressureBytes: 256 * 1024 });
  t.after(() => server.close());
  const taskId = await bigTask(server, 'sio-stalled');
  for (const perMessageDeflate of [false, true]) {
    const socket = new WebSocket(`${server.http.replace(/^http/, 'ws')}/socket.io/?EIO=4&transport=websocket`, { perMessageDeflate });
    const packets: string[] = [];
    socket.on('message', (data) => {
      const packet = data.toString();
      if (packet === '2') socket.send('3');
      packets.push(packet);
    });
    const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
    await new Promise((resolve) => socket.once('open', resolve));
    // No permessage-deflate: a compressor per socket would cost more than a stalled reader's budget (docs/backpressure.md).
    assert.equal(socket.extensions, '');
    socket.send(`40${JSON.stringify({ user: 'sio-stalled' })}`);
    while (!packets.some((p) => p.includes('"hello"'))) await sleep(10);
    (socket as unknown as { _socket: Socket })._socket.pause();
    const before = await metric(server, 'chatwire_slow_clients_closed_total');
    const get = `42${JSON.stringify(['task.get', { taskId }])}`;
    // Replies of ~25 KB until the server closes it: the kernel's buffers fill first, then the 256 KiB budget.
    let sent = 0;
    const isClosed = async () => (await metric(server, 'chatwire_slow_clients_closed_total')) > before;
    while (sent < 2000 && !(await isClosed())) {
      for (let i = 0; i < 50; i++) socket.send(get);
      sent += 50;
      await sleep(5);
    }
    await until('the stalled reader closed', isClosed);
    (socket as unknown as { _socket: Socket })._socket.resume();
    await closed;
    // Whatever it was sent before the close came whole and in order: nothing dropped silently in between.
    const replies = packets.filter((p) => p.startsWith('42["task"'));
    for (const r of replies) assert.equal((JSON.parse(r.slice(2)) as [string, { task: { taskId: string } }])[1].task.taskId, taskId);
    assert.ok(replies.length < sent, `${replies.length} of ${sent} replies before the close`);
  }
  await chatServed(server);
});
