/**
 * Many clients that stop reading, next to clients that read. A stopped reader's
 * deltas wait in its task (which keeps them anyway, for resume) once its socket
 * holds the soft limit, so it costs the server a bounded buffer however long
 * the replies; a stopped reader that keeps asking for replies that cannot wait
 * is closed by the backpressure limit (1013). Nobody else notices. The server
 * memory this costs at 1,000 such clients is measured by
 * `npm run load -- --dead-readers 1000` (a figure, not a test assertion).
 */
import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { startServer } from '../helpers/server.js';

// Every per-user limit out of the way, egress too: one user's hundred readers replay about 75 MB here.
const LIMITS = {
  messagesPerSecond: 1_000_000,
  chatsPerMinute: 1_000_000,
  modelTokensPerMinute: 1_000_000_000,
  maxConnectionsPerUser: 10_000,
  egressBytesPerMinute: 1024 * 1024 * 1024,
  maxRunningPerUser: 10_000,
};

/**
 * GET /metrics, sent again once if the request failed on the network: after seconds of reading a hundred streams, the
 * pooled keep-alive connection it is sent on may be the one the server is closing as idle at that moment (an HTTP
 * race any client of an idempotent GET retries), which is not what these tests are about.
 */
async function metricsText(base: string): Promise<string> {
  try {
    return await (await fetch(`${base}/metrics`)).text();
  } catch (err) {
    if (!(err instanceof TypeError)) throw err;
    return await (await fetch(`${base}/metrics`)).text();
  }
}

async function metric(base: string, name: string): Promise<number> {
  const text = await metricsText(base);
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line === undefined ? 0 : Number(line.slice(name.length + 1));
}

function tcp(client: WsClient): Socket {
  return (client.socket as unknown as { _socket: Socket })._socket;
}

async function connectMany(url: string, user: string, n: number): Promise<WsClient[]> {
  const out: WsClient[] = [];
  for (let i = 0; i < n; i += 50) out.push(...(await Promise.all(Array.from({ length: Math.min(50, n - i) }, () => WsClient.connect(url, { user })))));
  return out;
}

/** Chats of `rounds` turns each on every active client: every stream gapless, every reply the stored one. */
async function activeClientsChat(active: WsClient[], rounds: number): Promise<number> {
  let chats = 0;
  await Promise.all(
    active.map(async (c, i) => {
      let conversationId: string | undefined;
      for (let r = 0; r < rounds; r++) {
        const ack = await c.request({ type: 'chat.send', text: `active ${i} turn ${r}`, cache: 'bypass', ...(conversationId ? { conversationId } : {}) });
        assert.equal(ack.type, 'chat.ack');
        conversationId = ack.conversationId as string;
        const { deltas, text, end } = await c.collect(ack.taskId as string);
        assert.equal(end.type, 'chat.done');
        assert.deepEqual(
          deltas.map((d) => d.seq),
          deltas.map((_, k) => k),
        );
        const history = await c.request({ type: 'conversation.history', conversationId });
        assert.equal((history.messages as { text: string }[]).at(-1)?.text, text);
        chats++;
      }
    }),
  );
  return chats;
}

test('a hundred readers stopped mid-stream are not dropped, get every token in order once they read again, and the clients that read stream untouched', async (t) => {
  const server = await startServer({ ...LIMITS, devTokenDelayMs: 1, maxBackpressureBytes: 64 * 1024, tasksPerWorker: 256 });
  t.after(() => server.close());
  const DEAD = 100;
  const FINISHED = 30;
  // Finished replies to replay: asked over HTTP with nobody subscribed, so each is a few 4 KB deltas (~25 KB in all).
  const finished = await Promise.all(
    Array.from({ length: FINISHED }, async (_, i) => {
      const res = await fetch(`${server.http}/v1/chat?user=dead`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ text: `finished story ${i}`, params: { maxTokens: 4096 }, cache: 'bypass' }),
      });
      assert.equal(res.status, 202);
      return ((await res.json()) as { taskId: string }).taskId;
    }),
  );
  const texts = new Map<string, string>();
  for (const taskId of finished) {
    for (;;) {
      const task = (await (await fetch(`${server.http}/v1/tasks/${taskId}?user=dead`)).json()) as { status: string; text: string };
      if (task.status === 'done') {
        texts.set(taskId, task.text);
        break;
      }
      await sleep(100);
    }
  }

  // Each stopped reader asks for a replay of every finished reply (~750 KB, more than the kernel buffers for a
  // reader that reads nothing) and a live chat (they all share one model call), and stops reading mid-stream.
  const dead = await connectMany(server.ws, 'dead', DEAD);
  const LIVE = 'a live story for the stopped readers';
  await Promise.all(
    dead.map(async (c) => {
      for (const taskId of finished) c.send({ type: 'chat.resume', taskId, fromSeq: 0 });
      c.send({ type: 'chat.send', id: 'live', text: LIVE, params: { maxTokens: 4096 } });
      await c.nextOfType('chat.delta');
      tcp(c).pause();
    }),
  );
  const active = await Promise.all(Array.from({ length: 10 }, (_, i) => WsClient.connect(server.ws, { user: `active-${i}` })));
  assert.equal(await activeClientsChat(active, 3), 30);
  // A reader asking the same question joins the same model call (or, once it ended, is served its cached reply).
  const reference = await WsClient.connect(server.ws, { user: 'reference' });
  const refAck = await reference.request({ type: 'chat.send', text: LIVE, params: { maxTokens: 4096 } });
  const liveText = (await reference.collect(refAck.taskId as string)).text;
  // Every task has ended on the server (finished, active, and the stopped readers' live ones): nothing more is coming.
  while ((await metric(server.http, 'chatwire_tasks_total{outcome="done"}')) < FINISHED + 30 + DEAD) await sleep(100);

  // Slow is not over the limit: no stopped reader was closed.
  for (const c of dead) assert.equal(c.closeCode, null);
  for (const c of dead) tcp(c).resume();
  let liveFrames = 0;
  for (const c of dead) {
    const ack = await c.next((m) => m.id === 'live');
    assert.equal(ack.type, 'chat.ack');
    texts.set(ack.taskId as string, liveText);
    for (const taskId of [...finished, ack.taskId as string]) {
      const { end } = await c.collect(taskId);
      assert.equal(end.type, 'chat.done');
      const deltas = c.received.filter((m) => m.type === 'chat.delta' && m.taskId === taskId);
      assert.deepEqual(
        deltas.map((d) => d.seq),
        deltas.map((_, k) => k),
      );
      assert.equal(deltas.map((d) => d.text).join(''), texts.get(taskId));
      if (taskId === ack.taskId) liveFrames += deltas.length;
    }
  }
  const metrics = await metricsText(server.http);
  assert.match(metrics, /^chatwire_slow_clients_closed_total 0$/m);
  // How many of the live tokens were held back and coalesced depends on how much the kernel buffered first
  // (megabytes per loopback socket): reported, not asserted. backpressure.test.ts checks the coalescing itself.
  t.diagnostic(`${DEAD} stopped readers: ${liveFrames} live delta frames for ${DEAD * 4096} tokens`);
  await Promise.all([...dead, ...active, reference].map((c) => c.close()));
});

test('stopped readers that keep asking are closed by the backpressure limit (1013), each one, and the clients that read are unaffected', async (t) => {
  const server = await startServer({ ...LIMITS, devTokenDelayMs: 0, maxBackpressureBytes: 64 * 1024 });
  t.after(() => server.close());
  // A finished task with a big text: every task.get of it answers ~25 KB, a reply that cannot be held back.
  const owner = await WsClient.connect(server.ws, { user: 'dead' });
  const big = await owner.request({ type: 'chat.send', text: 'a big reply', params: { maxTokens: 4096 } });
  await owner.collect(big.taskId as string);
  await owner.close();

  const dead = await connectMany(server.ws, 'dead', 100);
  for (const c of dead) tcp(c).pause();
  const request = JSON.stringify({ type: 'task.get', taskId: big.taskId });
  const active = await Promise.all(Array.from({ length: 10 }, (_, i) => WsClient.connect(server.ws, { user: `active-${i}` })));
  const chatting = activeClientsChat(active, 3);
  // 200 replies of ~25 KB each per reader: far more than the kernel and the 64 KiB limit hold for a reader that reads nothing.
  for (let round = 0; round < 200; round++) {
    for (const c of dead) if (c.socket.readyState === c.socket.OPEN) c.socket.send(request);
    await sleep(5);
  }
  // The close frames wait behind what the kernel holds: read again to see them.
  for (const c of dead) tcp(c).resume();
  const codes = await Promise.all(dead.map((c) => c.closed));
  assert.deepEqual(
    codes,
    dead.map(() => 1013),
  );
  for (const c of dead) assert.match(c.closeReason, /slow reader/);
  assert.equal(await chatting, 30);
  const metrics = await metricsText(server.http);
  assert.match(metrics, /^chatwire_slow_clients_closed_total 100$/m);
  assert.match(metrics, /^chatwire_connections\{transport="ws"\} 10$/m);
  await Promise.all(active.map((c) => c.close()));
});

test('a reader that stops reading altogether is closed by the idle timeout, since it answers no ping; the server forgets it', async (t) => {
  const server = await startServer({ ...LIMITS, devTokenDelayMs: 20, idleTimeoutSec: 8 });
  t.after(() => server.close());
  const stopped = await WsClient.connect(server.ws, { user: 'stopped' });
  const ack = await stopped.request({ type: 'chat.send', text: 'a reply nobody reads', params: { maxTokens: 1000 }, cache: 'bypass' });
  await stopped.nextOfType('chat.delta', (m) => m.taskId === ack.taskId);
  tcp(stopped).pause();
  // A client that reads and chats now and then stays: answering pings is what counts, not sending.
  const reader = await WsClient.connect(server.ws, { user: 'reader' });
  while ((await metric(server.http, 'chatwire_connections{transport="ws"}')) > 1) {
    const next = await reader.request({ type: 'chat.send', text: `still here ${Date.now()}`, cache: 'bypass' });
    assert.equal((await reader.collect(next.taskId as string)).end.type, 'chat.done');
    await sleep(500);
  }
  tcp(stopped).resume();
  await stopped.closed;
  assert.equal(reader.closeCode, null);
  // The task it left goes on and stays resumable from a new connection.
  const back = await WsClient.connect(server.ws, { user: 'stopped' });
  assert.equal((await back.request({ type: 'chat.resume', taskId: ack.taskId, fromSeq: 0 })).type, 'ok');
  const { deltas, end } = await back.collect(ack.taskId as string);
  assert.equal(end.type, 'chat.done');
  assert.equal(deltas[0]?.seq, 0);
  t.diagnostic(`the stopped reader saw close code ${stopped.closeCode}`);
  await Promise.all([reader.close(), back.close()]);
});
