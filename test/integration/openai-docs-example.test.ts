/** The example of docs/openai.md, run as written (node on the code block) against a real server. */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import OpenAI from 'openai';
import { projectRoot } from '../../scripts/gen-docs.js';
import { startServer } from '../helpers/server.js';

const root = projectRoot();

function exampleOfDoc(): string {
  const doc = fs.readFileSync(path.join(root, 'docs', 'openai.md'), 'utf8');
  const block = /^```js\n([\s\S]*?)^```$/m.exec(doc)?.[1];
  assert.ok(block !== undefined, 'docs/openai.md has a js code block');
  return block;
}

function runNode(file: string, env: Record<string, string>): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [file], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.once('error', reject);
    child.once('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

test('the example of docs/openai.md streams a reply from chatwire with the official openai client', async (t) => {
  const code = exampleOfDoc();
  const lines = code.trimEnd().split('\n').length;
  assert.ok(lines <= 11, `the example is ${lines} lines`);
  // Inside the project, so that `import OpenAI from 'openai'` resolves as it does next to an `npm install openai`.
  const dir = fs.mkdtempSync(path.join(root, 'dist', 'openai-example-'));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'chat.mjs');
  fs.writeFileSync(file, code);
  const server = await startServer();
  t.after(() => server.close());

  const run = await runNode(file, { CHATWIRE_URL: `${server.http}/v1` });
  assert.equal(run.code, 0, run.stderr);
  const printed = run.stdout.trim();
  assert.equal(printed.split(' ').length, 32, printed);

  // The same question asked again is served from the cache the example's call filled: it went through chatwire.
  const question = /content: '([^']+)'/.exec(code)?.[1] as string;
  const again = await new OpenAI({ baseURL: `${server.http}/v1`, apiKey: 'open-mode' }).chat.completions
    .create({ model: 'dev-1', messages: [{ role: 'user', content: question }] })
    .withResponse();
  assert.equal(again.response.headers.get('cache-status'), 'chatwire; hit');
  assert.equal(again.data.choices[0]?.message.content, printed);
});
