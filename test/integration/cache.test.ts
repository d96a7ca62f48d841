import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { test } from 'node:test';
import { writeTinyLlamaGguf } from '../fixtures/gguf-tiny-llama.js';
import { numberedTokens, startFakeOpenAI, streamReply } from '../fixtures/fake-openai.js';
import { readSse, WsClient } from '../helpers/clients.js';
import { metric, startServer, tempDataDir, type TestServer } from '../helpers/server.js';

type Msg = Awaited<ReturnType<WsClient['next']>>;

async function metrics(server: TestServer, names: string[]): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  for (const name of names) out[name] = await metric(server, name);
  return out;
}

interface Reply {
  ack: Msg;
  deltas: Msg[];
  chunks: string[];
  text: string;
  end: Msg;
}

/** Sends one chat and reads it to its end (one task at a time per client). */
async function chat(c: WsClient, body: Record<string, unknown>): Promise<Reply> {
  const ack = await c.request({ type: 'chat.send', ...body });
  assert.equal(ack.type, 'chat.ack', JSON.stringify(ack));
  const { deltas, text, end } = await c.collect(ack.taskId as string);
  assert.deepEqual(
    deltas.map((d) => d.seq),
    deltas.map((_, i) => i),
    'seq is contiguous from 0',
  );
  return { ack, deltas, chunks: deltas.map((d) => d.text as string), text, end };
}

const CACHE_METRICS = ['chatwire_model_calls_total', 'chatwire_cache_hits_total', 'chatwire_cache_misses_total'];

test('a second identical chat is served from the cache without a model call, with the same text and chunk boundaries', async (t) => {
  // A token delay makes the worker post one chunk per token, so the boundaries are worth comparing.
  const server = await startServer({ devTokenDelayMs: 2 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'ann' });
  const question = 'How much does a plumber charge to fix a leaking tap?';

  const miss = await chat(c, { text: question });
  assert.equal(miss.ack.status, 'queued');
  assert.equal(miss.end.type, 'chat.done');
  assert.equal(miss.end.cached, false);
  assert.ok(miss.chunks.length > 1, 'the reply came in several chunks');
  assert.deepEqual(await metrics(server, CACHE_METRICS), {
    chatwire_model_calls_total: 1,
    chatwire_cache_hits_total: 0,
    chatwire_cache_misses_total: 1,
  });

  const hit = await chat(c, { text: question });
  assert.equal(hit.ack.status, 'cached');
  assert.notEqual(hit.ack.taskId, miss.ack.taskId);
  assert.notEqual(hit.ack.conversationId, miss.ack.conversationId);
  assert.deepEqual(hit.chunks, miss.chunks);
  assert.equal(Buffer.compare(Buffer.from(hit.text), Buffer.from(miss.text)), 0);
  assert.equal(hit.end.type, 'chat.done');
  assert.equal(hit.end.cached, true);
  assert.equal(hit.end.finishReason, miss.end.finishReason);
  assert.deepEqual(hit.end.usage, miss.end.usage);
  assert.deepEqual(await metrics(server, CACHE_METRICS), {
    chatwire_model_calls_total: 1,
    chatwire_cache_hits_total: 1,
    chatwire_cache_misses_total: 1,
  });

  // The hit is stored like any reply: in the conversation's history and as a finished task.
  const history = await c.request({ type: 'conversation.history', conversationId: hit.ack.conversationId });
  assert.deepEqual(
    (history.messages as { role: string; text: string; messageId: string }[]).map((m) => [m.role, m.text]),
    [
      ['user', question],
      ['assistant', miss.text],
    ],
  );
  assert.equal((history.messages as { messageId: string }[])[1]?.messageId, hit.end.messageId);
  assert.equal((history.messages as { messageId: string }[])[0]?.messageId, hit.ack.messageId);
  const task = await c.request({ type: 'task.get', taskId: hit.ack.taskId });
  assert.deepEqual(
    { status: (task.task as { status: string }).status, seq: (task.task as { seq: number }).seq, text: (task.task as { text: string }).text },
    { status: 'done', seq: miss.chunks.length, text: miss.text },
  );
  await c.close();
});

test('a cache hit over HTTP acks 202 with status cached and streams the stored reply over SSE', async (t) => {
  const server = await startServer({ devTokenDelayMs: 2 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'hal' });
  const miss = await chat(c, { text: 'Is a roof inspection included in the quote?' });
  await c.close();

  const res = await fetch(`${server.http}/v1/chat?user=hal`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ text: 'Is a roof inspection included in the quote?' }),
  });
  assert.equal(res.status, 202);
  const ack = (await res.json()) as Msg;
  assert.equal(ack.status, 'cached');
  const events = await readSse(await fetch(`${server.http}/v1/tasks/${ack.taskId as string}/stream?user=hal`));
  const deltas = events.filter((e) => e.event === 'delta');
  assert.deepEqual(
    deltas.map((e) => e.data.text),
    miss.chunks,
  );
  assert.deepEqual(
    deltas.map((e) => e.id),
    deltas.map((_, i) => String(i)),
  );
  assert.equal(events.at(-1)?.event, 'done');
  assert.equal(events.at(-1)?.data.cached, true);
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 1);
});

test('texts that differ only in white space, line endings or Unicode composition share one entry; case does not', async (t) => {
  const server = await startServer({ devTokenDelayMs: 2 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'bea' });
  const base = 'Can the café team clean my kitchen tomorrow? Is the price fixed.';
  const miss = await chat(c, { text: base });
  assert.equal(miss.ack.status, 'queued');

  const variants = {
    'extra spaces and a tab': '   Can the café  team clean   my kitchen\ttomorrow?  Is the price fixed.  ',
    'LF line ends': 'Can the café team clean my kitchen\ntomorrow?\nIs the price fixed.',
    'CRLF line ends': 'Can the café team clean my kitchen\r\ntomorrow?\r\nIs the price fixed.',
    'NFD accents': base.normalize('NFD'),
    'no-break space': base.replace('clean my', 'clean\u00a0my'),
  };
  assert.notEqual(variants['NFD accents'], base, 'the NFD text really differs in code points');
  for (const [name, text] of Object.entries(variants)) {
    const hit = await chat(c, { text });
    assert.equal(hit.ack.status, 'cached', name);
    assert.deepEqual(hit.chunks, miss.chunks, name);
    assert.equal(hit.end.cached, true, name);
    // The user's message is stored exactly as typed; only the key is normalized.
    const history = await c.request({ type: 'conversation.history', conversationId: hit.ack.conversationId });
    assert.equal((history.messages as { text: string }[])[0]?.text, text, name);
  }

  const lower = await chat(c, { text: base.toLowerCase() });
  assert.equal(lower.ack.status, 'queued', 'case is part of the key');
  const noPunctuation = await chat(c, { text: base.replace(/\.$/, '') });
  assert.equal(noPunctuation.ack.status, 'queued', 'punctuation is part of the key');
  assert.deepEqual(await metrics(server, CACHE_METRICS), {
    chatwire_model_calls_total: 3,
    chatwire_cache_hits_total: Object.keys(variants).length,
    chatwire_cache_misses_total: 3,
  });
  await c.close();
});

test('the dev provider caches whatever the temperature, each temperature and maxTokens under its own key', async (t) => {
  const server = await startServer();
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'cal' });
  const text = 'Which electrician is available on Friday?';
  const hot = await chat(c, { text, params: { temperature: 1.5 } });
  assert.equal(hot.ack.status, 'queued');
  const hotAgain = await chat(c, { text, params: { temperature: 1.5 } });
  assert.equal(hotAgain.ack.status, 'cached');
  assert.equal(hotAgain.text, hot.text);

  const warm = await chat(c, { text, params: { temperature: 0.5 } });
  assert.equal(warm.ack.status, 'queued');
  const unset = await chat(c, { text });
  assert.equal(unset.ack.status, 'queued');
  const unsetAgain = await chat(c, { text });
  assert.equal(unsetAgain.ack.status, 'cached');
  const shorter = await chat(c, { text, params: { temperature: 1.5, maxTokens: 5 } });
  assert.equal(shorter.ack.status, 'queued');
  assert.equal(shorter.end.finishReason, 'length');
  const shorterAgain = await chat(c, { text, params: { temperature: 1.5, maxTokens: 5 } });
  assert.equal(shorterAgain.ack.status, 'cached');
  assert.equal(shorterAgain.end.finishReason, 'length');
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 4);
  await c.close();
});

test('with an OpenAI-compatible provider only temperature 0 is cached', async (t) => {
  const fake = await startFakeOpenAI();
  t.after(() => fake.close());
  const server = await startServer({ llm: 'openai', openaiBaseUrl: fake.baseUrl, model: 'fake-1', upstreamMaxRetries: 0 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'dee' });
  const text = 'Quote for painting two rooms?';
  const params = { maxTokens: 6 };

  for (const temperature of [0.7, 0.7, undefined, undefined]) {
    const r = await chat(c, { text, params: temperature === undefined ? params : { ...params, temperature } });
    assert.equal(r.ack.status, 'queued', `temperature ${String(temperature)} is not reproducible`);
    assert.equal(r.text, numberedTokens(6).join(''));
  }
  assert.equal(fake.requests.length, 4);
  // Requests that are never cacheable are neither hits nor misses.
  assert.deepEqual(await metrics(server, CACHE_METRICS), {
    chatwire_model_calls_total: 4,
    chatwire_cache_hits_total: 0,
    chatwire_cache_misses_total: 0,
  });

  const cold = await chat(c, { text, params: { ...params, temperature: 0 } });
  assert.equal(cold.ack.status, 'queued');
  const coldAgain = await chat(c, { text, params: { ...params, temperature: 0 } });
  assert.equal(coldAgain.ack.status, 'cached');
  assert.deepEqual(coldAgain.chunks, cold.chunks);
  assert.equal(fake.requests.length, 5);
  await c.close();
});

test('cache: refresh recomputes the reply and overwrites the entry', async (t) => {
  const fake = await startFakeOpenAI();
  t.after(() => fake.close());
  const server = await startServer({ llm: 'openai', openaiBaseUrl: fake.baseUrl, model: 'fake-1', upstreamMaxRetries: 0 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'eli' });
  const body = { text: 'Do you install fences?', params: { temperature: 0, maxTokens: 4 } };
  const first = await chat(c, body);
  assert.equal(first.text, 'w0 w1 w2 w3');

  // The upstream now answers differently: a plain use still gets the stored reply.
  fake.setHandler((ex) => streamReply(ex, { tokens: numberedTokens(4, 'v'), usage: { promptTokens: 5, completionTokens: 4 } }));
  const stale = await chat(c, body);
  assert.equal(stale.ack.status, 'cached');
  assert.equal(stale.text, 'w0 w1 w2 w3');
  assert.equal(fake.requests.length, 1);

  const refreshed = await chat(c, { ...body, cache: 'refresh' });
  assert.equal(refreshed.ack.status, 'queued');
  assert.equal(refreshed.end.cached, false);
  assert.equal(refreshed.text, 'v0 v1 v2 v3');
  assert.equal(fake.requests.length, 2);

  const after = await chat(c, body);
  assert.equal(after.ack.status, 'cached');
  assert.equal(after.text, 'v0 v1 v2 v3');
  assert.deepEqual(after.chunks, refreshed.chunks);
  assert.equal(fake.requests.length, 2);
  await c.close();
});

test('cache: bypass neither reads nor writes the cache', async (t) => {
  const server = await startServer();
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'fin' });
  const text = 'Can someone measure my window tomorrow?';
  const bypassed = await chat(c, { text, cache: 'bypass' });
  assert.equal(bypassed.ack.status, 'queued');
  // Not written: the next plain chat is a miss and calls the model.
  const used = await chat(c, { text });
  assert.equal(used.ack.status, 'queued');
  assert.equal(used.text, bypassed.text);
  // Not read either: an entry exists now, and bypass still calls the model.
  const again = await chat(c, { text, cache: 'bypass' });
  assert.equal(again.ack.status, 'queued');
  assert.equal(again.end.cached, false);
  const hit = await chat(c, { text });
  assert.equal(hit.ack.status, 'cached');
  assert.deepEqual(await metrics(server, CACHE_METRICS), {
    chatwire_model_calls_total: 3,
    chatwire_cache_hits_total: 1,
    chatwire_cache_misses_total: 1,
  });
  await c.close();
});

test('an entry older than the TTL is a miss, is removed, and is computed again', async (t) => {
  const server = await startServer({ cacheTtlSec: 1 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'gil' });
  const text = 'Is there a deposit for the bathroom job?';
  const first = await chat(c, { text });
  assert.equal(first.ack.status, 'queued');
  assert.equal((await chat(c, { text })).ack.status, 'cached');
  const bytes = await metric(server, 'chatwire_cache_bytes');
  assert.ok(bytes > 0);

  await sleep(1200);
  const expired = await chat(c, { text });
  assert.equal(expired.ack.status, 'queued');
  assert.equal(expired.end.cached, false);
  assert.equal(expired.text, first.text);
  assert.equal(await metric(server, 'chatwire_cache_evictions_total'), 1);
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 2);
  // The recomputed reply is stored again, with a fresh TTL.
  assert.equal((await chat(c, { text })).ack.status, 'cached');
  assert.equal(await metric(server, 'chatwire_cache_bytes'), bytes);
  await c.close();
});

test('the cache stays under its byte bound, evicting the least recently used entries', async (t) => {
  const maxBytes = 64 * 1024;
  const server = await startServer({ cacheMaxBytes: maxBytes, modelTokensPerMinute: 1_000_000, chatsPerMinute: 1000 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'hex' });
  // About 6.5 KB of text each: 20 of them are twice the bound.
  const questions = Array.from({ length: 20 }, (_, i) => `Long answer number ${i}, please`);
  let smallest = Infinity;
  for (const text of questions) {
    const r = await chat(c, { text, params: { maxTokens: 1000 } });
    assert.equal(r.ack.status, 'queued');
    smallest = Math.min(smallest, Buffer.byteLength(r.text));
    const bytes = await metric(server, 'chatwire_cache_bytes');
    assert.ok(bytes > 0 && bytes <= maxBytes, `cache bytes ${bytes} within ${maxBytes}`);
  }
  // An entry takes more bytes than its reply text, so at most this many fit.
  const fit = Math.floor(maxBytes / smallest);
  assert.ok(fit < questions.length, 'the workload is over the bound');
  const evictions = await metric(server, 'chatwire_cache_evictions_total');
  assert.ok(evictions >= questions.length - fit, `${evictions} evictions; at most ${fit} of ${questions.length} entries fit`);
  // The newest entry is still there; the oldest was evicted first.
  assert.equal((await chat(c, { text: questions.at(-1), params: { maxTokens: 1000 } })).ack.status, 'cached');
  assert.equal((await chat(c, { text: questions[0], params: { maxTokens: 1000 } })).ack.status, 'queued');
  assert.ok((await metric(server, 'chatwire_cache_bytes')) <= maxBytes);
  assert.equal(await metric(server, 'chatwire_model_calls_total'), 21);
  await c.close();
});

test('a restart on the same data dir keeps the cache: the first chat after it is a hit with no model call', async (t) => {
  const first = await startServer({ devTokenDelayMs: 2 });
  const c = await WsClient.connect(first.ws, { user: 'ivy' });
  const text = 'Can a licensed electrician install a light tomorrow?';
  const miss = await chat(c, { text });
  assert.equal(miss.ack.status, 'queued');
  const bytes = await metric(first, 'chatwire_cache_bytes');
  await c.close();
  await first.stop();

  const second = await startServer({ devTokenDelayMs: 2 }, first.dataDir);
  t.after(() => second.close());
  assert.equal(await metric(second, 'chatwire_cache_bytes'), bytes);
  const d = await WsClient.connect(second.ws, { user: 'ivy' });
  const hit = await chat(d, { text });
  assert.equal(hit.ack.status, 'cached');
  assert.deepEqual(hit.chunks, miss.chunks);
  assert.equal(hit.end.cached, true);
  assert.deepEqual(await metrics(second, CACHE_METRICS), {
    chatwire_model_calls_total: 0,
    chatwire_cache_hits_total: 1,
    chatwire_cache_misses_total: 0,
  });
  await d.close();
});

test("a restart against another OpenAI-compatible upstream does not serve the first upstream's replies", async (t) => {
  const upstreamA = await startFakeOpenAI({ handler: (ex) => streamReply(ex, { tokens: ['answer', ' from', ' upstream', ' A'] }) });
  t.after(() => upstreamA.close());
  const upstreamB = await startFakeOpenAI({ handler: (ex) => streamReply(ex, { tokens: ['answer', ' from', ' upstream', ' B'] }) });
  t.after(() => upstreamB.close());
  const settings = { llm: 'openai', model: 'fake-1', upstreamMaxRetries: 0 } as const;
  const body = { text: 'Who answers this?', params: { temperature: 0, maxTokens: 4 } };

  const dataDir = tempDataDir();
  const servers: TestServer[] = [];
  t.after(async () => {
    for (const s of servers) await s.stop();
    fs.rmSync(dataDir, { recursive: true, force: true });
  });
  const start = async (openaiBaseUrl: string) => {
    const server = await startServer({ ...settings, openaiBaseUrl }, dataDir);
    servers.push(server);
    return server;
  };

  const first = await start(upstreamA.baseUrl);
  const c = await WsClient.connect(first.ws, { user: 'jon' });
  assert.equal((await chat(c, body)).text, 'answer from upstream A');
  await c.close();
  await first.stop();

  const second = await start(upstreamB.baseUrl);
  const d = await WsClient.connect(second.ws, { user: 'jon' });
  const other = await chat(d, body);
  assert.equal(other.ack.status, 'queued');
  assert.equal(other.end.cached, false);
  assert.equal(other.text, 'answer from upstream B');
  assert.equal(upstreamB.requests.length, 1);
  await d.close();
  await second.stop();

  // The same upstream spelled with a trailing slash is the same upstream: its entry is still there.
  const third = await start(`${upstreamA.baseUrl}/`);
  const e = await WsClient.connect(third.ws, { user: 'jon' });
  const again = await chat(e, body);
  assert.equal(again.ack.status, 'cached');
  assert.equal(again.text, 'answer from upstream A');
  assert.equal(upstreamA.requests.length, 1);
  await e.close();
});

test("a restart on another local model file does not serve the first model's replies", async (t) => {
  const models = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-models-'));
  t.after(() => fs.rmSync(models, { recursive: true, force: true }));
  const modelA = writeTinyLlamaGguf(path.join(models, 'a.gguf'), { seed: 1 });
  const modelB = writeTinyLlamaGguf(path.join(models, 'b.gguf'), { seed: 2 });
  // CHATWIRE_MODEL stays `dev-1` for both, as it does when left unset: only the file differs.
  const body = { text: 'Can someone fix my fence tomorrow?', params: { temperature: 0, maxTokens: 8 } };

  const dataDir = tempDataDir();
  const servers: TestServer[] = [];
  t.after(async () => {
    for (const s of servers) await s.stop();
    fs.rmSync(dataDir, { recursive: true, force: true });
  });
  const start = async (modelPath: string) => {
    const server = await startServer({ llm: 'local', modelPath }, dataDir);
    servers.push(server);
    return server;
  };

  const first = await start(modelA.path);
  const c = await WsClient.connect(first.ws, { user: 'kim' });
  const fromA = await chat(c, body);
  assert.equal(fromA.ack.status, 'queued');
  assert.equal((await chat(c, body)).ack.status, 'cached');
  await c.close();
  await first.stop();

  const second = await start(modelB.path);
  const d = await WsClient.connect(second.ws, { user: 'kim' });
  const fromB = await chat(d, body);
  assert.equal(fromB.ack.status, 'queued');
  assert.equal(fromB.end.cached, false);
  assert.equal(await metric(second, 'chatwire_model_calls_total'), 1);
  assert.notEqual(fromB.text, fromA.text);
  await d.close();
});

test('a reply the upstream ended with content_filter or tool_calls is delivered as stop but never cached', async (t) => {
  const fake = await startFakeOpenAI();
  t.after(() => fake.close());
  const server = await startServer({ llm: 'openai', openaiBaseUrl: fake.baseUrl, model: 'fake-1', upstreamMaxRetries: 0 });
  t.after(() => server.close());
  const c = await WsClient.connect(server.ws, { user: 'lou' });

  for (const finishReason of ['content_filter', 'tool_calls'] as const) {
    fake.setHandler((ex) => streamReply(ex, { tokens: ['I cannot', ' help'], finishReason, usage: { promptTokens: 5, completionTokens: 2 } }));
    const body = { text: `A question the upstream ends with ${finishReason}`, params: { temperature: 0, maxTokens: 4 } };
    const before = fake.requests.length;
    for (let i = 0; i < 2; i++) {
      const r = await chat(c, body);
      assert.equal(r.ack.status, 'queued', `${finishReason}, chat ${i + 1}`);
      assert.equal(r.text, 'I cannot help');
      assert.equal(r.end.finishReason, 'stop');
      assert.equal(r.end.cached, false);
    }
    assert.equal(fake.requests.length, before + 2);
  }
  assert.equal(await metric(server, 'chatwire_cache_bytes'), 0);

  // Once the upstream ends the same request with stop, it is cached as usual.
  fake.setHandler((ex) => streamReply(ex, { tokens: ['Yes'], usage: { promptTokens: 5, completionTokens: 1 } }));
  const body = { text: 'A question the upstream ends with content_filter', params: { temperature: 0, maxTokens: 4 } };
  assert.equal((await chat(c, body)).ack.status, 'queued');
  const hit = await chat(c, body);
  assert.equal(hit.ack.status, 'cached');
  assert.equal(hit.text, 'Yes');
  await c.close();
});
