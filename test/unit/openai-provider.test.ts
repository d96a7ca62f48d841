import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { loadConfig } from '../../src/config.js';
import { createModelPool, type ModelPool } from '../../src/llm/pool.js';
import { createOpenAIProvider, retryAfterMsOf, type OpenAIProviderOptions } from '../../src/llm/openai.js';
import { countTokens, providerSettingsFrom, type ModelRequest, type ModelResult, type Provider } from '../../src/llm/provider.js';
import { AppError } from '../../src/protocol/index.js';
import { numberedTokens, refusedBaseUrl, replyError, startFakeOpenAI, streamReply, type FakeOpenAI } from '../fixtures/fake-openai.js';

const request: ModelRequest = {
  model: 'fake-1',
  messages: [
    { role: 'system', content: 'You help people book home services.' },
    { role: 'user', content: 'Can someone fix my fence?' },
    { role: 'assistant', content: 'Yes: when?' },
    { role: 'user', content: 'Tomorrow morning, please.' },
  ],
  temperature: 0,
  maxTokens: 5,
};
const promptCount = request.messages.reduce((sum, m) => sum + countTokens(m.content), 0);

function openai(baseUrl: string, overrides: Partial<OpenAIProviderOptions> = {}): Provider {
  return createOpenAIProvider({
    baseUrl,
    apiKey: 'sk-test-key',
    firstTokenTimeoutMs: 10_000,
    idleTimeoutMs: 10_000,
    maxRetries: 0,
    retryBaseDelayMs: 5,
    ...overrides,
  });
}

interface Outcome {
  chunks: string[];
  result?: ModelResult;
  error?: unknown;
}

async function collect(
  provider: Provider,
  req: ModelRequest = request,
  signal = new AbortController().signal,
  onChunk?: (text: string) => void,
): Promise<Outcome> {
  const chunks: string[] = [];
  const it = provider.stream(req, signal);
  try {
    for (;;) {
      const step = await it.next();
      if (step.done) return { chunks, result: step.value };
      chunks.push(step.value);
      onChunk?.(step.value);
    }
  } catch (error) {
    return { chunks, error };
  }
}

function assertAppError(error: unknown, code: string, message: string, retryAfterMs?: number): void {
  assert.ok(error instanceof AppError, `expected an AppError, got ${String(error)}`);
  assert.equal(error.code, code);
  assert.equal(error.message, message);
  assert.equal(error.retryAfterMs, retryAfterMs);
}

describe('openai provider against a fake upstream', () => {
  let fake: FakeOpenAI;
  before(async () => {
    fake = await startFakeOpenAI();
  });
  after(async () => {
    await fake.close();
  });
  const reset = () => {
    fake.requests.length = 0;
  };

  test('streams the deltas in order and reports the usage the upstream sent', async () => {
    reset();
    const provider = openai(fake.baseUrl);
    const out = await collect(provider);
    assert.deepEqual(out.chunks, ['w0', ' w1', ' w2', ' w3', ' w4']);
    assert.deepEqual(out.result, { finishReason: 'stop', usage: { promptTokens: 11, completionTokens: 5 }, usageSource: 'reported' });
    assert.equal(fake.requests.length, 1);
    const sent = fake.requests[0];
    assert.deepEqual(sent?.body, {
      model: 'fake-1',
      messages: request.messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: 0,
      max_tokens: 5,
    });
    assert.equal(sent?.headers.authorization, 'Bearer sk-test-key');
  });

  test('counts the usage when the upstream sends none, and says so', async () => {
    reset();
    fake.setHandler((ex) => streamReply(ex, { tokens: ['Fence', ' repair', ' is', ' booked', '.'], usage: false }));
    const out = await collect(openai(fake.baseUrl));
    assert.equal(out.chunks.join(''), 'Fence repair is booked.');
    assert.deepEqual(out.result, {
      finishReason: 'stop',
      usage: { promptTokens: promptCount, completionTokens: countTokens('Fence repair is booked.') },
      usageSource: 'counted',
    });
  });

  test('counts the usage itself when the reported counts are not whole numbers >= 0', async () => {
    for (const usage of [
      { promptTokens: -1, completionTokens: 5 },
      { promptTokens: 3, completionTokens: 2.5 },
      { promptTokens: 3, completionTokens: 1e17 },
    ]) {
      reset();
      fake.setHandler((ex) => streamReply(ex, { tokens: ['Fence', ' repair', ' is', ' booked', '.'], usage }));
      const out = await collect(openai(fake.baseUrl));
      assert.deepEqual(
        out.result,
        { finishReason: 'stop', usage: { promptTokens: promptCount, completionTokens: countTokens('Fence repair is booked.') }, usageSource: 'counted' },
        JSON.stringify(usage),
      );
    }
  });

  test('a finish_reason other than stop or length ends the reply as stop, marked not to be cached', async () => {
    for (const finishReason of ['content_filter', 'tool_calls'] as const) {
      reset();
      fake.setHandler((ex) => streamReply(ex, { tokens: ['no'], finishReason, usage: { promptTokens: 3, completionTokens: 1 } }));
      const reported = await collect(openai(fake.baseUrl));
      assert.deepEqual(reported.result, {
        finishReason: 'stop',
        usage: { promptTokens: 3, completionTokens: 1 },
        usageSource: 'reported',
        uncacheable: `finish_reason ${finishReason}`,
      });
      reset();
      fake.setHandler((ex) => streamReply(ex, { tokens: ['no'], finishReason, usage: false }));
      assert.equal((await collect(openai(fake.baseUrl))).result?.uncacheable, `finish_reason ${finishReason}`);
    }
  });

  test('maps finish_reason length to length, and sends no max_tokens or temperature the request did not set', async () => {
    reset();
    fake.setHandler((ex) => streamReply(ex, { tokens: ['a', 'b'], finishReason: 'length', usage: { promptTokens: 3, completionTokens: 2 } }));
    const out = await collect(openai(fake.baseUrl), { model: 'fake-1', messages: [{ role: 'user', content: 'hi' }] });
    assert.equal(out.result?.finishReason, 'length');
    assert.equal('max_tokens' in (fake.requests[0]?.body ?? {}), false);
    assert.equal('temperature' in (fake.requests[0]?.body ?? {}), false);
  });

  test('sends a placeholder API key when none is configured (local servers need none)', async () => {
    reset();
    fake.setHandler((ex) => streamReply(ex, { tokens: ['ok'] }));
    const out = await collect(openai(fake.baseUrl, { apiKey: undefined }));
    assert.deepEqual(out.chunks, ['ok']);
    assert.equal(fake.requests[0]?.headers.authorization, 'Bearer chatwire-no-key');
  });

  test('a refused connection is upstream_error naming the cause, retried up to maxRetries', async () => {
    const out = await collect(openai(await refusedBaseUrl(), { maxRetries: 2 }));
    assert.deepEqual(out.chunks, []);
    assertAppError(out.error, 'upstream_error', 'cannot reach the upstream (ECONNREFUSED)');
  });

  test('an HTTP 500 is upstream_error with the status and none of the body, after maxRetries retries', async () => {
    reset();
    fake.setHandler((ex) => replyError(ex.res, 500, { error: { message: 'db password hunter2 leaked', type: 'server_error', param: null, code: null } }));
    const out = await collect(openai(fake.baseUrl, { maxRetries: 2 }));
    assertAppError(out.error, 'upstream_error', 'the upstream answered HTTP 500');
    assert.equal(String((out.error as Error).message).includes('hunter2'), false);
    assert.equal(fake.requests.length, 3);
  });

  test('an HTTP 400 is not retried', async () => {
    reset();
    fake.setHandler((ex) => replyError(ex.res, 400, { error: { message: 'bad', type: 'invalid_request_error', param: 'messages', code: null } }));
    const out = await collect(openai(fake.baseUrl, { maxRetries: 2 }));
    assertAppError(out.error, 'upstream_error', 'the upstream answered HTTP 400');
    assert.equal(fake.requests.length, 1);
  });

  test('an HTTP 401 says to check the API key', async () => {
    reset();
    fake.setHandler((ex) =>
      replyError(ex.res, 401, {
        error: { message: 'Incorrect API key provided: sk-te***key', type: 'invalid_request_error', param: null, code: 'invalid_api_key' },
      }),
    );
    const out = await collect(openai(fake.baseUrl, { maxRetries: 2 }));
    assertAppError(out.error, 'upstream_error', 'the upstream answered HTTP 401: check the API key');
    assert.equal(fake.requests.length, 1);
  });

  test('a 429 with Retry-After is upstream_error carrying retryAfterMs, not retried when the wait exceeds the first-token budget', async () => {
    reset();
    fake.setHandler((ex) =>
      replyError(ex.res, 429, { error: { message: 'Rate limit reached', type: 'requests', param: null, code: 'rate_limit_exceeded' } }, { 'retry-after': '7' }),
    );
    const out = await collect(openai(fake.baseUrl, { maxRetries: 2, firstTokenTimeoutMs: 5000 }));
    assertAppError(out.error, 'upstream_error', 'the upstream is rate limiting chatwire (HTTP 429)', 7000);
    assert.equal(fake.requests.length, 1);
  });

  test('a 429 whose Retry-After fits the budget is retried after that wait', async () => {
    reset();
    fake.setHandler((ex) => {
      if (ex.index === 0) {
        replyError(ex.res, 429, { error: { message: 'slow down', type: 'requests', param: null, code: 'rate_limit_exceeded' } }, { 'retry-after-ms': '20' });
        return;
      }
      return streamReply(ex, { tokens: numberedTokens(3), usage: { promptTokens: 4, completionTokens: 3 } });
    });
    const out = await collect(openai(fake.baseUrl, { maxRetries: 1 }));
    assert.deepEqual(out.chunks, ['w0', ' w1', ' w2']);
    assert.equal(out.result?.usageSource, 'reported');
    assert.equal(fake.requests.length, 2);
  });

  test('Retry-After is read as milliseconds, seconds or an HTTP date', () => {
    const now = Date.parse('2025-01-01T00:00:00Z');
    assert.equal(retryAfterMsOf(new Headers({ 'retry-after-ms': '250' }), now), 250);
    assert.equal(retryAfterMsOf(new Headers({ 'retry-after': '3' }), now), 3000);
    assert.equal(retryAfterMsOf(new Headers({ 'retry-after': 'Wed, 01 Jan 2025 00:00:10 GMT' }), now), 10_000);
    assert.equal(retryAfterMsOf(new Headers({ 'retry-after': 'soon' }), now), undefined);
    assert.equal(retryAfterMsOf(new Headers(), now), undefined);
  });

  test('503s before the first token are retried and the reply arrives exactly once', async () => {
    reset();
    fake.setHandler((ex) => {
      if (ex.index < 2) {
        replyError(ex.res, 503, { error: { message: 'overloaded', type: 'server_error', param: null, code: null } });
        return;
      }
      return streamReply(ex, { tokens: numberedTokens(6), usage: { promptTokens: 9, completionTokens: 6 } });
    });
    const out = await collect(openai(fake.baseUrl, { maxRetries: 2 }));
    assert.deepEqual(out.chunks, numberedTokens(6));
    assert.equal(fake.requests.length, 3);
  });

  test('a connection dropped before the first token is retried; the deltas are not duplicated', async () => {
    reset();
    fake.setHandler((ex) => {
      if (ex.index === 0) {
        ex.sse.role();
        setImmediate(() => ex.cut());
        return;
      }
      return streamReply(ex, { tokens: numberedTokens(4) });
    });
    const out = await collect(openai(fake.baseUrl, { maxRetries: 1 }));
    assert.deepEqual(out.chunks, numberedTokens(4));
    assert.equal(out.result?.finishReason, 'stop');
    assert.equal(fake.requests.length, 2);
  });

  test('a stream that stalls before the first token is upstream_timeout, and the upstream request is closed', async () => {
    reset();
    fake.setHandler(async (ex) => {
      ex.sse.role();
      await ex.clientClosed;
    });
    const closed = fake.nextClientAbort();
    const out = await collect(openai(fake.baseUrl, { firstTokenTimeoutMs: 300, maxRetries: 2 }));
    assert.deepEqual(out.chunks, []);
    assertAppError(out.error, 'upstream_timeout', 'the upstream sent no token within 300 ms');
    await closed;
    // The first-token deadline spans the retries: a stalled upstream is not asked again.
    assert.equal(fake.requests.length, 1);
  });

  test('an upstream that never sends its response headers is upstream_timeout too', async () => {
    reset();
    fake.setHandler((ex) => ex.clientClosed);
    const out = await collect(openai(fake.baseUrl, { firstTokenTimeoutMs: 300 }));
    assertAppError(out.error, 'upstream_timeout', 'the upstream sent no token within 300 ms');
  });

  test('a stream that stalls mid-way is upstream_timeout after the deltas so far', async () => {
    reset();
    fake.setHandler(async (ex) => {
      ex.sse.role();
      ex.sse.content('Plumber');
      ex.sse.content(' booked');
      await ex.clientClosed;
    });
    const closed = fake.nextClientAbort();
    const out = await collect(openai(fake.baseUrl, { idleTimeoutMs: 300, maxRetries: 2 }));
    assert.deepEqual(out.chunks, ['Plumber', ' booked']);
    assertAppError(out.error, 'upstream_timeout', 'the upstream stream stalled for 300 ms');
    await closed;
    assert.equal(fake.requests.length, 1);
  });

  test('a connection dropped mid-stream is upstream_error and never retried after a delta', async () => {
    reset();
    fake.setHandler((ex) => {
      ex.sse.role();
      ex.sse.content('Half');
      ex.sse.content(' a');
      setTimeout(() => ex.cut(), 20);
    });
    const out = await collect(openai(fake.baseUrl, { maxRetries: 2 }));
    assert.deepEqual(out.chunks, ['Half', ' a']);
    assertAppError(out.error, 'upstream_error', 'the upstream connection dropped mid-stream');
    assert.equal(fake.requests.length, 1);
  });

  test('a stream that ends cleanly without finishing (no finish_reason, no [DONE]) is upstream_error', async () => {
    reset();
    fake.setHandler((ex) => {
      ex.sse.role();
      ex.sse.content('Cut');
      ex.res.end();
    });
    const out = await collect(openai(fake.baseUrl));
    assert.deepEqual(out.chunks, ['Cut']);
    assertAppError(out.error, 'upstream_error', 'the upstream stream ended before the reply was finished');
  });

  test('[DONE] ends the reply though the upstream holds the response open after it; that connection is then closed', async () => {
    reset();
    fake.setHandler(async (ex) => {
      ex.sse.role();
      ex.sse.content('hello');
      ex.sse.finish('stop');
      ex.sse.usage(4, 1);
      ex.sse.raw('data: [DONE]\n\n');
      // Held open, with a keep-alive comment and a late chunk that must not count.
      ex.sse.raw(': ping\n\n');
      ex.sse.content(' late');
      await ex.clientClosed;
    });
    const closed = fake.nextClientAbort();
    // Before, such a reply waited for the body's end and became an idle timeout.
    const out = await collect(openai(fake.baseUrl, { idleTimeoutMs: 400, drainAfterDoneMs: 100 }));
    assert.equal(out.error, undefined);
    assert.deepEqual(out.chunks, ['hello']);
    assert.deepEqual(out.result, { finishReason: 'stop', usage: { promptTokens: 4, completionTokens: 1 }, usageSource: 'reported' });
    await closed;
  });

  test('a body that ends soon after [DONE] is drained, and its connection serves the next call', async () => {
    reset();
    const ports: Array<number | undefined> = [];
    fake.setHandler(async (ex) => {
      ports.push(ex.res.socket?.remotePort);
      ex.sse.content(`reply ${ex.index}`);
      ex.sse.finish('stop');
      ex.sse.raw('data: [DONE]\n\n');
      await sleep(30);
      ex.res.end();
    });
    const provider = openai(fake.baseUrl, { drainAfterDoneMs: 2000 });
    const aborted = fake.abortedByClient;
    const first = await collect(provider);
    assert.deepEqual(first.chunks, ['reply 0']);
    // The first body ends 30 ms after [DONE]; the next call starts once the connection is free again.
    await sleep(100);
    const second = await collect(provider);
    assert.deepEqual(second.chunks, ['reply 1']);
    assert.equal(first.error ?? second.error, undefined);
    // Both calls on one connection (counted by the requests' own sockets: another test's closed connections do not count).
    assert.equal(ports.length, 2);
    assert.equal(new Set(ports).size, 1, `one connection for both calls, got remote ports ${ports.join(', ')}`);
    assert.equal(fake.abortedByClient, aborted);
  });

  test('[DONE] without a finish_reason ends the reply as stop, its usage counted', async () => {
    reset();
    fake.setHandler((ex) => {
      ex.sse.role();
      ex.sse.content('Hi');
      ex.sse.done();
    });
    const out = await collect(openai(fake.baseUrl));
    assert.equal(out.error, undefined);
    assert.deepEqual(out.chunks, ['Hi']);
    assert.equal(out.result?.finishReason, 'stop');
    assert.equal(out.result?.usageSource, 'counted');
  });

  test('malformed SSE data is upstream_error', async () => {
    reset();
    fake.setHandler((ex) => {
      ex.sse.role();
      ex.sse.raw('data: {"id":"chatcmpl-fake","choices":[{"index":0,"delta":{"content":"x"\n\n');
      ex.sse.done();
    });
    const out = await collect(openai(fake.baseUrl, { maxRetries: 2 }));
    assertAppError(out.error, 'upstream_error', 'the upstream sent malformed stream data (an SSE event that is not JSON)');
    assert.equal(fake.requests.length, 1);
  });

  test('an error event inside the stream is upstream_error', async () => {
    reset();
    fake.setHandler((ex) => {
      ex.sse.role();
      ex.sse.content('Hi');
      ex.sse.event(JSON.stringify({ error: { message: 'model crashed', type: 'server_error', param: null, code: null } }));
      ex.sse.done();
    });
    const out = await collect(openai(fake.baseUrl));
    assert.deepEqual(out.chunks, ['Hi']);
    assertAppError(out.error, 'upstream_error', 'the upstream reported an error in the stream');
  });

  test('cancel aborts the upstream HTTP request and returns the counted usage so far', async () => {
    reset();
    fake.setHandler((ex) => streamReply(ex, { tokens: numberedTokens(200), intervalMs: 20 }));
    const closed = fake.nextClientAbort();
    const controller = new AbortController();
    const out = await collect(openai(fake.baseUrl), { ...request, maxTokens: 200 }, controller.signal, (text) => {
      if (text === ' w2') controller.abort();
    });
    await closed;
    assert.deepEqual(out.chunks, ['w0', ' w1', ' w2']);
    assert.deepEqual(out.result, {
      finishReason: 'stop',
      usage: { promptTokens: promptCount, completionTokens: 3 },
      usageSource: 'counted',
    });
    assert.equal(fake.abortedByClient >= 1, true);
  });

  test('a server that wants max_completion_tokens gets it from then on', async () => {
    reset();
    fake.setHandler((ex) => {
      if (ex.req.body && 'max_tokens' in ex.req.body) {
        replyError(ex.res, 400, {
          error: {
            message: "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
            type: 'invalid_request_error',
            param: 'max_tokens',
            code: 'unsupported_parameter',
          },
        });
        return;
      }
      return streamReply(ex, { tokens: ['ok'], usage: { promptTokens: 1, completionTokens: 1 } });
    });
    const provider = openai(fake.baseUrl);
    const first = await collect(provider);
    assert.deepEqual(first.chunks, ['ok']);
    const second = await collect(provider);
    assert.deepEqual(second.chunks, ['ok']);
    assert.deepEqual(
      fake.requests.map((r) => ('max_tokens' in (r.body ?? {}) ? 'max_tokens' : r.body?.max_completion_tokens)),
      ['max_tokens', 5, 5],
    );
  });

  test('a server that refuses stream_options is asked without it, and its usage is counted', async () => {
    reset();
    fake.setHandler((ex) => {
      if (ex.req.body && 'stream_options' in ex.req.body) {
        replyError(ex.res, 400, {
          error: { message: 'Unrecognized request argument supplied: stream_options', type: 'invalid_request_error', param: null, code: null },
        });
        return;
      }
      return streamReply(ex, { tokens: ['Booked', '.'], usage: false });
    });
    const provider = openai(fake.baseUrl);
    const first = await collect(provider);
    assert.deepEqual(first.chunks, ['Booked', '.']);
    assert.equal(first.result?.usageSource, 'counted');
    await collect(provider);
    assert.deepEqual(
      fake.requests.map((r) => 'stream_options' in (r.body ?? {})),
      [true, false, false],
    );
  });

  test('check() resolves against a reachable upstream', async () => {
    await openai(fake.baseUrl).check?.();
  });

  test('check() rejects with the reason when the upstream cannot be reached', async () => {
    const base = await refusedBaseUrl();
    await assert.rejects(openai(base).check?.() ?? Promise.resolve(), { message: `cannot reach the upstream at ${base} (ECONNREFUSED)` });
  });

  test('check() treats a server without /models (404) as reachable, and a refused key (401) as not ready', async () => {
    const noModels = await startFakeOpenAI({ models: 404 });
    const badKey = await startFakeOpenAI({ models: 401 });
    try {
      await openai(noModels.baseUrl).check?.();
      await assert.rejects(openai(badKey.baseUrl).check?.() ?? Promise.resolve(), {
        message: `the upstream at ${badKey.baseUrl} refused the API key (HTTP 401)`,
      });
    } finally {
      await noModels.close();
      await badKey.close();
    }
  });

  test('check() against an upstream that never answers rejects as a timeout, not as an unreachable upstream', async () => {
    const silent = http.createServer(() => {});
    await new Promise<void>((resolve) => silent.listen(0, '127.0.0.1', resolve));
    const base = `http://127.0.0.1:${(silent.address() as AddressInfo).port}/v1`;
    try {
      await assert.rejects(openai(base, { checkTimeoutMs: 200 }).check?.() ?? Promise.resolve(), {
        message: `the upstream at ${base} did not answer within 200 ms`,
      });
    } finally {
      silent.closeAllConnections();
      await new Promise<void>((resolve) => silent.close(() => resolve()));
    }
  });
});

interface PoolOutcome {
  chunks: string[];
  result?: ModelResult | null;
  cancelled?: boolean;
  error?: AppError;
}

describe('openai provider through the worker pool', () => {
  let fake: FakeOpenAI;
  let pool: ModelPool;
  before(async () => {
    fake = await startFakeOpenAI();
    const config = loadConfig(
      {},
      {
        llm: 'openai',
        model: 'fake-1',
        openaiBaseUrl: fake.baseUrl,
        openaiApiKey: 'sk-pool',
        upstreamFirstTokenTimeoutMs: 10_000,
        upstreamIdleTimeoutMs: 10_000,
        upstreamMaxRetries: 0,
      },
    );
    pool = createModelPool({ settings: providerSettingsFrom(config), threads: 2, tasksPerWorker: 32, maxQueue: 256, taskTimeoutMs: 60_000 });
  });
  after(async () => {
    await pool.close();
    await fake.close();
  });

  function run(req: ModelRequest, onChunk?: (text: string, cancel: () => void) => void): Promise<PoolOutcome> {
    return new Promise((resolve) => {
      const slot = pool.reserve('test');
      assert.ok(slot, 'the pool refused a slot');
      const chunks: string[] = [];
      const handle = slot.run(req, {
        onChunk(text) {
          chunks.push(text);
          onChunk?.(text, () => handle.cancel());
        },
        onEnd(result, cancelled) {
          resolve({ chunks, result, cancelled });
        },
        onError(error) {
          resolve({ chunks, error });
        },
      });
    });
  }

  test('chunks and the end with its usage cross the worker boundary', async () => {
    fake.setHandler((ex) => streamReply(ex, { tokens: numberedTokens(5), usage: { promptTokens: 12, completionTokens: 5 } }));
    const out = await run(request);
    assert.equal(out.chunks.join(''), numberedTokens(5).join(''));
    assert.equal(out.cancelled, false);
    assert.deepEqual(out.result, { finishReason: 'stop', usage: { promptTokens: 12, completionTokens: 5 }, usageSource: 'reported' });
  });

  test('an upstream failure crosses as its AppError code, message and retryAfterMs', async () => {
    fake.setHandler((ex) => replyError(ex.res, 429, { error: { message: 'slow', type: 'requests', param: null, code: null } }, { 'retry-after': '30' }));
    const out = await run(request);
    assert.equal(out.error?.code, 'upstream_error');
    assert.equal(out.error?.message, 'the upstream is rate limiting chatwire (HTTP 429)');
    assert.equal(out.error?.retryAfterMs, 30_000);

    fake.setHandler((ex) => {
      ex.sse.role();
      ex.sse.content('part');
      setTimeout(() => ex.cut(), 20);
    });
    const cut = await run(request);
    assert.deepEqual(cut.chunks.join(''), 'part');
    assert.equal(cut.error?.code, 'upstream_error');
    assert.equal(cut.error?.message, 'the upstream connection dropped mid-stream');
  });

  test('cancel through the pool ends the run as cancelled and closes the upstream request', async () => {
    fake.setHandler((ex) => streamReply(ex, { tokens: numberedTokens(500), intervalMs: 10 }));
    const closed = fake.nextClientAbort();
    let cancelled = false;
    const out = await run({ ...request, maxTokens: 500 }, (_text, cancel) => {
      if (!cancelled) {
        cancelled = true;
        cancel();
      }
    });
    await closed;
    assert.equal(out.cancelled, true);
    assert.ok(out.chunks.length >= 1);
    const text = out.chunks.join('');
    // What arrived is a prefix of the reply, in order.
    assert.equal(numberedTokens(500).join('').startsWith(text), true);
    assert.equal(out.result?.usage.completionTokens, countTokens(text));
  });

  test('every one of many short streams ends with exactly its text: the end marker never races the last delta', async () => {
    fake.setHandler((ex) => {
      const n = Number((ex.req.body?.messages as Array<{ content: string }> | undefined)?.at(-1)?.content);
      return streamReply(ex, { tokens: numberedTokens(n, `s${n}-`), usage: { promptTokens: 1, completionTokens: n } });
    });
    const runs = Array.from({ length: 300 }, (_, i) => 1 + (i % 17));
    const outcomes = await Promise.all(runs.map((n) => run({ model: 'fake-1', messages: [{ role: 'user', content: String(n) }] })));
    outcomes.forEach((out, i) => {
      const n = runs[i] as number;
      assert.equal(out.error, undefined);
      assert.equal(out.chunks.join(''), numberedTokens(n, `s${n}-`).join(''));
      assert.deepEqual(out.result?.usage, { promptTokens: 1, completionTokens: n });
    });
  });

  test('pool.check() resolves when the upstream is reachable', async () => {
    await pool.check(5000);
  });

  test('pool.check() rejects with the reason when the upstream is unreachable', async () => {
    const base = await refusedBaseUrl();
    const config = loadConfig({}, { llm: 'openai', openaiBaseUrl: base });
    const unreachable = createModelPool({ settings: providerSettingsFrom(config), threads: 1, tasksPerWorker: 4, maxQueue: 4, taskTimeoutMs: 10_000 });
    try {
      await assert.rejects(unreachable.check(5000), { message: `cannot reach the upstream at ${base} (ECONNREFUSED)` });
    } finally {
      await unreachable.close();
    }
  });
});
