/**
 * The React example of docs/ai-sdk.md, run as written: the tsx block is read from the doc, compiled (JSX only),
 * imported with its own imports (@ai-sdk/react, ai, react) and rendered by react-dom into a minimal DOM
 * (test/helpers/minimal-dom.ts) against a real server; the test types into its input and submits its form as a
 * user would. Only the server's address in the block is replaced by the test server's.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath, pathToFileURL } from 'node:url';
import ts from 'typescript';
import { projectRoot } from '../../scripts/gen-docs.js';
import { readSse } from '../helpers/clients.js';
import { type DomElement, installDom, submit, typeInto } from '../helpers/minimal-dom.js';
import { startServer, type TestServer } from '../helpers/server.js';

const here = path.dirname(fileURLToPath(import.meta.url));

/** Waits until `check` holds (the UI catches up with the stream), failing with `what` if it never does. */
async function until(check: () => boolean, what: () => string): Promise<void> {
  for (let i = 0; i < 2000; i++) {
    if (check()) return;
    await sleep(10);
  }
  assert.fail(`never happened: ${what()}`);
}

/** The doc's first tsx block compiled (JSX only) to a module beside the compiled tests, talking to `server`. */
function writeExample(server: TestServer): string {
  const doc = fs.readFileSync(path.join(projectRoot(), 'docs', 'ai-sdk.md'), 'utf8');
  const block = /```tsx\n([\s\S]*?)```/.exec(doc)?.[1] ?? '';
  assert.ok(block.includes("useChat({ transport: new DefaultChatTransport({ api: 'http://localhost:8080/api/chat' }) })"), block);
  const source = block.replaceAll('http://localhost:8080', server.http);
  const js = ts.transpileModule(source, {
    compilerOptions: { jsx: ts.JsxEmit.ReactJSX, module: ts.ModuleKind.ES2022, target: ts.ScriptTarget.ES2022 },
  }).outputText;
  // There its imports resolve from the project's node_modules.
  const file = path.join(here, `ai-sdk-example-${process.pid}.mjs`);
  fs.writeFileSync(file, js);
  return file;
}

/** The reply chatwire gives `text` in a conversation of its own, read over /v1 (the dev model is deterministic). */
async function replyTo(server: TestServer, text: string): Promise<string> {
  const headers = { 'content-type': 'application/json' };
  const ack = (await (await fetch(`${server.http}/v1/chat`, { method: 'POST', headers, body: JSON.stringify({ text }) })).json()) as { taskId: string };
  const events = await readSse(await fetch(`${server.http}/v1/tasks/${ack.taskId}/stream`, { headers }));
  return events
    .filter((e) => e.event === 'delta')
    .map((e) => e.data.text)
    .join('');
}

interface Root {
  render(element: unknown): void;
  unmount(): void;
}

test('the useChat example of docs/ai-sdk.md, rendered by react-dom, holds a two-message chat with chatwire', async () => {
  // Open mode, as the doc says: the page's requests are one anonymous user, that of its address.
  const server = await startServer({ devTokenDelayMs: 2 });
  const file = writeExample(server);
  const dom = installDom();
  const reactErrors: string[] = [];
  const consoleError = console.error;
  console.error = (...args: unknown[]) => void reactErrors.push(args.map(String).join(' '));
  let root: Root | undefined;
  try {
    // Untyped on purpose: react's types are not installed, and the test uses only these calls.
    const reactModule = 'react';
    const reactDomClient = 'react-dom/client';
    const { createElement } = (await import(reactModule)) as { createElement(type: unknown, props: unknown): unknown };
    const { createRoot } = (await import(reactDomClient)) as { createRoot(container: DomElement): Root };
    const { Chat } = (await import(pathToFileURL(file).href)) as { Chat: unknown };

    const container = dom.document.body.appendChild(dom.document.createElement('div'));
    root = createRoot(container);
    root.render(createElement(Chat, {}));
    await until(
      () => container.all('input').length === 1,
      () => 'the form rendered',
    );
    const input = container.all('input')[0] as DomElement;
    const form = container.all('form')[0] as DomElement;
    const lines = () => container.all('p').map((p) => p.textContent);

    const ask = async (question: string, count: number) => {
      typeInto(input, question);
      // React re-renders the controlled input with the typed value before the form reads it.
      await sleep(0);
      submit(form);
      await until(
        () => lines().length === count && (lines()[count - 1] ?? '').split(' ').length === 33,
        () => `a reply of 32 words; the page shows ${JSON.stringify(lines())}`,
      );
      assert.equal(input.value, '', 'the input is cleared when the message is sent');
    };

    await ask('Can someone fix a leaking tap tomorrow?', 2);
    const first = lines();
    assert.deepEqual(first, [
      'user: Can someone fix a leaking tap tomorrow?',
      `assistant: ${await replyTo(server, 'Can someone fix a leaking tap tomorrow?')}`,
    ]);

    await ask('And on Friday?', 4);
    const all = lines();
    assert.deepEqual(all.slice(0, 3), [...first, 'user: And on Friday?']);
    assert.match(all[3] as string, /^assistant: \S+( \S+){31}$/);
    // The second reply had the first exchange as its context: not what the same question alone gets.
    assert.notEqual(all[3], `assistant: ${await replyTo(server, 'And on Friday?')}`);
    assert.deepEqual(reactErrors, []);
  } finally {
    root?.unmount();
    // React finishes the unmount in its scheduler's next turns, which still use the DOM.
    await sleep(50);
    dom.uninstall();
    console.error = consoleError;
    fs.rmSync(file, { force: true });
    await server.close();
  }
});
