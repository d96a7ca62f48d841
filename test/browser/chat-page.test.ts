/**
 * The chat page (GET /) in a real headless Chromium, driven by playwright-core,
 * against a real server. Install the browser with `apt-get install -y chromium`
 * (or point CHATWIRE_CHROMIUM at one); without a browser the suite is skipped
 * and says why. `CHATWIRE_UPDATE_SCREENSHOT=1` also refreshes docs/screenshot.png.
 *
 * Frames the page cannot use are injected by dispatching a `message` event on
 * the page's own WebSocket object, which is exactly how a frame from the
 * network reaches the client library. The test finds that object through an
 * init script that records the sockets the page opens; the product has no
 * test hooks.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import WebSocket from 'ws';
import { connect } from '../../src/client/client.js';
import { startServer, type TestServer } from '../helpers/server.js';

const CHROMIUM = process.env.CHATWIRE_CHROMIUM ?? '/usr/bin/chromium';
const browserMissing = fs.existsSync(CHROMIUM)
  ? false
  : `no Chromium at ${CHROMIUM}: install it with \`apt-get install -y chromium\` (or set CHATWIRE_CHROMIUM) to run the browser tests`;
const updateScreenshot = process.env.CHATWIRE_UPDATE_SCREENSHOT === '1';

function projectRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!fs.existsSync(path.join(dir, 'package.json'))) dir = path.dirname(dir);
  return dir;
}

interface PageWindow {
  __sockets: { dispatchEvent(e: Event): boolean }[];
  __seen: string[];
}

async function launch(): Promise<{ context: BrowserContext; close(): Promise<void> }> {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  await context.addInitScript(() => {
    const w = window as unknown as PageWindow & { WebSocket: typeof globalThis.WebSocket };
    const Native = w.WebSocket;
    w.__sockets = [];
    w.WebSocket = class extends Native {
      constructor(url: string | URL, protocols?: string | string[]) {
        super(url, protocols);
        w.__sockets.push(this);
      }
    };
  });
  return {
    context,
    async close() {
      await context.close();
      fs.rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/** A page for one user, connected, whose uncaught errors a test can assert are none. */
async function openPage(context: BrowserContext, server: TestServer, user: string): Promise<{ page: Page; errors: string[] }> {
  const page = await context.newPage();
  page.setDefaultTimeout(20_000);
  const errors: string[] = [];
  page.on('pageerror', (err) => errors.push(err.message));
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('chatwire page:')) errors.push(m.text());
  });
  await page.goto(`${server.http}/?user=${user}`);
  await page.waitForSelector('#connection[data-state="open"]');
  return { page, errors };
}

async function send(page: Page, text: string, options: { maxTokens?: number; skipCache?: boolean } = {}): Promise<void> {
  await page.fill('#max-tokens', options.maxTokens === undefined ? '' : String(options.maxTokens));
  await page.setChecked('#skip-cache', options.skipCache ?? false);
  await page.fill('#input', text);
  await page.press('#input', 'Enter');
}

const lastReply = (page: Page) => page.locator('.assistant').last();

/** Waits until the last reply is streaming with some text, and returns that text. */
async function partialText(page: Page): Promise<string> {
  const handle = await page.waitForFunction(() => {
    const replies = document.querySelectorAll<HTMLElement>('.assistant');
    const last = replies[replies.length - 1];
    const text = last?.querySelector('.text')?.textContent ?? '';
    return last?.dataset.state === 'streaming' && text.length > 0 ? text : null;
  });
  return (await handle.jsonValue()) as string;
}

async function currentConversation(page: Page): Promise<string> {
  const id = await page.locator('#conversations button[aria-current="true"]').getAttribute('data-conversation-id');
  assert.ok(id);
  return id;
}

async function storedMessages(server: TestServer, user: string, conversationId: string): Promise<{ role: string; text: string }[]> {
  const res = await fetch(`${server.http}/v1/conversations/${conversationId}/messages?user=${user}`);
  assert.equal(res.status, 200);
  return ((await res.json()) as { messages: { role: string; text: string }[] }).messages.map(({ role, text }) => ({ role, text }));
}

/** Delivers `frame` to the page's client exactly as a frame off its socket would arrive. */
async function injectFrame(page: Page, frame: string): Promise<void> {
  await page.evaluate((data) => {
    const sockets = (window as unknown as PageWindow).__sockets;
    sockets[sockets.length - 1]?.dispatchEvent(new MessageEvent('message', { data }));
  }, frame);
}

/** Records every value an attribute of an element takes from now on (into window.__seen). */
async function watchAttribute(page: Page, selector: string, attribute: string): Promise<void> {
  await page.evaluate(
    ([sel, attr]) => {
      const w = window as unknown as PageWindow;
      const node = document.querySelector(sel as string) as HTMLElement;
      w.__seen = [];
      new MutationObserver(() => w.__seen.push(node.getAttribute(attr as string) ?? '')).observe(node, { attributes: true, attributeFilter: [attr as string] });
    },
    [selector, attribute],
  );
}

describe('the chat page in headless Chromium', { skip: browserMissing }, () => {
  let server: TestServer;
  let browser: { context: BrowserContext; close(): Promise<void> };
  before(async () => {
    server = await startServer({ devTokenDelayMs: 20 });
    browser = await launch();
  });
  after(async () => {
    await browser?.close();
    await server?.close();
  });

  test('the page, the client library and its own module are served with their content types and ETag revalidation', async () => {
    for (const [route, type] of [
      ['/', /^text\/html/],
      ['/client.js', /^text\/javascript/],
      ['/chat-page.js', /^text\/javascript/],
      ['/favicon.svg', /^image\/svg\+xml/],
    ] as const) {
      const res = await fetch(`${server.http}${route}`);
      assert.equal(res.status, 200, route);
      assert.match(res.headers.get('content-type') ?? '', type);
      assert.equal(res.headers.get('cache-control'), 'public, max-age=0, must-revalidate');
      const etag = res.headers.get('etag');
      assert.ok(etag);
      await res.arrayBuffer();
      const again = await fetch(`${server.http}${route}`, { headers: { 'if-none-match': etag } });
      assert.equal(again.status, 304, route);
    }
    const lib = await fetch(`${server.http}/client.js`);
    assert.equal(lib.headers.get('access-control-allow-origin'), '*');
    // The browser loads it as it is: no import of anything, so no bundler is needed.
    assert.doesNotMatch(await lib.text(), /^\s*import\s/m);
  });

  test('a message streams into the page as it arrives, with its time to first token, and is what the server stored', async () => {
    const { page, errors } = await openPage(browser.context, server, 'pw-stream');
    assert.match((await page.textContent('#who')) ?? '', /signed in as pw-stream · dev\//);
    await send(page, 'Can someone fix a leaking tap tomorrow?', { maxTokens: 40 });
    const partial = await partialText(page);
    await page.waitForSelector('.assistant[data-state="done"]');
    const text = (await lastReply(page).locator('.text').textContent()) ?? '';
    assert.ok(text.startsWith(partial) && partial.length < text.length, `streamed: "${partial}" before "${text}"`);
    assert.equal(text.split(' ').length, 40);
    assert.match((await lastReply(page).locator('.meta').textContent()) ?? '', /first token \d+ ms.*40 tokens.*max tokens reached/);
    const conversationId = await currentConversation(page);
    assert.deepEqual(await storedMessages(server, 'pw-stream', conversationId), [
      { role: 'user', text: 'Can someone fix a leaking tap tomorrow?' },
      { role: 'assistant', text },
    ]);
    assert.equal(await page.textContent('#title'), 'Can someone fix a leaking tap tomorrow?');
    assert.deepEqual(errors, []);
    await page.close();
  });

  test('the stop button ends the reply where it is, and the stored reply is the text the page shows', async () => {
    const { page, errors } = await openPage(browser.context, server, 'pw-stop');
    await send(page, 'Tell me everything about roofs', { maxTokens: 2000, skipCache: true });
    await partialText(page);
    assert.equal(await page.isVisible('#stop'), true);
    await page.click('#stop');
    await page.waitForSelector('.assistant[data-state="cancelled"]');
    assert.match((await lastReply(page).locator('.meta').textContent()) ?? '', /stopped/);
    const text = (await lastReply(page).locator('.text').textContent()) ?? '';
    assert.ok(text.length > 0 && text.split(' ').length < 2000);
    const stored = await storedMessages(server, 'pw-stop', await currentConversation(page));
    assert.equal(stored[1]?.text, text);
    assert.equal(await page.isVisible('#stop'), false);
    assert.deepEqual(errors, []);
    await page.close();
  });

  test('a socket killed mid-stream shows reconnecting, resumes by itself, and the reply ends complete', async () => {
    const { page, errors } = await openPage(browser.context, server, 'pw-resume');
    await send(page, 'Survive a dropped connection', { maxTokens: 120, skipCache: true });
    const before = await partialText(page);
    await watchAttribute(page, 'body', 'data-connection');
    server.app.server.closeConnections(1012, 'killed by the test');
    await page.waitForSelector('.assistant[data-state="done"]', { timeout: 30_000 });
    const seen = await page.evaluate(() => (window as unknown as PageWindow).__seen);
    assert.deepEqual(seen, ['reconnecting', 'open']);
    assert.match((await page.textContent('#notice')) ?? '', /Reconnected: resumed the reply/);
    const text = (await lastReply(page).locator('.text').textContent()) ?? '';
    assert.ok(text.startsWith(before) && before.length < text.length);
    assert.equal(text.split(' ').length, 120);
    const stored = await storedMessages(server, 'pw-resume', await currentConversation(page));
    assert.equal(stored[1]?.text, text);
    assert.deepEqual(errors, []);
    await page.close();
  });

  test('a repeated question is answered from the cache, and the reply says so', async () => {
    const { page, errors } = await openPage(browser.context, server, 'pw-cache');
    await send(page, 'How much does a plumber cost per hour?');
    await page.waitForSelector('.assistant[data-state="done"]');
    const first = await lastReply(page).locator('.text').textContent();
    assert.equal(await lastReply(page).locator('.badge.cached').count(), 0);
    await page.click('#new-chat');
    await send(page, 'How much does a plumber cost per hour?');
    await page.waitForSelector('.assistant[data-state="done"]');
    assert.equal(await lastReply(page).locator('.badge.cached').textContent(), '⚡ cached');
    assert.match((await lastReply(page).locator('.meta').textContent()) ?? '', /first token \d+ ms/);
    assert.equal(await lastReply(page).locator('.text').textContent(), first);
    assert.equal(await page.locator('#conversations button').count(), 2);
    assert.deepEqual(errors, []);
    await page.close();
  });

  test('the conversation list survives a reload and reopens each conversation with its history', async () => {
    const { page, errors } = await openPage(browser.context, server, 'pw-history');
    await send(page, 'First question', { maxTokens: 5 });
    await page.waitForSelector('.assistant[data-state="done"]');
    await send(page, 'Second question', { maxTokens: 5 });
    await page.waitForSelector('.assistant:nth-of-type(4)[data-state="done"]');
    const conversationId = await currentConversation(page);
    await page.click('#new-chat');
    await send(page, 'Another topic', { maxTokens: 5 });
    await page.waitForSelector('.assistant[data-state="done"]');
    await page.reload();
    await page.waitForSelector('#connection[data-state="open"]');
    assert.deepEqual(await page.locator('#conversations .title').allTextContents(), ['Another topic', 'First question']);
    await page.click(`#conversations button[data-conversation-id="${conversationId}"]`);
    await page.waitForSelector('.thread .msg');
    const shown = await page.locator('.thread .msg .bubble').allTextContents();
    const stored = await storedMessages(server, 'pw-history', conversationId);
    assert.deepEqual(
      shown,
      stored.map((m) => m.text),
    );
    assert.equal(stored.length, 4);
    assert.equal(await page.textContent('#title'), 'First question');
    assert.deepEqual(errors, []);
    await page.close();
  });

  test('a frame the page cannot read or render shows a message, and the page stays usable', async () => {
    const { page, errors } = await openPage(browser.context, server, 'pw-boundary');
    assert.equal(await page.isVisible('#banner'), false);
    await injectFrame(page, '{"type": "chat.delta", "taskId": ');
    await page.waitForSelector('#banner:not([hidden])');
    assert.match((await page.textContent('#banner-text')) ?? '', /could not read.*not JSON.*still usable/);
    await page.click('#banner-close');
    assert.equal(await page.isVisible('#banner'), false);

    // A chat.done whose timings are missing: the client library ends the stream, rendering its details fails.
    await send(page, 'Start a long answer', { maxTokens: 300, skipCache: true });
    await partialText(page);
    const taskId = await lastReply(page).getAttribute('data-task-id');
    assert.ok(taskId);
    await injectFrame(page, JSON.stringify({ type: 'chat.done', taskId, messageId: 'msg_x', finishReason: 'stop', usage: null, cached: false, timings: null }));
    await page.waitForSelector('#banner:not([hidden])');
    assert.match((await page.textContent('#banner-text')) ?? '', /^Something went wrong.*null.*still usable/);
    await page.waitForSelector('.assistant[data-state="unreadable"]');
    // The real task is still running on the server: cancel it, as another tab of the user could.
    const other = connect(server.ws, { user: 'pw-boundary', WebSocket });
    await other.request({ type: 'chat.cancel', taskId });
    other.close();

    await send(page, 'Are you still there?', { maxTokens: 6 });
    await page.waitForSelector('.assistant:last-of-type[data-state="done"]');
    assert.equal(((await lastReply(page).locator('.text').textContent()) ?? '').split(' ').length, 6);
    assert.deepEqual(errors, []);
    await page.close();
  });

  test('saves docs/screenshot.png', { skip: updateScreenshot ? false : 'set CHATWIRE_UPDATE_SCREENSHOT=1 to refresh docs/screenshot.png' }, async () => {
    const { page } = await openPage(browser.context, server, 'demo');
    await send(page, 'Find me a painter for a small garden fence', { maxTokens: 24 });
    await page.waitForSelector('.assistant[data-state="done"]');
    await page.click('#new-chat');
    await send(page, 'Can someone fix a leaking tap tomorrow morning?', { maxTokens: 36 });
    await page.waitForSelector('.assistant[data-state="done"]');
    await page.click('#new-chat');
    await send(page, 'Can someone fix a leaking tap tomorrow morning?', { maxTokens: 36 });
    await page.waitForSelector('.assistant[data-state="done"]');
    await send(page, 'What would that cost, roughly?', { maxTokens: 300, skipCache: true });
    await partialText(page);
    await page.waitForFunction(() => (document.querySelector('.assistant:last-of-type .text')?.textContent ?? '').split(' ').length > 14);
    await page.screenshot({ path: path.join(projectRoot(), 'docs', 'screenshot.png') });
    await page.click('#stop');
    await page.waitForSelector('.assistant:last-of-type[data-state="cancelled"]');
    await page.close();
  });
});

describe('the chat page under a rate limit', { skip: browserMissing }, () => {
  let server: TestServer;
  let browser: { context: BrowserContext; close(): Promise<void> };
  before(async () => {
    // 12 chats a minute: a burst of 12, then one every 5 s.
    server = await startServer({ chatsPerMinute: 12 });
    browser = await launch();
  });
  after(async () => {
    await browser?.close();
    await server?.close();
  });

  test('a rate-limited message shows a countdown, then is sent by itself', async () => {
    const { page, errors } = await openPage(browser.context, server, 'pw-limited');
    // Use up the user's chats over HTTP: the buckets are per user, whatever the transport.
    let limited = false;
    for (let i = 0; i < 20 && !limited; i++) {
      const res = await fetch(`${server.http}/v1/chat?user=pw-limited`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ text: `burst ${i}`, params: { maxTokens: 1 } }),
      });
      await res.arrayBuffer();
      limited = res.status === 429;
    }
    assert.ok(limited);
    await watchAttribute(page, '#ratelimit-text', 'data-seconds');
    await send(page, 'Worth the wait');
    await page.waitForSelector('#ratelimit:not([hidden])');
    assert.match((await page.textContent('#ratelimit-text')) ?? '', /^Rate limit reached: sending in [1-5] s$/);
    await page.waitForSelector('.assistant[data-state="done"]', { timeout: 30_000 });
    assert.equal(await page.isVisible('#ratelimit'), false);
    const seconds = (await page.evaluate(() => (window as unknown as PageWindow).__seen)).map(Number);
    assert.ok(seconds.length >= 2, `the countdown ticked: ${seconds.join(', ')}`);
    assert.deepEqual(
      seconds,
      [...seconds].sort((a, b) => b - a),
    );
    const stored = await storedMessages(server, 'pw-limited', await currentConversation(page));
    assert.deepEqual(
      stored.map((m) => m.role),
      ['user', 'assistant'],
    );
    assert.equal(stored[0]?.text, 'Worth the wait');
    assert.deepEqual(errors, []);
    await page.close();
  });
});

describe('the chat page on two pages of one user', { skip: browserMissing }, () => {
  let server: TestServer;
  let browser: { context: BrowserContext; close(): Promise<void> };
  before(async () => {
    server = await startServer({ devTokenDelayMs: 20 });
    browser = await launch();
  });
  after(async () => {
    await browser?.close();
    await server?.close();
  });

  test('two pages of one user: the second shows, streaming, the reply to what the first asked in the conversation it shows', async () => {
    const first = await openPage(browser.context, server, 'pw-sync');
    const second = await openPage(browser.context, server, 'pw-sync');
    await send(first.page, 'Who can fix a leaking tap?', { maxTokens: 4 });
    await first.page.waitForSelector('.assistant[data-state="done"]');
    const conversationId = await currentConversation(first.page);
    // The second page heard of the chat: the conversation is in its list; it opens it.
    const entry = second.page.locator(`#conversations button[data-conversation-id="${conversationId}"]`);
    await entry.waitFor();
    await entry.click();
    // Its history: the question and the reply.
    await second.page.waitForSelector('.assistant');

    await send(first.page, 'And tomorrow morning?', { maxTokens: 60 });
    const mirrored = second.page.locator('.user[data-from="elsewhere"]');
    await mirrored.waitFor();
    assert.equal(await mirrored.locator('.bubble').textContent(), 'And tomorrow morning?');
    const partial = await partialText(second.page);
    await second.page.waitForSelector('.assistant[data-state="done"]');
    await first.page.waitForFunction(() => document.querySelectorAll('.assistant[data-state="done"]').length === 2);
    const shown = (await lastReply(second.page).locator('.text').textContent()) ?? '';
    const asked = (await lastReply(first.page).locator('.text').textContent()) ?? '';
    assert.equal(shown, asked);
    assert.ok(shown.startsWith(partial) && partial.length < shown.length, `streamed: "${partial}" before "${shown}"`);
    const stored = await storedMessages(server, 'pw-sync', conversationId);
    assert.deepEqual(stored.at(-1), { role: 'assistant', text: shown });
    // Stored once, though two pages show it.
    assert.equal(stored.filter((m) => m.text === 'And tomorrow morning?').length, 1);
    assert.deepEqual(first.errors, []);
    assert.deepEqual(second.errors, []);
    await first.page.close();
    await second.page.close();
  });
});
