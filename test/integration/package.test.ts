/**
 * The published package: `npm pack`, installed into an empty directory (the tarball extracted as
 * node_modules/chatwire, its dependencies linked from this checkout's node_modules: offline and the same in CI),
 * then used from there as a host would: createChatwire mounted on a plain http.createServer(), chats over /ws and
 * socket.io with real clients, and the type declarations resolved through the package's exports.
 */
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, test } from 'node:test';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-pack-'));
const installed = path.join(tmp, 'node_modules', 'chatwire');

after(() => fs.rmSync(tmp, { recursive: true, force: true }));

before(() => {
  // dist is fresh (npm test builds first): pack what is there, without prepack's second build.
  const out = execFileSync('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', tmp], { cwd: ROOT, encoding: 'utf8' });
  const [{ filename }] = JSON.parse(out) as [{ filename: string }];
  fs.mkdirSync(installed, { recursive: true });
  execFileSync('tar', ['-xzf', path.join(tmp, filename), '-C', installed, '--strip-components=1']);
  for (const entry of fs.readdirSync(path.join(ROOT, 'node_modules'))) {
    if (entry.startsWith('.') || entry === 'chatwire') continue;
    fs.symlinkSync(path.join(ROOT, 'node_modules', entry), path.join(tmp, 'node_modules', entry));
  }
  fs.writeFileSync(path.join(tmp, 'package.json'), JSON.stringify({ name: 'host-app', private: true, type: 'module' }));
});

test('the tarball holds what runs, and nothing of the tests, scripts or sources', () => {
  for (const file of [
    'dist/src/index.js',
    'dist/src/index.d.ts',
    'dist/src/client/client.js',
    'dist/src/client/client.d.ts',
    'dist/workers/llm-entry.cjs',
    'dist/workers/llm.worker.js',
    'src/client/public/index.html',
    'docs/openapi.json',
  ]) {
    assert.ok(fs.existsSync(path.join(installed, file)), file);
  }
  assert.ok(fs.readdirSync(path.join(installed, 'db', 'migrations')).length > 0);
  for (const absent of ['dist/test', 'dist/scripts', 'src/app.ts', 'test', 'scripts', 'tsconfig.json']) {
    assert.ok(!fs.existsSync(path.join(installed, absent)), absent);
  }
  const pkg = JSON.parse(fs.readFileSync(path.join(installed, 'package.json'), 'utf8')) as { private?: boolean };
  assert.equal(pkg.private, undefined);
});

const HOST = `
import http from 'node:http';
import { createRequire } from 'node:module';
import WebSocket from 'ws';
import { io } from 'socket.io-client';
import { createChatwire } from 'chatwire';
import { connect } from 'chatwire/client';

const server = http.createServer((req, res) => res.end('host page'));
const chatwire = createChatwire({ dataDir: process.argv[2], workerThreads: 1, devTokenDelayMs: 0 });
await chatwire.attach(server);
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const port = server.address().port;

function wsChat() {
  const ws = new WebSocket('ws://127.0.0.1:' + port + '/ws?user=pat');
  let text = '';
  return new Promise((resolve, reject) => {
    ws.on('message', (raw) => {
      const m = JSON.parse(raw.toString());
      if (m.type === 'hello') ws.send(JSON.stringify({ type: 'chat.send', text: 'hi over ws' }));
      if (m.type === 'chat.delta') text += m.text;
      if (m.type === 'chat.done') { ws.close(); resolve(text); }
      if (m.type === 'error' || m.type === 'chat.error') reject(new Error(JSON.stringify(m)));
    });
    ws.on('error', reject);
  });
}

function socketIoChat() {
  const socket = io('http://127.0.0.1:' + port, { transports: ['websocket'], auth: { user: 'pat' }, forceNew: true, reconnection: false });
  let text = '';
  return new Promise((resolve, reject) => {
    socket.on('chat.delta', (m) => (text += m.text));
    socket.on('chat.done', () => { socket.close(); resolve(text); });
    socket.on('connect_error', reject);
    socket.on('hello', () => socket.emit('chat.send', { text: 'hi over socket.io' }, (ack) => ack.type === 'chat.ack' || reject(new Error(JSON.stringify(ack)))));
  });
}

const result = {
  resolved: createRequire(import.meta.url).resolve('chatwire'),
  host: await (await fetch('http://127.0.0.1:' + port + '/')).text(),
  health: await (await fetch('http://127.0.0.1:' + port + '/healthz')).json(),
  ws: await wsChat(),
  socketio: await socketIoChat(),
  client: typeof connect,
};
await chatwire.close();
server.close();
console.log(JSON.stringify(result));
`;

test('installed from the tarball: createChatwire on http.createServer() chats over /ws and socket.io', async () => {
  fs.writeFileSync(path.join(tmp, 'host.mjs'), HOST);
  const dataDir = path.join(tmp, 'data');
  const child = spawn(process.execPath, ['host.mjs', dataDir], { cwd: tmp, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
  child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  assert.equal(code, 0, stderr);
  const result = JSON.parse(stdout.trim().split('\n').at(-1) as string) as Record<string, unknown>;
  // Loaded from the installed copy, not from this checkout's dist.
  assert.equal(fs.realpathSync(result.resolved as string), fs.realpathSync(path.join(installed, 'dist', 'src', 'index.js')));
  assert.equal(result.host, 'host page');
  assert.deepEqual(result.health, { status: 'ok' });
  assert.ok((result.ws as string).length > 0);
  assert.ok((result.socketio as string).length > 0);
  assert.equal(result.client, 'function');
});

test('installed from the tarball: the type declarations resolve through the exports', () => {
  fs.writeFileSync(
    path.join(tmp, 'typed.ts'),
    `import { createChatwire, type ChatwireOptions } from 'chatwire';
import { connect } from 'chatwire/client';
const options: ChatwireOptions = { port: 0, maxFrameBytes: 65536, authenticate: ({ headers }) => (headers.cookie ? { userId: 'u', role: 'consumer' } : null) };
// @ts-expect-error a number option takes no string
const wrong: ChatwireOptions = { port: '80' };
export const made = [createChatwire(options), connect, wrong];
`,
  );
  const tsc = (file: string) =>
    execFileSync(
      process.execPath,
      [
        path.join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'),
        '--noEmit',
        '--strict',
        '--module',
        'nodenext',
        '--moduleResolution',
        'nodenext',
        '--target',
        'es2022',
        '--skipLibCheck',
        '--types',
        'node',
        file,
      ],
      { cwd: tmp, encoding: 'utf8' },
    );
  tsc('typed.ts');
  // And the check can fail: an option chatwire does not have is a type error.
  fs.writeFileSync(path.join(tmp, 'mistyped.ts'), `import { createChatwire } from 'chatwire';\nexport const c = createChatwire({ dataPath: './x' });\n`);
  assert.throws(
    () => tsc('mistyped.ts'),
    (err: unknown) => /dataPath/.test(String((err as { stdout?: string }).stdout)),
  );
});
