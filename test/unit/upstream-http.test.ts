import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { createOpenAIProvider } from '../../src/llm/openai.js';
import type { ModelRequest } from '../../src/llm/provider.js';
import { createUpstreamHttp, SseParser, type SseEvent } from '../../src/llm/upstream-http.js';
import { numberedTokens, startFakeOpenAI, streamReply, type FakeOpenAI } from '../fixtures/fake-openai.js';

const request: ModelRequest = { model: 'fake-1', messages: [{ role: 'user', content: 'Is a plumber free on Monday?' }], maxTokens: 3 };

describe('upstream HTTP client and SSE reader', () => {
  let fake: FakeOpenAI;
  before(async () => {
    fake = await startFakeOpenAI();
  });
  after(async () => {
    await fake.close();
  });

  /** Sends `pieces` as an event stream, one write each with a pause between, and reads it back with SseParser. */
  async function readEvents(pieces: string[], opts: { cut?: boolean } = {}): Promise<{ events: SseEvent[]; error?: unknown }> {
    fake.setHandler(async (ex) => {
      ex.sse.open();
      for (const piece of pieces) {
        ex.sse.raw(piece);
        await sleep(5);
      }
      if (opts.cut) ex.cut();
      else ex.res.end();
    });
    const upstream = createUpstreamHttp(fake.baseUrl);
    const events: SseEvent[] = [];
    const parser = new SseParser((event, data) => events.push({ event, data }));
    try {
      return await new Promise((resolve) => {
        upstream.send(
          { method: 'POST', path: '/chat/completions', body: '{}', headers: { 'content-type': 'application/json' } },
          {
            head: (status) => assert.equal(status, 200),
            data: (chunk) => parser.write(chunk),
            end() {
              parser.end();
              resolve({ events });
            },
            error: (error) => resolve({ events, error }),
          },
        );
      });
    } finally {
      await upstream.close();
    }
  }

  test('splits events the same whether lines end in LF, CRLF or CR and wherever the body is cut into pieces', async () => {
    const expected = [
      { event: null, data: '{"a":1}' },
      { event: 'ping', data: 'two\nlines' },
      { event: null, data: '[DONE]' },
    ];
    const body = (eol: string) =>
      `: a comment${eol}data: {"a":1}${eol}${eol}event: ping${eol}data: two${eol}data:lines${eol}id: 7${eol}${eol}data: [DONE]${eol}${eol}`;
    for (const eol of ['\n', '\r\n', '\r']) {
      const text = body(eol);
      assert.deepEqual((await readEvents([text])).events, expected, `whole, ${JSON.stringify(eol)}`);
      // One character at a time: a CRLF split between two reads, a field name split in two, ...
      assert.deepEqual((await readEvents([...text])).events, expected, `byte by byte, ${JSON.stringify(eol)}`);
    }
  });

  test('an event without its closing blank line at the end of the body is dropped', async () => {
    const out = await readEvents(['data: kept\n\n', 'data: not finished\n']);
    assert.deepEqual(out.events, [{ event: null, data: 'kept' }]);
    assert.equal(out.error, undefined);
  });

  test('a connection cut mid-body is an error after the events that arrived whole', async () => {
    const out = await readEvents(['data: one\n\n', 'data: tw'], { cut: true });
    assert.deepEqual(out.events, [{ event: null, data: 'one' }]);
    assert.ok(out.error instanceof Error);
  });

  test('an error status reaches the sender with its headers and body', async () => {
    fake.setHandler((ex) => {
      ex.res.writeHead(503, { 'content-type': 'application/json' });
      ex.res.end('{"error":{"message":"busy"}}');
    });
    const upstream = createUpstreamHttp(fake.baseUrl);
    const response = await new Promise<{ status: number; type: unknown; body: string }>((resolve, reject) => {
      let status = 0;
      let type: unknown;
      let body = '';
      upstream.send(
        { method: 'POST', path: '/chat/completions', body: '{}', headers: {} },
        {
          head(s, headers) {
            status = s;
            type = headers['content-type'];
          },
          data: (chunk) => (body += chunk.toString()),
          end: () => resolve({ status, type, body }),
          error: reject,
        },
      );
    });
    await upstream.close();
    assert.equal(response.status, 503);
    assert.equal(response.type, 'application/json');
    assert.deepEqual(JSON.parse(response.body), { error: { message: 'busy' } });
  });

  test('the openai provider reuses one keep-alive connection for calls one after the other', async () => {
    const ports: Array<number | undefined> = [];
    fake.setHandler((ex) => {
      ports.push(ex.res.socket?.remotePort);
      return streamReply(ex, { tokens: numberedTokens(3) });
    });
    const provider = createOpenAIProvider({ baseUrl: fake.baseUrl, apiKey: undefined, firstTokenTimeoutMs: 10_000, idleTimeoutMs: 10_000, maxRetries: 0 });
    for (let i = 0; i < 3; i++) {
      let text = '';
      for await (const chunk of provider.stream(request, new AbortController().signal)) text += chunk;
      assert.equal(text, numberedTokens(3).join(''));
    }
    assert.equal(ports.length, 3);
    assert.equal(new Set(ports).size, 1, `one connection for the three calls, got remote ports ${ports.join(', ')}`);
  });
});
