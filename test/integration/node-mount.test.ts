/**
 * The transport suites again, against chatwire attached to a plain node:http server (CHATWIRE_TEST_SERVER=node makes
 * test/helpers/server.ts mount it there): the same protocol, limits, backpressure and client behaviour over the
 * node:http adapter as over uWS. Left out: bad-input (a frame past four times the limit is refused with 1009 by the
 * `ws` package, where uWS drops the connection, 1006; both hold none of it) and chat-socketio-http (the browser
 * page is served by listen() only).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'node:test';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SUITES = ['auth', 'backpressure', 'chat-ws', 'client', 'http-caching', 'marketplace-transports', 'slow-readers'];

test('the transport suites pass against chatwire attached to a node:http server', async (t) => {
  const files = SUITES.map((s) => path.join(HERE, `${s}.test.js`));
  // Without NODE_TEST_CONTEXT: node:test would take the child for a nested run and skip every file.
  const { NODE_TEST_CONTEXT: _nested, ...env } = process.env;
  const child = spawn(process.execPath, ['--test', '--test-concurrency=1', '--test-reporter=tap', ...files], {
    env: { ...env, CHATWIRE_TEST_SERVER: 'node' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr.on('data', (c: Buffer) => (out += c.toString()));
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  const passed = Number(/^# pass (\d+)$/m.exec(out)?.[1] ?? 0);
  t.diagnostic(`${passed} tests passed against the node:http mount`);
  assert.equal(code, 0, out.slice(-4000));
  assert.match(out, /^# fail 0$/m);
  assert.ok(passed >= 40, `only ${passed} tests ran`);
});
