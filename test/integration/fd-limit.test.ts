import assert from 'node:assert/strict';
import fs from 'node:fs';
import { test } from 'node:test';
import { refusedUpgrade, WsClient } from '../helpers/clients.js';
import { startProcess } from '../helpers/process.js';
import { tempDataDir } from '../helpers/server.js';

const LIMIT = 256;

test('near its open-file limit the server refuses new connections with 503, answers /healthz and serves the open ones', { timeout: 60_000 }, async () => {
  const dataDir = tempDataDir();
  const server = await startProcess({ CHATWIRE_DATA_DIR: dataDir, CHATWIRE_WORKER_THREADS: '1', CHATWIRE_DEV_TOKEN_DELAY_MS: '0' }, { maxOpenFiles: LIMIT });
  const open: WsClient[] = [];
  try {
    const existing = await WsClient.connect(server.ws, { user: 'existing' });
    open.push(existing);
    // A first chat: the model worker has loaded (a worker starting needs descriptors of its own for its modules).
    const first = await existing.request({ type: 'chat.send', text: 'hello' });
    assert.equal((await existing.collect(first.taskId as string)).end.type, 'chat.done');
    // One user per connection: the per-user cap is not what this is about.
    let refusal: { status: number; body: string } | undefined;
    for (let i = 0; i < LIMIT && refusal === undefined; i++) {
      try {
        open.push(await WsClient.connect(server.ws, { user: `u${i}` }));
      } catch (err) {
        const status = (err as { statusCode?: number }).statusCode;
        assert.ok(status !== undefined, `an upgrade failed without an HTTP answer: ${String(err)}`);
        refusal = await refusedUpgrade(`${server.ws}?user=late${i}`);
      }
    }
    assert.ok(refusal, `no refusal within ${LIMIT} connections`);
    assert.equal(refusal.status, 503);
    assert.equal((JSON.parse(refusal.body) as { error: { code: string } }).error.code, 'overloaded');
    assert.ok(open.length > LIMIT / 4, `refusals started only near the limit (${open.length} connections open)`);

    // Health checks are answered, and the connections the server has are served: a chat streams to its end.
    assert.equal((await fetch(`${server.http}/healthz`)).status, 200);
    assert.equal((await existing.request({ type: 'ping' })).type, 'pong');
    const ack = await existing.request({ type: 'chat.send', text: 'still here?' });
    assert.equal(ack.type, 'chat.ack');
    const end = await existing.collect(ack.taskId as string);
    assert.equal(end.end.type, 'chat.done', JSON.stringify(end.end) + server.output().slice(-3000));
    assert.equal((await refusedUpgrade(`${server.ws}?user=later`)).status, 503);
    assert.equal(server.output().split('near the open-file limit').length - 1, 1, 'logged once');

    // Once connections close, new ones are taken again.
    await Promise.all(open.splice(1).map((c) => c.close()));
    let back: WsClient | undefined;
    for (let i = 0; i < 100 && back === undefined; i++) {
      back = await WsClient.connect(server.ws, { user: 'back' }).catch(() => undefined);
      if (back === undefined) await new Promise((r) => setTimeout(r, 50));
    }
    assert.ok(back, 'connections are accepted again below the limit');
    open.push(back);
  } finally {
    await Promise.all(open.map((c) => c.close()));
    await server.stop();
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
});
