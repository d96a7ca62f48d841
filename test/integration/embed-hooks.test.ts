/**
 * The hooks a host plugs into createChatwire: authenticate, a custom provider (object and module), a logger, and
 * the chat handle for server-side code.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { spawn } from 'node:child_process';
import { after, test } from 'node:test';
import { AppError, createChatwire, jwtAuthenticate, type AuthenticateInput, type Chatwire, type ChatwireOptions, type TaskMessage } from '../../src/index.js';
import { connectSocketIO, emitWithAck, refusedSocketIO, refusedUpgrade, WsClient } from '../helpers/clients.js';
import { tempDataDir } from '../helpers/server.js';
import { signToken } from '../../src/auth/sign.js';

const dirs: string[] = [];
after(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

async function serve(options: ChatwireOptions): Promise<{ chatwire: Chatwire; base: string; close(): Promise<void> }> {
  const dataDir = tempDataDir();
  dirs.push(dataDir);
  const chatwire = createChatwire({ dataDir, devTokenDelayMs: 0, workerThreads: 1, ...options });
  const server = http.createServer((_req, res) => res.end('host'));
  await chatwire.attach(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    chatwire,
    base,
    async close() {
      await chatwire.close();
      await new Promise((r) => server.close(r));
    },
  };
}

test('authenticate: the host login decides who calls, over /ws, socket.io and HTTP; null is a 401', async () => {
  const seen: AuthenticateInput[] = [];
  const sessions = new Map([
    ['s1', { userId: 'ann', role: 'staff' as const }],
    ['s2', { userId: 'bo', role: 'consumer' as const }],
  ]);
  const { base, close } = await serve({
    authenticate: ({ headers, query, transport, address }) => {
      seen.push({ headers, query, transport, address });
      const sid = /(?:^|;\s*)sid=([^;]+)/.exec(headers.cookie ?? '')?.[1] ?? query.get('sid') ?? '';
      return sessions.get(sid) ?? null;
    },
  });
  try {
    const ws = await WsClient.connect(`${base.replace('http', 'ws')}/ws`, { headers: { Cookie: 'theme=dark; sid=s1', 'X-Custom': 'A' } });
    const hello = await ws.nextOfType('hello');
    assert.equal(hello.userId, 'ann');
    await ws.close();
    const wsInput = seen.find((s) => s.transport === 'ws');
    assert.equal(wsInput?.headers['x-custom'], 'A');
    assert.equal(wsInput?.headers.cookie, 'theme=dark; sid=s1');
    assert.ok(wsInput?.query instanceof URLSearchParams);

    // socket.io: the handshake's auth fields arrive as query parameters.
    const sio = await connectSocketIO(base, { sid: 's1' });
    const sioHello = sio.received.find((m) => m.type === 'hello') ?? (await new Promise((r) => sio.once('hello', r)));
    assert.equal((sioHello as { userId: string }).userId, 'ann');
    sio.close();
    assert.equal(seen.find((s) => s.transport === 'socket.io')?.query.get('sid'), 's1');

    // HTTP: the query too (a route that reads no query of its own: identified, then the task is not found).
    assert.equal((await fetch(`${base}/v1/tasks/task_none?sid=s1`)).status, 404);
    assert.equal(seen.find((s) => s.transport === 'http')?.query.get('sid'), 's1');
    assert.equal((await fetch(`${base}/v1/requests`, { headers: { cookie: 'sid=s1' } })).status, 200);

    // The role is the host's answer: staff may look up any consumer (no such one here: 404), a consumer only itself (403).
    assert.equal((await fetch(`${base}/v1/consumers/someone-else/requests`, { headers: { cookie: 'sid=s1' } })).status, 404);
    assert.equal((await fetch(`${base}/v1/consumers/someone-else/requests`, { headers: { cookie: 'sid=s2' } })).status, 403);

    assert.equal((await refusedUpgrade(`${base.replace('http', 'ws')}/ws?user=mallory`)).status, 401);
    const refused = await refusedSocketIO(base, { user: 'mallory' });
    assert.equal((refused.error.data as { code: string }).code, 'unauthorized');
    const http401 = await fetch(`${base}/v1/requests`, { headers: { authorization: 'Bearer whatever' } });
    assert.equal(http401.status, 401);
  } finally {
    await close();
  }
});

test('authenticate: a throw or an answer of the wrong shape is a 500 and is logged, an AppError keeps its code', async () => {
  const errors: unknown[] = [];
  const logger = { info() {}, warn() {}, error: (obj: unknown) => void errors.push(obj) };
  const { base, close } = await serve({
    logger,
    authenticate: ({ query }) => {
      if (query.get('case') === 'throw') throw new Error('session store down');
      if (query.get('case') === 'shape') return { user: 'x' } as never;
      throw new AppError('forbidden', 'banned');
    },
  });
  try {
    assert.equal((await fetch(`${base}/v1/requests?case=throw`)).status, 500);
    assert.equal((await fetch(`${base}/v1/requests?case=shape`)).status, 500);
    assert.equal((await refusedUpgrade(`${base.replace('http', 'ws')}/ws?case=throw`)).status, 500);
    assert.equal((await fetch(`${base}/v1/requests?case=banned`)).status, 403);
    assert.ok(errors.length >= 3, `logged ${errors.length}`);
  } finally {
    await close();
  }
});

test('jwtAuthenticate: the JWT verifier as a hook, taking tokens where each transport carries them, composable with a host login', async () => {
  const jwtSecret = 'a-secret-of-at-least-thirty-two-bytes!!';
  const jwt = jwtAuthenticate({ jwtSecret });
  const { base, close } = await serve({
    authenticate: async (request) => (request.headers.cookie === 'sid=ok' ? { userId: 'cookie-user' } : jwt(request)),
  });
  const wsBase = base.replace('http', 'ws');
  try {
    const token = await signToken({ secret: jwtSecret, sub: 'tok-user', role: 'staff' });
    const byQuery = await WsClient.connect(`${wsBase}/ws`, { token });
    assert.equal((await byQuery.nextOfType('hello')).userId, 'tok-user');
    await byQuery.close();
    const bySubprotocol = await WsClient.connect(`${wsBase}/ws`, { protocols: ['chatwire.v1', `bearer.${token}`] });
    assert.equal((await bySubprotocol.nextOfType('hello')).userId, 'tok-user');
    assert.equal(bySubprotocol.socket.protocol, 'chatwire.v1');
    await bySubprotocol.close();
    const sio = await connectSocketIO(base, { token });
    assert.equal((sio.received.find((m) => m.type === 'hello') ?? ((await new Promise((r) => sio.once('hello', r))) as { userId: string })).userId, 'tok-user');
    sio.close();
    assert.equal((await fetch(`${base}/v1/requests`, { headers: { authorization: `Bearer ${token}` } })).status, 200);
    const cookie = await WsClient.connect(`${wsBase}/ws`, { headers: { cookie: 'sid=ok' } });
    assert.equal((await cookie.nextOfType('hello')).userId, 'cookie-user');
    await cookie.close();

    const forged = await signToken({ secret: 'another-secret-of-thirty-two-bytes!!!', sub: 'tok-user' });
    const refused = await fetch(`${base}/v1/requests`, { headers: { authorization: `Bearer ${forged}` } });
    assert.equal(refused.status, 401);
    assert.equal(((await refused.json()) as { error: { message: string } }).error.message, 'token signature is invalid');
    assert.equal((await refusedUpgrade(`${wsBase}/ws`)).status, 401);
  } finally {
    await close();
  }
  assert.throws(() => jwtAuthenticate({ jwtSecret: ' ' }), RangeError);
});

test('provider object: runs on the main thread with the host state it closes over; hello names it; cancel reaches it', async () => {
  let aborted = 0;
  const { chatwire, base, close } = await serve({
    provider: {
      name: 'shout',
      async *stream(request, signal) {
        const text = request.messages.at(-1)?.content ?? '';
        if (text === 'wait') {
          yield 'waiting';
          await new Promise<void>((resolve) => signal.addEventListener('abort', () => resolve(), { once: true }));
          aborted++;
          return;
        }
        for (const word of text.toUpperCase().split(' ')) yield `${word} `;
      },
    },
  });
  try {
    const ws = await WsClient.connect(`${base.replace('http', 'ws')}/ws`, { user: 'u1' });
    assert.equal((await ws.nextOfType('hello')).provider, 'shout');
    const ack = await ws.request({ type: 'chat.send', text: 'make it loud' });
    const { text, end } = await ws.collect(ack.taskId as string);
    assert.equal(text, 'MAKE IT LOUD ');
    assert.equal(end.finishReason, 'stop');
    assert.equal((end.usage as { completionTokens: number }).completionTokens, 3);

    const waiting = await ws.request({ type: 'chat.send', text: 'wait' });
    await ws.nextOfType('chat.delta', (m) => m.taskId === waiting.taskId);
    assert.equal((await ws.request({ type: 'chat.cancel', taskId: waiting.taskId })).type, 'ok');
    const cancelled = await ws.nextOfType('chat.done', (m) => m.taskId === waiting.taskId);
    assert.equal(cancelled.finishReason, 'cancelled');
    assert.equal(aborted, 1);
    await ws.close();
    assert.equal(chatwire.config.llm, 'dev');
  } finally {
    await close();
  }
});

test('provider module: the worker threads load it, with the plain-data options given', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-provider-'));
  dirs.push(dir);
  const file = path.join(dir, 'reverse.mjs');
  fs.writeFileSync(
    file,
    `import { threadId, isMainThread } from 'node:worker_threads';
export default function create(options) {
  return {
    async streamTo(request, signal, onChunk) {
      const text = request.messages.at(-1).content.split('').reverse().join('');
      onChunk(options.prefix + text);
      onChunk(isMainThread ? ' main' : ' worker');
    },
  };
}
`,
  );
  const { base, close } = await serve({ provider: { name: 'reverse', module: pathToFileURL(file), options: { prefix: '> ' } } });
  try {
    const sio = await connectSocketIO(base, { user: 'u2' });
    const ack = await emitWithAck(sio, 'chat.send', { text: 'abc' });
    const done = await new Promise<Record<string, unknown>>((resolve) =>
      sio.on('chat.done', (m: Record<string, unknown>) => m.taskId === ack.taskId && resolve(m)),
    );
    const deltas = sio.received.filter((m) => m.type === 'chat.delta' && m.taskId === ack.taskId).map((m) => m.text as string);
    assert.equal(deltas.join(''), '> cba worker');
    assert.equal(done.finishReason, 'stop');
    assert.equal((sio.received.find((m) => m.type === 'hello') as { provider?: string }).provider, 'reverse');
    sio.close();
  } finally {
    await close();
  }
  assert.throws(
    () => createChatwire({ provider: { name: 'x', module: path.join(dir, 'missing.mjs') } }),
    /invalid option provider: module .*missing\.mjs does not exist/,
  );
  assert.throws(
    () => createChatwire({ provider: { name: 'x', module: file, options: { f: () => 1 } } }),
    /invalid option provider: options must be plain data/,
  );
  assert.throws(() => createChatwire({ provider: { name: 'dev', module: file } }), /invalid option provider: name dev is a built-in/);
  assert.throws(() => createChatwire({ provider: { name: 'y' } as never }), /invalid option provider: expected/);
});

test('logger: chatwire logs to the host logger; with none and no logLevel it writes nothing', async () => {
  const records: { level: string; msg: unknown }[] = [];
  const at = (level: string) => (obj: unknown, msg?: string) => void records.push({ level, msg: msg ?? obj });
  const logged = await serve({ logger: { info: at('info'), warn: at('warn'), error: at('error'), debug: at('debug') } });
  await logged.close();
  // Open mode (no secret, no hook) warns at start.
  assert.ok(
    records.some((r) => r.level === 'warn' && String(r.msg).includes('open mode')),
    JSON.stringify(records),
  );

  // pino writes to the file descriptor, not through process.stdout: look at a child's output.
  const silent = await startAndStop({});
  assert.equal(silent.stdout, '');
  assert.equal(silent.code, 0);
  const loud = await startAndStop({ logLevel: 'warn' });
  assert.match(loud.stdout, /open mode/);
});

/** Starts chatwire in a child process with `options` (and a temp data dir), closes it, and returns what it printed. */
function startAndStop(options: Record<string, unknown>): Promise<{ stdout: string; code: number | null }> {
  const dataDir = tempDataDir();
  dirs.push(dataDir);
  const entry = pathToFileURL(path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'src', 'index.js')).href;
  const script = `import { createChatwire } from ${JSON.stringify(entry)};
const chatwire = createChatwire({ dataDir: ${JSON.stringify(dataDir)}, workerThreads: 1, ...${JSON.stringify(options)} });
await chatwire.start();
await chatwire.close();`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let stdout = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  return new Promise((resolve) => child.on('close', (code) => resolve({ stdout, code })));
}

test('chat handle: send on a user behalf, subscribe to its deltas, cancel; the user sees the same task', async () => {
  const { chatwire, base, close } = await serve({ devTokenDelayMs: 20 });
  try {
    assert.throws(() => createChatwire({ dataDir: tempDataDir() }).chat, /not started/);
    const ack = await chatwire.chat.send({ userId: 'dora' }, { text: 'from the server' });
    assert.match(ack.taskId, /^task_/);
    const messages: TaskMessage[] = [];
    let done = () => {};
    const finished = new Promise<void>((resolve) => (done = resolve));
    await chatwire.chat.subscribe({ userId: 'dora' }, ack.taskId, (m) => {
      messages.push(m);
      if (m.type !== 'chat.delta') done();
    });
    // The user's own connection can follow the same task.
    const ws = await WsClient.connect(`${base.replace('http', 'ws')}/ws`, { user: 'dora' });
    await ws.request({ type: 'chat.resume', taskId: ack.taskId, fromSeq: 0 });
    const seen = await ws.collect(ack.taskId);
    await finished;
    assert.equal(messages.at(-1)?.type, 'chat.done');
    const text = messages.flatMap((m) => (m.type === 'chat.delta' ? [m.text] : [])).join('');
    assert.equal(text, seen.text);
    assert.equal((await chatwire.chat.task({ userId: 'dora' }, ack.taskId)).status, 'done');
    // Another user may not see it.
    await assert.rejects(chatwire.chat.task({ userId: 'eve' }, ack.taskId), /belongs to another user/);

    const long = await chatwire.chat.send({ userId: 'dora' }, { text: 'a long one', params: { maxTokens: 500 } });
    let ending: (m: TaskMessage) => void = () => {};
    const ended = new Promise<TaskMessage>((resolve) => (ending = resolve));
    await chatwire.chat.subscribe({ userId: 'dora' }, long.taskId, (m) => m.type !== 'chat.delta' && ending(m));
    await chatwire.chat.cancel({ userId: 'dora' }, long.taskId);
    const end = await ended;
    assert.equal(end.type, 'chat.done');
    assert.equal((end as { finishReason: string }).finishReason, 'cancelled');

    await assert.rejects(chatwire.chat.send({ userId: 'dora' }, { text: '' }), (err: unknown) => err instanceof AppError && err.code === 'bad_request');
    await assert.rejects(chatwire.chat.send({ userId: '' }, { text: 'x' }), (err: unknown) => err instanceof AppError && err.code === 'bad_request');
    await ws.close();
  } finally {
    await close();
  }
});

test('authenticate: a socket.io session is authenticated once however many CONNECT packets it sends', async () => {
  let calls = 0;
  const { base, close } = await serve({
    authenticate: () => {
      calls += 1;
      return null;
    },
  });
  try {
    const handshake = await fetch(`${base}/socket.io/?EIO=4&transport=polling`);
    const sid = (JSON.parse((await handshake.text()).slice(1)) as { sid: string }).sid;
    const body = Array.from({ length: 5000 }, (_, i) => `40{"token":"t${i}"}`).join('\x1e');
    const posted = await fetch(`${base}/socket.io/?EIO=4&transport=polling&sid=${sid}`, { method: 'POST', body, headers: { 'content-type': 'text/plain' } });
    await posted.arrayBuffer();
    // Whatever authentication the POST started has had time to run.
    await new Promise((r) => setTimeout(r, 200));
    assert.ok(calls <= 1, `authenticate ran ${calls} times`);
  } finally {
    await close();
  }
});
