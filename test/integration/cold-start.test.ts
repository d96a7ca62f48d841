/**
 * A start warms every worker before /readyz says ready: each worker thread loads, creates its provider and runs its
 * check (for the openai provider: GET /models, which leaves a keep-alive connection open), so the first chat after a
 * start runs on a started worker and an open upstream connection, like the hundredth.
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { startServer } from '../helpers/server.js';

async function until(what: string, condition: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

test('/readyz is 503 until every worker has started and warmed its upstream connection; the first chat runs on one of those connections', async (t) => {
  let release: () => void = () => {};
  const released = new Promise<void>((resolve) => (release = resolve));
  const modelPorts = new Set<number>();
  const chatPorts: number[] = [];
  // An upstream that holds GET /models (the warm-up and the readiness check) until released.
  const upstream = http.createServer((req, res) => {
    const port = req.socket.remotePort as number;
    req.resume();
    if (req.method === 'GET' && req.url === '/v1/models') {
      modelPorts.add(port);
      void released.then(() => {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end('{"object":"list","data":[{"id":"fake-1","object":"model"}]}');
      });
      return;
    }
    chatPorts.push(port);
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      res.write('data: {"choices":[{"index":0,"delta":{"content":"Booked."},"finish_reason":"stop"}]}\n\n');
      res.end('data: [DONE]\n\n');
    });
  });
  await new Promise<void>((resolve) => upstream.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => upstream.close(() => resolve())));
  t.after(release);
  const baseUrl = `http://127.0.0.1:${(upstream.address() as AddressInfo).port}/v1`;

  const server = await startServer({ llm: 'openai', openaiBaseUrl: baseUrl, workerThreads: 2 });
  t.after(() => server.close());

  // Both workers start and warm on their own, before any chat or readiness probe reaches them.
  await until('a warm-up request from each of the 2 workers', () => modelPorts.size >= 2);
  const held = await fetch(`${server.http}/readyz`);
  assert.equal(held.status, 503);
  const body = (await held.json()) as { failures: Record<string, string> };
  // The warm-ups (or, once their check gives up, the readiness check's own GET /models) are held: not ready.
  assert.ok(body.failures.workers, 'the workers are what is not ready');

  release();
  await until('/readyz to say ready', async () => (await fetch(`${server.http}/readyz`)).status === 200);

  const client = await WsClient.connect(server.ws, { user: 'first-after-start' });
  t.after(() => client.close());
  const ack = await client.request({ type: 'chat.send', text: 'Book a plumber for Monday' });
  const reply = await client.collect(ack.taskId as string);
  assert.equal(reply.end.type, 'chat.done');
  assert.equal(chatPorts.length, 1);
  assert.ok(modelPorts.has(chatPorts[0] as number), 'the first chat went out on a connection the warm-up opened');
});
