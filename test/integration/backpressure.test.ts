import assert from 'node:assert/strict';
import type { Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { startServer } from '../helpers/server.js';

function tcp(client: WsClient): Socket {
  return (client.socket as unknown as { _socket: Socket })._socket;
}

test('a reader that stops reading is not buffered without bound: its deltas coalesce and arrive complete once it reads again', async (t) => {
  const taskCount = 24;
  const server = await startServer({
    devTokenDelayMs: 1,
    maxBackpressureBytes: 64 * 1024,
    workerThreads: 1,
    modelTokensPerMinute: 100_000_000,
    maxRunningPerUser: taskCount,
  });
  t.after(() => server.close());
  const slow = await WsClient.connect(server.ws, { user: 'slow' });
  await slow.nextOfType('hello');
  const acks = [];
  for (let i = 0; i < taskCount; i++) {
    const ack = await slow.request({ type: 'chat.send', text: `long reply ${i}`, params: { maxTokens: 4096 }, cache: 'bypass' });
    assert.equal(ack.type, 'chat.ack');
    acks.push(ack);
  }
  // Stop reading: the kernel buffers fill, then the server's, then the server holds deltas back in the task.
  tcp(slow).pause();
  const poll = await WsClient.connect(server.ws, { user: 'slow' });
  for (const ack of acks) {
    for (;;) {
      const info = await poll.request({ type: 'task.get', taskId: ack.taskId });
      if ((info.task as { status: string }).status === 'done') break;
      await sleep(50);
    }
  }
  tcp(slow).resume();
  let frames = 0;
  let tokens = 0;
  for (const ack of acks) {
    const { deltas, text, end } = await slow.collect(ack.taskId as string);
    assert.equal(end.type, 'chat.done');
    assert.deepEqual(
      deltas.map((d) => d.seq),
      deltas.map((_, k) => k),
    );
    const history = await poll.request({ type: 'conversation.history', conversationId: ack.conversationId });
    assert.equal((history.messages as { text: string }[])[1]?.text, text);
    frames += deltas.length;
    tokens += (end.usage as { completionTokens: number }).completionTokens;
  }
  // The model produced about one chunk per token; held back while the reader was stuck, they went out as far fewer frames.
  assert.ok(frames < tokens / 2, `coalesced: ${frames} delta frames for ${tokens} tokens`);
  assert.equal(slow.closeCode, null);
  await poll.close();
  await slow.close();
});

test('a socket that stays over maxBackpressure is closed, and other clients are unaffected', async (t) => {
  const server = await startServer({ maxBackpressureBytes: 256 * 1024, messagesPerSecond: 1_000_000, modelTokensPerMinute: 10_000_000 });
  t.after(() => server.close());
  const stuck = await WsClient.connect(server.ws, { user: 'stuck' });
  const ack = await stuck.request({ type: 'chat.send', text: 'a big reply', params: { maxTokens: 4096 } });
  await stuck.collect(ack.taskId as string);
  tcp(stuck).pause();
  // Each task.get answers with the whole ~25 KB reply: far more than the kernel and the server may buffer for a reader that reads nothing.
  const request = JSON.stringify({ type: 'task.get', taskId: ack.taskId });
  for (let i = 0; i < 2000 && stuck.closeCode === null; i++) {
    stuck.socket.send(request);
    if (i % 50 === 49) await sleep(5);
  }
  tcp(stuck).resume();
  assert.equal(await stuck.closed, 1013);
  assert.match(stuck.closeReason, /slow reader/);
  const metrics = await (await fetch(`${server.http}/metrics`)).text();
  assert.match(metrics, /^chatwire_slow_clients_closed_total [1-9]/m);
  const ok = await WsClient.connect(server.ws, { user: 'fine' });
  const next = await ok.request({ type: 'chat.send', text: 'unaffected' });
  assert.equal((await ok.collect(next.taskId as string)).end.type, 'chat.done');
  await ok.close();
});
