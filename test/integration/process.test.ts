import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { MAIN, startProcess } from '../helpers/process.js';
import { tempDataDir } from '../helpers/server.js';

test('a bad setting stops the start with a message naming the variable', async () => {
  const child = spawn(process.execPath, [MAIN], { env: { ...process.env, PORT: 'eighty' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr.on('data', (c: Buffer) => (err += c.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  assert.equal(code, 2);
  assert.match(err, /PORT="eighty"/);
});

test('SIGTERM mid-stream cancels the running task, stores its partial text, and exits 0', async () => {
  const dataDir = tempDataDir();
  try {
    const first = await startProcess({ CHATWIRE_WORKER_THREADS: '1', CHATWIRE_DATA_DIR: dataDir, CHATWIRE_DEV_TOKEN_DELAY_MS: '20' });
    assert.match(first.output(), /open mode/);
    const c = await WsClient.connect(`ws://127.0.0.1:${first.port}/ws`, { user: 'ops' });
    const ack = await c.request({ type: 'chat.send', text: 'a long job', params: { maxTokens: 1000 } });
    for (let i = 0; i < 3; i++) await c.nextOfType('chat.delta');
    first.child.kill('SIGTERM');
    const { end } = await c.collect(ack.taskId as string);
    assert.equal(end.type, 'chat.done');
    assert.equal(end.finishReason, 'cancelled');
    const seen = c.received.filter((m) => m.type === 'chat.delta' && m.taskId === ack.taskId).map((m) => m.text as string).join('');
    assert.equal(await c.closed, 1001);
    const exit = await first.exited;
    assert.deepEqual(exit, { code: 0, signal: null });
    assert.match(first.output(), /"msg":"stopped"/);

    const second = await startProcess({ CHATWIRE_WORKER_THREADS: '1', CHATWIRE_DATA_DIR: dataDir });
    const d = await WsClient.connect(`ws://127.0.0.1:${second.port}/ws`, { user: 'ops' });
    const history = await d.request({ type: 'conversation.history', conversationId: ack.conversationId });
    assert.deepEqual(
      (history.messages as { role: string; text: string }[]).map((m) => [m.role, m.text]),
      [
        ['user', 'a long job'],
        ['assistant', seen],
      ],
    );
    const task = await d.request({ type: 'task.get', taskId: ack.taskId });
    assert.equal((task.task as { status: string }).status, 'cancelled');
    await d.close();
    second.child.kill('SIGINT');
    assert.deepEqual(await second.exited, { code: 0, signal: null });
  } finally {
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
});
