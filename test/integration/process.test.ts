import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { test } from 'node:test';
import { WsClient } from '../helpers/clients.js';
import { MAIN, startProcess } from '../helpers/process.js';
import { tempDataDir } from '../helpers/server.js';
import { SQLITE_FILE } from '../../src/app.js';
import { Database } from '../../src/db/database.js';

test('a bad setting stops the start with a message naming the variable', async () => {
  const child = spawn(process.execPath, [MAIN], { env: { ...process.env, PORT: 'eighty' }, stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr.on('data', (c: Buffer) => (err += c.toString()));
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
  assert.equal(code, 2);
  assert.match(err, /PORT="eighty"/);
});

/** A port free right now (the OS picks it; it is released before the caller binds it). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as net.AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

test('a second server on a port already taken stops at start instead of sharing it', async () => {
  const dirs = [tempDataDir(), tempDataDir()];
  // A fixed port: the kernel would not let a second socket share one that was picked with port 0 anyway.
  const port = await freePort();
  const first = await startProcess({ CHATWIRE_DATA_DIR: dirs[0]!, PORT: String(port) });
  try {
    const second = startProcess({ CHATWIRE_DATA_DIR: dirs[1]!, PORT: String(first.port) });
    await assert.rejects(second, (err: Error) => {
      assert.match(err.message, /^chatwire exited \(1\) before listening/);
      assert.match(err.message, new RegExp(`could not listen on 127\\.0\\.0\\.1:${first.port} \\(in use or not permitted\\)`));
      return true;
    });
    // The first one still answers every request on its port.
    for (let i = 0; i < 5; i++) assert.equal((await fetch(`${first.http}/healthz`)).status, 200);
  } finally {
    await first.stop();
    for (const dir of dirs) fs.rmSync(dir, { recursive: true, force: true });
  }
});

/** Runs main.js with `env` added and resolves with its exit code and stderr; a process still running after 15 s (it started) is killed and reported as such. */
async function startFailure(env: Record<string, string>): Promise<{ code: number | null; stderr: string }> {
  const dataDir = tempDataDir();
  const child = spawn(process.execPath, [MAIN], {
    env: { ...process.env, HOST: '127.0.0.1', PORT: '0', CHATWIRE_DATA_DIR: dataDir, CHATWIRE_WORKER_THREADS: '1', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const started = setTimeout(() => child.kill('SIGKILL'), 15_000);
  try {
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    return { code, stderr };
  } finally {
    clearTimeout(started);
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
}

test('CHATWIRE_JWT_SECRET set but empty stops the start (exit 2) instead of running without authentication', async () => {
  for (const secret of ['', '   ']) {
    const { code, stderr } = await startFailure({ CHATWIRE_JWT_SECRET: secret });
    assert.equal(code, 2, `CHATWIRE_JWT_SECRET=${JSON.stringify(secret)} should stop the start; stderr: ${stderr}`);
    assert.match(stderr, new RegExp(`CHATWIRE_JWT_SECRET=${JSON.stringify(secret)}: set but .*unset CHATWIRE_JWT_SECRET for open mode`));
  }
});

test('an empty number, data dir or origin list stops the start (exit 2) instead of meaning 0 or nothing', async () => {
  for (const [name, value] of [
    ['PORT', ''],
    ['CHATWIRE_MAX_QUEUE', ' '],
    ['CHATWIRE_DATA_DIR', ' '],
    ['CHATWIRE_ALLOWED_ORIGINS', ''],
  ] as const) {
    const { code, stderr } = await startFailure({ [name]: value });
    assert.equal(code, 2, `${name}=${JSON.stringify(value)} should stop the start; stderr: ${stderr}`);
    assert.match(stderr, new RegExp(`^chatwire: invalid configuration: ${name}=${JSON.stringify(value)}: `));
  }
});

test('a second server on a data dir in use stops before touching it; a server killed with SIGKILL leaves the dir free', async () => {
  const dataDir = tempDataDir();
  const storedStatus = (taskId: string) => {
    const db = new Database(path.join(dataDir, SQLITE_FILE), { readonly: true });
    try {
      return (db.raw.prepare('SELECT status FROM tasks WHERE task_id = ?').pluck().get(taskId) as string | undefined) ?? 'none';
    } finally {
      db.close();
    }
  };
  try {
    const first = await startProcess({ CHATWIRE_DATA_DIR: dataDir, CHATWIRE_DEV_TOKEN_DELAY_MS: '200' });
    try {
      const c = await WsClient.connect(first.ws, { user: 'owner' });
      await c.nextOfType('hello');
      const ack = await c.request({ type: 'chat.send', text: 'keep running', params: { maxTokens: 20 } });
      await c.nextOfType('chat.delta');
      const second = startProcess({ CHATWIRE_DATA_DIR: dataDir });
      await assert.rejects(second, (err: Error) => {
        assert.match(err.message, /^chatwire exited \(1\) before listening/);
        assert.match(err.message, /the data dir .* is in use by another chatwire process \(it holds the lock on .*chatwire\.lock\)/);
        return true;
      });
      // The second one's start did not mark the first one's running task failed ("left unfinished").
      assert.ok(['queued', 'running'].includes(storedStatus(ack.taskId as string)), storedStatus(ack.taskId as string));
      const { end } = await c.collect(ack.taskId as string);
      assert.equal(end.finishReason, 'length');
      await c.close();
    } finally {
      await first.stop();
    }

    // SIGKILL leaves nothing to clean up: the kernel drops the lock with the process.
    const killed = await startProcess({ CHATWIRE_DATA_DIR: dataDir });
    await killed.kill();
    const next = await startProcess({ CHATWIRE_DATA_DIR: dataDir });
    assert.equal((await next.stop()).code, 0);
  } finally {
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
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
    const seen = c.received
      .filter((m) => m.type === 'chat.delta' && m.taskId === ack.taskId)
      .map((m) => m.text as string)
      .join('');
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
