/** The OpenAI-compatible API, driven by the official `openai` client against a real server. */
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import OpenAI, { APIError, APIUserAbortError, AuthenticationError, BadRequestError, NotFoundError, PermissionDeniedError } from 'openai';
import type { ChatCompletionChunk, ChatCompletionCreateParamsNonStreaming } from 'openai/resources/chat/completions';
import { signToken } from '../../src/auth/sign.js';
import { startFakeOpenAI, type FakeExchange, type FakeOpenAI } from '../fixtures/fake-openai.js';
import { startServer, type TestServer } from '../helpers/server.js';

type Task = { taskId: string; conversationId: string; status: string; text: string };

function clientFor(server: TestServer, options: ConstructorParameters<typeof OpenAI>[0] = {}): OpenAI {
  return new OpenAI({ baseURL: `${server.http}/v1`, apiKey: 'open-mode', maxRetries: 0, ...options });
}

async function getTask(server: TestServer, taskId: string, auth: { user?: string; token?: string }): Promise<Task> {
  const query = auth.user === undefined ? '' : `?user=${auth.user}`;
  const res = await fetch(`${server.http}/v1/tasks/${taskId}${query}`, { headers: auth.token ? { authorization: `Bearer ${auth.token}` } : {} });
  assert.equal(res.status, 200, await res.clone().text());
  return (await res.json()) as Task;
}

/** The task once it has ended (the cancel of a closed request is heard a moment after the close). */
async function endedTask(server: TestServer, taskId: string, user: string): Promise<Task> {
  for (let i = 0; i < 400; i++) {
    const task = await getTask(server, taskId, { user });
    if (task.status !== 'queued' && task.status !== 'running') return task;
    await sleep(25);
  }
  throw new Error(`task ${taskId} did not end`);
}

/** The `data:` payloads of an event stream, in order. */
function dataEvents(text: string): string[] {
  return text
    .split('\n\n')
    .map((event) => event.split('\n').find((line) => line.startsWith('data: ')))
    .filter((line): line is string => line !== undefined)
    .map((line) => line.slice('data: '.length));
}

/** Tasks ended cancelled so far, from /metrics. */
async function cancelledTasks(server: TestServer): Promise<number> {
  const text = await (await fetch(`${server.http}/metrics`)).text();
  return Number(/^chatwire_tasks_total\{outcome="cancelled"\} (\S+)$/m.exec(text)?.[1] ?? 0);
}

async function rawCompletion(server: TestServer, body: unknown, headers: Record<string, string> = {}): Promise<Response> {
  return fetch(`${server.http}/v1/chat/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
}

describe('with the dev provider', () => {
  let server: TestServer;
  let client: OpenAI;
  before(async () => {
    server = await startServer();
    client = clientFor(server);
  });
  after(() => server.close());

  test('GET /v1/models lists the model chatwire serves, with the RateLimit fields', async () => {
    const { data, response } = await client.models.list().withResponse();
    assert.deepEqual(
      data.data.map((m) => ({ id: m.id, object: m.object, owned_by: m.owned_by })),
      [{ id: 'dev-1', object: 'model', owned_by: 'chatwire' }],
    );
    assert.equal(typeof data.data[0]?.created, 'number');
    assert.match(response.headers.get('ratelimit') ?? '', /"messages";r=\d+/);
    assert.ok(response.headers.get('ratelimit-policy'));
  });

  test('a completion is a stored task: its x-request-id reads it from GET /v1/tasks/:id and streams it from the SSE route', async () => {
    const { data, response } = await client.chat.completions
      .create({ model: 'dev-1', messages: [{ role: 'user', content: 'Who can fix a leaking tap tomorrow?' }], user: 'ann' })
      .withResponse();
    assert.equal(data.object, 'chat.completion');
    assert.equal(data.model, 'dev-1');
    assert.equal(data.choices.length, 1);
    const choice = data.choices[0];
    assert.equal(choice?.index, 0);
    assert.equal(choice?.message.role, 'assistant');
    assert.equal(choice?.finish_reason, 'stop');
    const content = choice?.message.content ?? '';
    assert.equal(content.split(' ').length, 32);
    assert.equal(data.usage?.completion_tokens, 32);
    assert.equal(data.usage?.total_tokens, (data.usage?.prompt_tokens ?? 0) + 32);

    const taskId = response.headers.get('x-request-id') as string;
    assert.match(taskId, /^task_/);
    assert.equal(data.id, `chatcmpl-${taskId}`);
    const task = await getTask(server, taskId, { user: 'ann' });
    assert.equal(task.status, 'done');
    assert.equal(task.text, content);
    assert.equal(task.conversationId, response.headers.get('x-chatwire-conversation-id'));
    assert.match(response.headers.get('ratelimit') ?? '', /"chats";r=\d+/);

    const stream = await fetch(`${server.http}/v1/tasks/${taskId}/stream?user=ann`);
    const events = await stream.text();
    const deltas = dataEvents(events)
      .map((d) => JSON.parse(d) as { type: string; text?: string })
      .filter((m) => m.type === 'chat.delta');
    assert.equal(deltas.map((d) => d.text).join(''), content);
    assert.match(events, /event: done/);

    // Another user cannot read it.
    assert.equal((await fetch(`${server.http}/v1/tasks/${taskId}?user=bob`)).status, 403);
  });

  test('a stream: one chunk per delta with one id, the role on the first, the finish reason last, then [DONE]', async () => {
    const res = await rawCompletion(server, {
      model: 'dev-1',
      messages: [{ role: 'user', content: 'Quote for painting a fence?' }],
      stream: true,
      user: 'cat',
    });
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') ?? '', /^text\/event-stream/);
    assert.equal(res.headers.get('cache-status'), 'chatwire; fwd=miss');
    const data = dataEvents(await res.text());
    assert.equal(data.at(-1), '[DONE]');
    const chunks = data.slice(0, -1).map((d) => JSON.parse(d) as ChatCompletionChunk);
    const taskId = res.headers.get('x-request-id') as string;
    assert.ok(chunks.length >= 2);
    for (const c of chunks) {
      assert.equal(c.id, `chatcmpl-${taskId}`);
      assert.equal(c.object, 'chat.completion.chunk');
      assert.equal(c.model, 'dev-1');
      assert.equal('usage' in c, false, 'no usage without stream_options.include_usage');
    }
    assert.equal(chunks[0]?.choices[0]?.delta.role, 'assistant');
    assert.ok(chunks.slice(1).every((c) => c.choices[0]?.delta.role === undefined));
    assert.ok(chunks.slice(0, -1).every((c) => c.choices[0]?.finish_reason === null));
    assert.deepEqual(chunks.at(-1)?.choices, [{ index: 0, delta: {}, finish_reason: 'stop' }]);
    const text = chunks.map((c) => c.choices[0]?.delta.content ?? '').join('');
    assert.equal(text, (await getTask(server, taskId, { user: 'cat' })).text);
  });

  test('with stream_options.include_usage every chunk has usage null and one more chunk with no choices carries it', async () => {
    const stream = await client.chat.completions.create({
      model: 'dev-1',
      messages: [{ role: 'user', content: 'How much is a roof inspection?' }],
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: 12,
      user: 'dan',
    });
    const chunks: ChatCompletionChunk[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    const last = chunks.at(-1) as ChatCompletionChunk;
    assert.deepEqual(last.choices, []);
    assert.equal(last.usage?.completion_tokens, 12);
    assert.equal(last.usage?.total_tokens, (last.usage?.prompt_tokens ?? 0) + 12);
    assert.ok(last.usage?.prompt_tokens !== undefined && last.usage.prompt_tokens > 0);
    const rest = chunks.slice(0, -1);
    assert.ok(rest.every((c) => c.usage === null));
    assert.equal(rest.at(-1)?.choices[0]?.finish_reason, 'length');
    assert.equal(
      rest
        .map((c) => c.choices[0]?.delta.content ?? '')
        .join('')
        .split(' ').length,
      12,
    );
  });

  test('a repeated completion is a cache hit (Cache-Status), with the same reply, streamed or not', async () => {
    const body = {
      model: 'dev-1',
      messages: [
        { role: 'system' as const, content: 'Be brief.' },
        { role: 'user' as const, content: 'Can you move a piano?' },
      ],
      user: 'eve',
    };
    const first = await client.chat.completions.create(body).withResponse();
    assert.equal(first.response.headers.get('cache-status'), 'chatwire; fwd=miss');
    const second = await client.chat.completions.create(body).withResponse();
    assert.equal(second.response.headers.get('cache-status'), 'chatwire; hit');
    assert.equal(second.data.choices[0]?.message.content, first.data.choices[0]?.message.content);
    assert.notEqual(second.response.headers.get('x-request-id'), first.response.headers.get('x-request-id'));

    const streamed = await client.chat.completions.create({ ...body, stream: true }).withResponse();
    assert.equal(streamed.response.headers.get('cache-status'), 'chatwire; hit');
    let text = '';
    for await (const chunk of streamed.data) text += chunk.choices[0]?.delta.content ?? '';
    assert.equal(text, first.data.choices[0]?.message.content);

    // x-chatwire-cache works as `cache` on chat.send.
    const bypass = await client.chat.completions.create(body, { headers: { 'x-chatwire-cache': 'bypass' } }).withResponse();
    assert.equal(bypass.response.headers.get('cache-status'), 'chatwire; fwd=miss');
    assert.equal(bypass.data.choices[0]?.message.content, first.data.choices[0]?.message.content);
  });

  test('the cache key is the same as for chat.send with the same messages and params', async () => {
    // POST /v1/chat in a new conversation, then a second chat in it: its context is the first exchange.
    const send = async (body: object) => {
      const res = await fetch(`${server.http}/v1/chat?user=fay`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      assert.equal(res.status, 202);
      const ack = (await res.json()) as { taskId: string; conversationId: string };
      return { ack, task: await endedTask(server, ack.taskId, 'fay') };
    };
    const one = await send({ text: 'Is a deposit needed?', params: { system: 'Answer as a plumber.', temperature: 0.3, maxTokens: 20 } });
    const two = await send({
      text: 'And for a weekend visit?',
      conversationId: one.ack.conversationId,
      params: { system: 'Answer as a plumber.', temperature: 0.3, maxTokens: 20 },
    });

    const { data, response } = await client.chat.completions
      .create({
        model: 'dev-1',
        messages: [
          { role: 'developer', content: 'Answer as a plumber.' },
          { role: 'user', content: 'Is a deposit needed?' },
          { role: 'assistant', content: one.task.text },
          { role: 'user', content: [{ type: 'text', text: 'And for a weekend visit?' }] },
        ],
        temperature: 0.3,
        max_completion_tokens: 20,
        user: 'fay',
      })
      .withResponse();
    assert.equal(response.headers.get('cache-status'), 'chatwire; hit');
    assert.equal(data.choices[0]?.message.content, two.task.text);
    assert.equal(data.choices[0]?.finish_reason, 'length');
  });

  test('x-chatwire-conversation-id appends to the caller conversation; the messages of the request are the whole context', async () => {
    const messages = [{ role: 'user' as const, content: 'Do you clean windows?' }];
    const first = await client.chat.completions.create({ model: 'dev-1', messages, user: 'gus' }).withResponse();
    const conversationId = first.response.headers.get('x-chatwire-conversation-id') as string;
    assert.match(conversationId, /^conv_/);
    const second = await client.chat.completions
      .create({ model: 'dev-1', messages, user: 'gus' }, { headers: { 'x-chatwire-conversation-id': conversationId } })
      .withResponse();
    assert.equal(second.response.headers.get('x-chatwire-conversation-id'), conversationId);
    // Had the stored history been added, the context would differ and miss the cache.
    assert.equal(second.response.headers.get('cache-status'), 'chatwire; hit');
    const history = await fetch(`${server.http}/v1/conversations/${conversationId}/messages?user=gus`);
    const page = (await history.json()) as { messages: { role: string; text: string }[] };
    const reply = first.data.choices[0]?.message.content as string;
    assert.deepEqual(
      page.messages.map((m) => [m.role, m.text]),
      [
        ['user', 'Do you clean windows?'],
        ['assistant', reply],
        ['user', 'Do you clean windows?'],
        ['assistant', reply],
      ],
    );

    await assert.rejects(
      client.chat.completions.create({ model: 'dev-1', messages, user: 'hal' }, { headers: { 'x-chatwire-conversation-id': conversationId } }),
      (err: unknown) => err instanceof PermissionDeniedError && err.code === 'forbidden' && err.type === 'permission_error',
    );
    await assert.rejects(
      client.chat.completions.create({ model: 'dev-1', messages, user: 'gus' }, { headers: { 'x-chatwire-conversation-id': 'conv_nope' } }),
      (err: unknown) => err instanceof NotFoundError && err.code === 'not_found',
    );
  });

  test('unsupported fields and bad values are a 400 naming the field', async () => {
    const ok = { model: 'dev-1', messages: [{ role: 'user', content: 'hi' }] };
    const cases: [Record<string, unknown>, string][] = [
      [{ ...ok, n: 2 }, 'n'],
      [{ ...ok, tools: [{ type: 'function', function: { name: 'f' } }] }, 'tools'],
      [{ ...ok, tool_choice: 'auto' }, 'tool_choice'],
      [{ ...ok, functions: [{ name: 'f' }] }, 'functions'],
      [{ ...ok, audio: { voice: 'alloy', format: 'mp3' } }, 'audio'],
      [{ ...ok, response_format: { type: 'json_object' } }, 'response_format.type'],
      [
        {
          ...ok,
          messages: [
            {
              role: 'user',
              content: [
                { type: 'text', text: 'a' },
                { type: 'image_url', image_url: { url: 'x' } },
              ],
            },
          ],
        },
        'messages.0.content.1.type',
      ],
      [{ ...ok, messages: [{ role: 'tool', content: 'x', tool_call_id: 't' }] }, 'messages.0.role'],
      [{ ...ok, messages: [...ok.messages, { role: 'assistant', content: 'x' }] }, 'messages.1.role'],
      [{ ...ok, messages: [] }, 'messages'],
      [{ ...ok, max_tokens: 5000 }, 'max_tokens'],
      [{ ...ok, temperature: 3 }, 'temperature'],
      [{ ...ok, model: 7 }, 'model'],
    ];
    for (const [body, param] of cases) {
      await assert.rejects(client.chat.completions.create(body as unknown as ChatCompletionCreateParamsNonStreaming), (err: unknown) => {
        assert.ok(err instanceof BadRequestError, `${param}: ${String(err)}`);
        assert.equal(err.param, param);
        assert.equal(err.code, 'bad_request');
        assert.equal(err.type, 'invalid_request_error');
        assert.ok(err.message.includes(param), err.message);
        return true;
      });
    }
    // Null is a field left out, and fields chatwire does not know are ignored.
    const fine = await client.chat.completions.create({
      ...ok,
      n: null,
      tools: null,
      seed: 3,
      top_p: 0.5,
      metadata: { a: 'b' },
    } as unknown as ChatCompletionCreateParamsNonStreaming);
    assert.equal(fine.choices[0]?.finish_reason, 'stop');

    const header = await rawCompletion(server, ok, { 'x-chatwire-cache': 'sometimes' });
    assert.equal(header.status, 400);
    assert.deepEqual(((await header.json()) as { error: { param: string } }).error.param, 'x-chatwire-cache');
  });

  test('an unknown model is a 404 model_not_found', async () => {
    await assert.rejects(client.chat.completions.create({ model: 'gpt-4o', messages: [{ role: 'user', content: 'hi' }] }), (err: unknown) => {
      assert.ok(err instanceof NotFoundError);
      assert.equal(err.code, 'model_not_found');
      assert.equal(err.param, 'model');
      assert.equal(err.type, 'invalid_request_error');
      return true;
    });
  });

  test('a body over the limit is a 413 in the OpenAI error shape', async () => {
    const res = await rawCompletion(server, { model: 'dev-1', messages: [{ role: 'user', content: 'x'.repeat(server.config.maxFrameBytes) }] });
    assert.equal(res.status, 413);
    const body = (await res.json()) as { error: Record<string, unknown> };
    assert.deepEqual(Object.keys(body.error).sort(), ['code', 'message', 'param', 'type']);
    assert.equal(body.error.code, 'payload_too_large');
    assert.equal(body.error.type, 'invalid_request_error');
    assert.equal(body.error.param, null);
  });
});

test('a 429 carries Retry-After and retry-after-ms, and the client retries after it and succeeds', async (t) => {
  const server = await startServer({ messagesPerSecond: 1 });
  t.after(() => server.close());
  const attempts: { sentAt: number; receivedAt: number; status: number; retryAfterMs: string | null; retryAfter: string | null; body: string }[] = [];
  const client = clientFor(server, {
    maxRetries: 3,
    fetch: async (url, init) => {
      const sentAt = performance.now();
      const res = await fetch(url, init);
      const body = res.status === 429 ? await res.clone().text() : '';
      attempts.push({
        sentAt,
        receivedAt: performance.now(),
        status: res.status,
        retryAfterMs: res.headers.get('retry-after-ms'),
        retryAfter: res.headers.get('retry-after'),
        body,
      });
      return res;
    },
  });
  // The user's one request of this second (the `user` field is who the completion is for, in open mode).
  assert.equal((await fetch(`${server.http}/v1/models?user=ivy`)).status, 200);
  const completion = await client.chat.completions.create({ model: 'dev-1', messages: [{ role: 'user', content: 'Any slot on Friday?' }], user: 'ivy' });
  assert.equal(completion.choices[0]?.finish_reason, 'stop');

  assert.equal(attempts.at(-1)?.status, 200);
  const refused = attempts.slice(0, -1);
  assert.ok(refused.length >= 1);
  for (const [i, a] of refused.entries()) {
    assert.equal(a.status, 429);
    assert.match(a.retryAfterMs ?? '', /^[1-9][0-9]*$/);
    assert.equal(a.retryAfter, '1');
    const error = (JSON.parse(a.body) as { error: { type: string; code: string; param: unknown } }).error;
    assert.deepEqual([error.type, error.code, error.param], ['rate_limit_error', 'rate_limited', null]);
    // The retry was not sent before the time the 429 named.
    const next = attempts[i + 1] as (typeof attempts)[number];
    assert.ok(next.sentAt - a.receivedAt >= Number(a.retryAfterMs) - 1, `retried after ${next.sentAt - a.receivedAt} ms, told ${a.retryAfterMs}`);
  }
});

test('with tokens required: a bad token is a 401 authentication_error; the token, not the user field, names the caller', async (t) => {
  const secret = 'openai-api-test-secret-0123456789-abcdef';
  const server = await startServer({ jwtSecret: secret });
  t.after(() => server.close());
  await assert.rejects(
    clientFor(server, { apiKey: 'not-a-token' }).chat.completions.create({ model: 'dev-1', messages: [{ role: 'user', content: 'hi' }] }),
    (err: unknown) => {
      assert.ok(err instanceof AuthenticationError);
      assert.equal(err.code, 'unauthorized');
      assert.equal(err.type, 'authentication_error');
      assert.equal(err.headers?.get('www-authenticate'), 'Bearer');
      return true;
    },
  );
  await assert.rejects(clientFor(server, { apiKey: 'not-a-token' }).models.list(), (err: unknown) => err instanceof AuthenticationError);

  const token = await signToken({ secret, sub: 'jon' });
  const { response } = await clientFor(server, { apiKey: token })
    .chat.completions.create({ model: 'dev-1', messages: [{ role: 'user', content: 'hi' }], user: 'mallory' })
    .withResponse();
  const task = await getTask(server, response.headers.get('x-request-id') as string, { token });
  assert.equal(task.status, 'done');
});

describe('with an OpenAI-compatible upstream', () => {
  let fake: FakeOpenAI;
  let server: TestServer;
  let client: OpenAI;
  /** Released by a test: the upstream sends the rest of the reply. */
  let release: () => void = () => {};
  /** The upstream's reply: `first`, then, once released, ` second` and the end. */
  const gated = async (ex: FakeExchange) => {
    const gate = new Promise<void>((resolve) => (release = resolve));
    ex.sse.role();
    ex.sse.content('first');
    await Promise.race([gate, ex.clientClosed]);
    if (ex.gone) return;
    ex.sse.content(' second');
    ex.sse.finish('stop');
    ex.sse.usage(5, 2);
    ex.sse.done();
  };
  before(async () => {
    fake = await startFakeOpenAI();
    server = await startServer({ llm: 'openai', openaiBaseUrl: fake.baseUrl, model: 'fake-1', upstreamMaxRetries: 0 });
    client = clientFor(server);
  });
  after(async () => {
    await server.close();
    await fake.close();
  });

  /** A streamed completion whose first chunk has arrived. */
  async function started(content: string, user: string, signal?: AbortSignal) {
    const { data, response } = await client.chat.completions
      .create({ model: 'fake-1', messages: [{ role: 'user', content }], temperature: 0, stream: true, user }, signal ? { signal } : {})
      .withResponse();
    const chunks = data[Symbol.asyncIterator]();
    const first = await chunks.next();
    assert.equal((first.value as ChatCompletionChunk).choices[0]?.delta.content, 'first');
    const rest = async () => {
      let text = 'first';
      for (let c = await chunks.next(); !c.done; c = await chunks.next()) text += c.value.choices[0]?.delta.content ?? '';
      return text;
    };
    return { taskId: response.headers.get('x-request-id') as string, cacheStatus: response.headers.get('cache-status'), rest };
  }

  test('an identical completion while one is in flight joins its model call: Cache-Status collapsed', async () => {
    fake.setHandler(gated);
    const calls = fake.requests.length;
    const a = await started('Who paints fences?', 'kim');
    const b = await started('Who paints fences?', 'lee');
    assert.equal(a.cacheStatus, 'chatwire; fwd=miss');
    assert.equal(b.cacheStatus, 'chatwire; fwd=miss; collapsed');
    release();
    assert.equal(await a.rest(), 'first second');
    assert.equal(await b.rest(), 'first second');
    assert.equal(fake.requests.length, calls + 1);
  });

  test('a client that closes its stream cancels its task, and the model call with it', async () => {
    fake.setHandler(gated);
    const abort = new AbortController();
    const closed = fake.nextClientAbort();
    const a = await started('Can you fix a door today?', 'max', abort.signal);
    abort.abort();
    // The official client ends the iteration of an aborted stream quietly.
    await a.rest();
    await closed;
    const task = await endedTask(server, a.taskId, 'max');
    assert.equal(task.status, 'cancelled');
    assert.equal(task.text, 'first');
  });

  test('a client that closes a stream whose model call is shared cancels its own task; the call goes on for the other', async () => {
    fake.setHandler(gated);
    const aborts = fake.abortedByClient;
    const abort = new AbortController();
    const a = await started('Is the kitchen tiled?', 'ned', abort.signal);
    const b = await started('Is the kitchen tiled?', 'oli');
    assert.equal(b.cacheStatus, 'chatwire; fwd=miss; collapsed');
    abort.abort();
    await a.rest();
    assert.equal((await endedTask(server, a.taskId, 'ned')).status, 'cancelled');
    release();
    assert.equal(await b.rest(), 'first second');
    assert.equal((await endedTask(server, b.taskId, 'oli')).status, 'done');
    assert.equal(fake.abortedByClient, aborts);
  });

  test('a non-streaming request closed before its reply cancels its task, and the model call with it', async () => {
    fake.setHandler(gated);
    const calls = fake.requests.length;
    const cancelledBefore = await cancelledTasks(server);
    const abort = new AbortController();
    const closed = fake.nextClientAbort();
    const pending = client.chat.completions.create(
      { model: 'fake-1', messages: [{ role: 'user', content: 'Fix my gate?' }], user: 'pat' },
      { signal: abort.signal },
    );
    // The request waits for the whole reply while the upstream has the call (and has sent its first token).
    while (fake.requests.length === calls) await sleep(10);
    abort.abort();
    await assert.rejects(pending, (err: unknown) => err instanceof APIUserAbortError);
    await closed;
    for (let i = 0; i < 400 && (await cancelledTasks(server)) === cancelledBefore; i++) await sleep(25);
    assert.equal(await cancelledTasks(server), cancelledBefore + 1);
  });

  test('a failure after the stream started is one error event, without [DONE]', async () => {
    fake.setHandler(async (ex) => {
      ex.sse.role();
      ex.sse.content('half');
      ex.sse.content(' a reply');
      // Dropped once what it wrote has left it (a socket destroyed at once would discard unflushed writes).
      await new Promise((resolve) => ex.res.write(': flushed\n\n', resolve));
      ex.cut();
    });
    const res = await rawCompletion(server, { model: 'fake-1', messages: [{ role: 'user', content: 'Quote for a roof?' }], stream: true, user: 'quin' });
    assert.equal(res.status, 200);
    const data = dataEvents(await res.text());
    assert.ok(!data.includes('[DONE]'));
    const chunks = data.slice(0, -1).map((d) => JSON.parse(d) as ChatCompletionChunk);
    assert.equal(chunks.map((c) => c.choices[0]?.delta.content).join(''), 'half a reply');
    const error = JSON.parse(data.at(-1) as string) as { error: Record<string, unknown> };
    assert.deepEqual(Object.keys(error), ['error']);
    assert.equal(error.error.code, 'upstream_error');
    assert.equal(error.error.type, 'server_error');
    assert.equal(error.error.param, null);
    assert.equal(typeof error.error.message, 'string');
    assert.equal((await endedTask(server, res.headers.get('x-request-id') as string, 'quin')).status, 'error');

    // The official client raises it as an APIError with chatwire's code.
    const stream = await client.chat.completions.create({ model: 'fake-1', messages: [{ role: 'user', content: 'Quote for a shed?' }], stream: true });
    await assert.rejects(
      (async () => {
        for await (const _ of stream) {
          // Read to the failure.
        }
      })(),
      (err: unknown) => err instanceof APIError && err.code === 'upstream_error',
    );
  });

  test('a failure before the reply of a non-streaming completion is its status with the OpenAI error body', async () => {
    fake.setHandler((ex) => ex.cut());
    const res = await rawCompletion(server, { model: 'fake-1', messages: [{ role: 'user', content: 'Anyone for a boiler?' }], user: 'rae' });
    assert.equal(res.status, 502);
    assert.equal(res.headers.get('x-should-retry'), 'true');
    const { error } = (await res.json()) as { error: Record<string, unknown> };
    assert.deepEqual({ ...error, message: typeof error.message }, { message: 'string', type: 'server_error', param: null, code: 'upstream_error' });
    const taskId = res.headers.get('x-request-id') as string;
    assert.equal((await endedTask(server, taskId, 'rae')).status, 'error');
  });
});
