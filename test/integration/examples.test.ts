/** The examples in examples/, run as a user runs them (node dist/examples/...), and driven with real clients. */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, test } from 'node:test';
import { io as ioClient } from 'socket.io-client';
import { refusedUpgrade, WsClient } from '../helpers/clients.js';
import { tempDataDir } from '../helpers/server.js';

const EXAMPLES = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'examples');
const dirs: string[] = [];
after(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

/** Runs an example on a free port with a temp data dir; resolves once it prints its port. */
function run(name: string): Promise<{ child: ChildProcess; port: number; stop(): Promise<number | null> }> {
  const dataDir = tempDataDir();
  dirs.push(dataDir);
  const child = spawn(process.execPath, [path.join(EXAMPLES, name)], {
    env: { ...process.env, PORT: '0', CHATWIRE_DATA_DIR: dataDir },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  return new Promise((resolve, reject) => {
    const onData = (c: Buffer) => {
      out += c.toString();
      const m = /port=(\d+)/.exec(out);
      if (!m) return;
      child.stdout?.off('data', onData);
      resolve({
        child,
        port: Number(m[1]),
        stop: () => {
          child.kill('SIGTERM');
          return new Promise((done) => (child.exitCode !== null ? done(child.exitCode) : child.once('exit', (code) => done(code))));
        },
      });
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', (c: Buffer) => (out += c.toString()));
    child.once('exit', (code) => reject(new Error(`${name} exited with ${code}: ${out}`)));
  });
}

test('examples/custom-provider: createChatwire({ provider }).listen() answers with the echo provider', async () => {
  const example = await run('custom-provider.js');
  try {
    const ws = await WsClient.connect(`ws://127.0.0.1:${example.port}/ws`, { user: 'sam' });
    assert.equal((await ws.nextOfType('hello')).provider, 'echo');
    const ack = await ws.request({ type: 'chat.send', text: 'say this back' });
    const { text, end } = await ws.collect(ack.taskId as string);
    assert.equal(text, 'say this back ');
    assert.equal(end.type, 'chat.done');
    await ws.close();
  } finally {
    assert.equal(await example.stop(), 0);
  }
});

test('examples/express-chat: the app login, then chatwire at /chat knows the user by the session cookie', async () => {
  const example = await run('express-chat.js');
  const base = `http://127.0.0.1:${example.port}`;
  try {
    assert.equal(await (await fetch(`${base}/`)).text(), 'POST /login {"name": "..."} first');
    assert.equal((await refusedUpgrade(`ws://127.0.0.1:${example.port}/chat/ws`)).status, 401);
    const login = await fetch(`${base}/login`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'ann' }) });
    assert.equal(login.status, 200);
    const cookie = (login.headers.get('set-cookie') ?? '').split(';')[0] as string;
    assert.match(cookie, /^sid=/);
    assert.equal(await (await fetch(`${base}/`, { headers: { cookie } })).text(), 'Hello ann: chat at /chat/ws');

    const ws = await WsClient.connect(`ws://127.0.0.1:${example.port}/chat/ws`, { headers: { cookie } });
    assert.equal((await ws.nextOfType('hello')).userId, 'ann');
    const ack = await ws.request({ type: 'chat.send', text: 'hello from express' });
    assert.equal((await ws.collect(ack.taskId as string)).end.type, 'chat.done');
    await ws.close();

    const socket = ioClient(base, { path: '/chat/socket.io', transports: ['websocket'], extraHeaders: { cookie }, reconnection: false, forceNew: true });
    const hello = await new Promise<{ userId: string }>((resolve, reject) => {
      socket.once('hello', resolve);
      socket.once('connect_error', reject);
    });
    assert.equal(hello.userId, 'ann');
    socket.close();

    const history = await fetch(`${base}/chat/v1/tasks/${ack.taskId as string}`, { headers: { cookie } });
    assert.equal(history.status, 200);
    assert.equal(((await history.json()) as { status: string }).status, 'done');
  } finally {
    assert.equal(await example.stop(), 0);
  }
});
