/**
 * The AI SDK chat stream (/api/chat) driven by the AI SDK's own client: the `ai` package's DefaultChatTransport
 * (what `useChat` sends requests with) and readUIMessageStream (how it builds the message from the stream).
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { DefaultChatTransport, readUIMessageStream, type UIMessage, type UIMessageChunk } from 'ai';
import fc from 'fast-check';
import { signToken } from '../../src/auth/sign.js';
import { startServer, type TestServer } from '../helpers/server.js';

type Json = Record<string, unknown>;

let nextId = 0;
function userMessage(text: string): UIMessage {
  return { id: `u${++nextId}`, role: 'user', parts: [{ type: 'text', text }] };
}

/** The transport a `useChat` of `user` would use, recording the responses it got. */
function transportOf(server: TestServer, user: string, responses: Response[] = []): DefaultChatTransport<UIMessage> {
  return new DefaultChatTransport<UIMessage>({
    api: `${server.http}/api/chat?user=${encodeURIComponent(user)}`,
    fetch: async (input, init) => {
      const res = await fetch(input, init);
      responses.push(res);
      return res;
    },
  });
}

function submit(transport: DefaultChatTransport<UIMessage>, chatId: string, messages: UIMessage[], abortSignal?: AbortSignal) {
  return transport.sendMessages({ trigger: 'submit-message', chatId, messageId: undefined, messages, abortSignal });
}

async function chunksOf(stream: ReadableStream<UIMessageChunk>): Promise<UIMessageChunk[]> {
  const out: UIMessageChunk[] = [];
  for await (const c of stream) out.push(c);
  return out;
}

/** The message the AI SDK builds from these chunks, and the errors it reports. */
async function messageOf(chunks: UIMessageChunk[]): Promise<{ message: UIMessage | undefined; errors: string[] }> {
  const errors: string[] = [];
  const stream = new ReadableStream<UIMessageChunk>({
    start(controller) {
      for (const c of chunks) controller.enqueue(c);
      controller.close();
    },
  });
  let message: UIMessage | undefined;
  for await (const m of readUIMessageStream({ stream, onError: (e) => errors.push(e instanceof Error ? e.message : String(e)) })) message = m;
  return { message, errors };
}

function textOf(message: UIMessage | undefined): string {
  return (message?.parts ?? []).map((p) => (p.type === 'text' ? p.text : '')).join('');
}

async function getJson(server: TestServer, path: string, user: string): Promise<{ status: number; body: Json }> {
  const res = await fetch(`${server.http}${path}${path.includes('?') ? '&' : '?'}user=${encodeURIComponent(user)}`);
  return { status: res.status, body: (await res.json()) as Json };
}

async function history(server: TestServer, chatId: string, user: string): Promise<[string, string][]> {
  const { body } = await getJson(server, `/v1/conversations/${encodeURIComponent(chatId)}/messages`, user);
  return (body.messages as { role: string; text: string }[]).map((m) => [m.role, m.text]);
}

async function taskOf(server: TestServer, taskId: string, user: string): Promise<Json> {
  return (await getJson(server, `/v1/tasks/${taskId}`, user)).body;
}

describe('the AI SDK chat stream, with the AI SDK as the client', () => {
  let server: TestServer;
  before(async () => {
    // 25 ms a token: a reply (32 tokens) streams for most of a second, long enough to cut, resume and stop it.
    server = await startServer({ devTokenDelayMs: 25, devFaults: true });
  });
  after(() => server.close());

  test('a submitted message is answered with the whole reply as one assistant message, stored in the conversation named by the chat id', async () => {
    const responses: Response[] = [];
    const transport = transportOf(server, 'ann', responses);
    const chatId = 'chat-complete';
    const question = userMessage('Can someone fix a leaking tap tomorrow?');
    const chunks = await chunksOf(await submit(transport, chatId, [question]));
    const res = responses[0] as Response;
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-type'), 'text/event-stream');
    assert.equal(res.headers.get('x-vercel-ai-ui-message-stream'), 'v1');
    const taskId = res.headers.get('x-chatwire-task-id') as string;
    assert.match(taskId, /^task_/);

    const types = chunks.map((c) => c.type);
    assert.deepEqual(types.slice(0, 2), ['start', 'text-start']);
    assert.deepEqual(types.slice(-2), ['text-end', 'finish']);
    assert.ok(types.slice(2, -2).every((t) => t === 'text-delta'));
    assert.deepEqual(chunks.at(-1), { type: 'finish', finishReason: 'stop' });

    const { message, errors } = await messageOf(chunks);
    assert.deepEqual(errors, []);
    assert.equal(message?.id, taskId);
    assert.equal(message?.role, 'assistant');
    assert.deepEqual(
      message?.parts.map((p) => p.type),
      ['text'],
    );
    const reply = textOf(message);
    assert.equal(reply.split(' ').length, 32);
    assert.deepEqual(await history(server, chatId, 'ann'), [
      ['user', 'Can someone fix a leaking tap tomorrow?'],
      ['assistant', reply],
    ]);
    const task = await taskOf(server, taskId, 'ann');
    assert.equal(task.status, 'done');
    assert.equal(task.conversationId, chatId);
    assert.equal(task.text, reply);

    // The next turn of the same chat continues the same conversation; the stored history is its context.
    const answer = message as UIMessage;
    const next = await messageOf(await chunksOf(await submit(transport, chatId, [question, answer, userMessage('And on Friday?')])));
    assert.deepEqual(await history(server, chatId, 'ann'), [
      ['user', 'Can someone fix a leaking tap tomorrow?'],
      ['assistant', reply],
      ['user', 'And on Friday?'],
      ['assistant', textOf(next.message)],
    ]);
  });

  test('a connection cut mid-stream is resumed with reconnectToStream: the whole reply, as the same message, nothing repeated', async () => {
    const transport = transportOf(server, 'ann');
    const chatId = 'chat-resume';
    const cut = new AbortController();
    const reader = (await submit(transport, chatId, [userMessage('Who can paint a fence this week?')], cut.signal)).getReader();
    const seen: UIMessageChunk[] = [];
    while (seen.filter((c) => c.type === 'text-delta').length < 3) {
      const { value, done } = await reader.read();
      assert.equal(done, false, 'the stream ended before it was cut');
      seen.push(value as UIMessageChunk);
    }
    cut.abort();
    await reader.read().catch(() => {});
    const partial = (await messageOf(seen)).message as UIMessage;

    const resumed = await transport.reconnectToStream({ chatId });
    assert.ok(resumed !== null, 'the task was still streaming: the cut did not cancel it');
    const chunks = await chunksOf(resumed);
    assert.deepEqual(chunks[0], { type: 'start', messageId: partial.id });
    assert.deepEqual(chunks.at(-1), { type: 'finish', finishReason: 'stop' });
    const { message } = await messageOf(chunks);
    // The same message id: the AI SDK replaces the cut message with this one.
    assert.equal(message?.id, partial.id);
    assert.equal(message?.parts.length, 1);
    const reply = textOf(message);
    assert.ok(reply.startsWith(textOf(partial)) && reply.length > textOf(partial).length);
    assert.equal(reply.split(' ').length, 32);
    assert.deepEqual(await history(server, chatId, 'ann'), [
      ['user', 'Who can paint a fence this week?'],
      ['assistant', reply],
    ]);
    assert.equal((await taskOf(server, partial.id, 'ann')).status, 'done');
  });

  test('/stop cancels the streaming task: the stream ends with an abort part, the task is cancelled and the text so far stored', async () => {
    const transport = transportOf(server, 'ann');
    const chatId = 'chat-stop';
    const reader = (await submit(transport, chatId, [userMessage('Book me a plumber')])).getReader();
    const chunks: UIMessageChunk[] = [];
    while (!chunks.some((c) => c.type === 'text-delta')) chunks.push((await reader.read()).value as UIMessageChunk);
    const stop = await fetch(`${server.http}/api/chat/${chatId}/stop?user=ann`, { method: 'POST' });
    assert.equal(stop.status, 204);
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      chunks.push(value);
    }
    const types = chunks.map((c) => c.type);
    assert.deepEqual(types.slice(-2), ['text-end', 'abort']);
    assert.equal(types.includes('finish'), false);
    const taskId = (chunks[0] as { messageId: string }).messageId;
    assert.equal((await taskOf(server, taskId, 'ann')).status, 'cancelled');
    const text = textOf((await messageOf(chunks)).message);
    assert.ok(text.split(' ').length < 32);
    assert.deepEqual(await history(server, chatId, 'ann'), [
      ['user', 'Book me a plumber'],
      ['assistant', text],
    ]);
    // Nothing streams any more.
    assert.equal(await transport.reconnectToStream({ chatId }), null);
  });

  test('the stream route answers 204 when no task of the chat streams: a chat never used, and one whose reply ended', async () => {
    const transport = transportOf(server, 'ann');
    assert.equal(await transport.reconnectToStream({ chatId: 'chat-never-used' }), null);
    const raw = await fetch(`${server.http}/api/chat/chat-never-used/stream?user=ann`);
    assert.equal(raw.status, 204);
    assert.equal(await raw.text(), '');

    await chunksOf(await submit(transport, 'chat-ended', [userMessage('Hello')]));
    assert.equal(await transport.reconnectToStream({ chatId: 'chat-ended' }), null);
    // Another user's chat id that was never used is no chat of anyone's yet.
    assert.equal(await transportOf(server, 'bob').reconnectToStream({ chatId: 'chat-never-used' }), null);
  });

  test("another user's chat id is 403 on every route, and nothing is stored in that chat", async () => {
    const chatId = 'chat-of-ann';
    await chunksOf(await submit(transportOf(server, 'ann'), chatId, [userMessage('My own question')]));
    const before = await history(server, chatId, 'ann');

    await assert.rejects(submit(transportOf(server, 'bob'), chatId, [userMessage('Not my chat')]), (err: Error) => {
      assert.equal((JSON.parse(err.message) as { error: { code: string } }).error.code, 'forbidden');
      return true;
    });
    const post = await fetch(`${server.http}/api/chat?user=bob`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ id: chatId, messages: [userMessage('Not my chat')] }),
    });
    assert.equal(post.status, 403);
    assert.deepEqual(await post.json(), { error: { code: 'forbidden', message: 'this conversation belongs to another user' } });
    await assert.rejects(transportOf(server, 'bob').reconnectToStream({ chatId }), /forbidden/);
    assert.equal((await fetch(`${server.http}/api/chat/${chatId}/stream?user=bob`)).status, 403);
    assert.equal((await fetch(`${server.http}/api/chat/${chatId}/stop?user=bob`, { method: 'POST' })).status, 403);
    assert.deepEqual(await history(server, chatId, 'ann'), before);
  });

  test('regenerate-message answers the last user message again: no user message stored, the context is the history before it', async () => {
    const transport = transportOf(server, 'ann');
    const chatId = 'chat-regenerate';
    const q1 = userMessage('Is anyone free on Monday?');
    const a1 = (await messageOf(await chunksOf(await submit(transport, chatId, [q1])))).message as UIMessage;
    const q2 = userMessage('What would a fence cost?');
    const a2 = (await messageOf(await chunksOf(await submit(transport, chatId, [q1, a1, q2])))).message as UIMessage;

    // What useChat's regenerate() sends: the messages without the reply it replaces, and that reply's id.
    const responses: Response[] = [];
    const regenerated = await transportOf(server, 'ann', responses).sendMessages({
      trigger: 'regenerate-message',
      chatId,
      messageId: a2.id,
      messages: [q1, a1, q2],
      abortSignal: undefined,
    });
    const chunks = await chunksOf(regenerated);
    assert.deepEqual(chunks.at(-1), { type: 'finish', finishReason: 'stop' });
    const a3 = (await messageOf(chunks)).message as UIMessage;
    assert.notEqual(a3.id, a2.id);
    // The dev model's reply is a function of its context: the same context as a2's (q1, a1, q2), so the same text.
    // Had the earlier reply a2 been in the context, the text would differ.
    assert.equal(textOf(a3), textOf(a2));
    assert.deepEqual(await history(server, chatId, 'ann'), [
      ['user', 'Is anyone free on Monday?'],
      ['assistant', textOf(a1)],
      ['user', 'What would a fence cost?'],
      ['assistant', textOf(a2)],
      ['assistant', textOf(a3)],
    ]);
    assert.equal((await taskOf(server, responses[0]?.headers.get('x-chatwire-task-id') as string, 'ann')).conversationId, chatId);

    // A chat with no user message has nothing to regenerate.
    const none = await fetch(`${server.http}/api/chat?user=ann`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ id: 'chat-empty', messages: [q1], trigger: 'regenerate-message' }),
    });
    assert.equal(none.status, 404);
    assert.equal(((await none.json()) as { error: { code: string } }).error.code, 'not_found');
  });

  test('a failure after the start is an error part, and the AI SDK reports its text', async () => {
    const chunks = await chunksOf(await submit(transportOf(server, 'ann'), 'chat-fails', [userMessage('/fault upstream')]));
    assert.deepEqual(chunks, [
      { type: 'start', messageId: (chunks[0] as { messageId: string }).messageId },
      { type: 'text-start', id: 'text-0' },
      { type: 'error', errorText: 'upstream_error: injected upstream failure' },
    ]);
    assert.deepEqual((await messageOf(chunks)).errors, ['upstream_error: injected upstream failure']);
    assert.equal((await taskOf(server, (chunks[0] as { messageId: string }).messageId, 'ann')).status, 'error');
  });
});

describe('the AI SDK chat stream when tokens are required', () => {
  const SECRET = 'ai-sdk-test-secret-0123456789-abcdefghij';
  let server: TestServer;
  before(async () => {
    server = await startServer({ jwtSecret: SECRET });
  });
  after(() => server.close());

  test('identity is the bearer token, as on every HTTP route: none is 401, a valid one chats', async () => {
    const body = JSON.stringify({ id: 'chat-jwt', messages: [userMessage('Hello')] });
    const refused = await fetch(`${server.http}/api/chat`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    assert.equal(refused.status, 401);
    assert.equal(((await refused.json()) as { error: { code: string } }).error.code, 'unauthorized');
    assert.equal((await fetch(`${server.http}/api/chat/chat-jwt/stream`)).status, 401);

    const token = await signToken({ secret: SECRET, sub: 'carol' });
    const transport = new DefaultChatTransport<UIMessage>({ api: `${server.http}/api/chat`, headers: { authorization: `Bearer ${token}` } });
    const { message } = await messageOf(await chunksOf(await submit(transport, 'chat-jwt', [userMessage('Hello')])));
    const owned = await fetch(`${server.http}/v1/conversations/chat-jwt/messages`, { headers: { authorization: `Bearer ${token}` } });
    assert.deepEqual(
      ((await owned.json()) as { messages: { text: string }[] }).messages.map((m) => m.text),
      ['Hello', textOf(message)],
    );
  });
});

describe('bad requests to the AI SDK chat stream', () => {
  const MAX_FRAME_BYTES = 32 * 1024;
  const STACK_TRACE = /\n\s+at |\(file:|\.js:\d+:\d+|node:internal/;
  let server: TestServer;
  before(async () => {
    server = await startServer({ maxFrameBytes: MAX_FRAME_BYTES, messagesPerSecond: 100_000, chatsPerMinute: 10_000 });
  });
  after(() => server.close());

  const valid = () => ({ id: 'chat-fuzz', messages: [{ id: 'm1', role: 'user', parts: [{ type: 'text', text: 'hello' }] }], trigger: 'submit-message' });
  type Body = ReturnType<typeof valid>;
  const notAString = fc.oneof(
    fc.integer(),
    fc.boolean(),
    fc.constant(null),
    fc.array(fc.string(), { maxLength: 2 }),
    fc.dictionary(fc.string(), fc.string(), { maxKeys: 2 }),
  );
  const notAnArray = fc.oneof(fc.integer(), fc.string(), fc.constant(null), fc.dictionary(fc.string(), fc.integer(), { maxKeys: 2 }));
  const notAnObject = fc.oneof(fc.integer(), fc.string(), fc.constant(null), fc.array(fc.integer(), { maxLength: 2 }));
  const nested = (depth: number): unknown => (depth === 0 ? 'leaf' : [nested(depth - 1)]);
  const withMessage = (b: Body, m: unknown) => ({ ...b, messages: [m] });
  const message = valid().messages[0] as Body['messages'][number];

  /** Each takes a valid body and breaks it in one way that the protocol refuses. */
  const broken: fc.Arbitrary<unknown> = fc.oneof(
    notAString.map((id) => ({ ...valid(), id })),
    fc.constantFrom('', 'c'.repeat(129)).map((id) => ({ ...valid(), id })),
    fc.oneof(notAnArray, fc.constant([])).map((messages) => ({ ...valid(), messages })),
    notAnObject.map((m) => withMessage(valid(), m)),
    fc.oneof(notAString, fc.constantFrom('bot', 'tool', '')).map((role) => withMessage(valid(), { ...message, role })),
    notAnArray.map((parts) => withMessage(valid(), { ...message, parts })),
    notAString.map((id) => withMessage(valid(), { ...message, id })),
    fc.oneof(notAString, fc.constant(undefined)).map((text) => withMessage(valid(), { ...message, parts: [{ type: 'text', text }] })),
    notAString.map((type) => withMessage(valid(), { ...message, parts: [{ type, text: 'x' }] })),
    // A submitted message needs the user's text: not an assistant's last word, not nothing, not past 16000 characters.
    fc.constant(withMessage(valid(), { ...message, role: 'assistant' })),
    fc.constantFrom([], [{ type: 'step-start' }], [{ type: 'text', text: '' }]).map((parts) => withMessage(valid(), { ...message, parts })),
    fc.constant(
      withMessage(valid(), {
        ...message,
        parts: [
          { type: 'text', text: 'w'.repeat(8000) },
          { type: 'text', text: 'w'.repeat(8001) },
        ],
      }),
    ),
    fc.oneof(notAString, fc.constantFrom('submit', 'resume-stream', '')).map((trigger) => ({ ...valid(), trigger })),
    notAString.map((messageId) => ({ ...valid(), messageId })),
    notAnObject.map((body) => body),
    fc.integer({ min: 33, max: 400 }).map((depth) => withMessage(valid(), { ...message, parts: [...message.parts, { type: 'data-x', data: nested(depth) }] })),
  );

  test('a body broken in any way the protocol refuses gets 400 bad_request in chatwire’s error shape, never a 500', async () => {
    await fc.assert(
      fc.asyncProperty(broken, async (body) => {
        const text = body === undefined ? '' : JSON.stringify(body);
        if (Buffer.byteLength(text) > MAX_FRAME_BYTES) return;
        const res = await fetch(`${server.http}/api/chat?user=fuzzer`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: text });
        const payload = await res.text();
        assert.equal(res.status, 400, `${res.status} for ${text.slice(0, 200)}: ${payload.slice(0, 300)}`);
        assert.match(res.headers.get('content-type') ?? '', /^application\/json/);
        const { error } = JSON.parse(payload) as { error: { code: string; message: string; details?: { path: string; message: string }[] } };
        assert.equal(error.code, 'bad_request');
        assert.equal(typeof error.message, 'string');
        for (const d of error.details ?? []) assert.ok(typeof d.path === 'string' && typeof d.message === 'string');
        assert.doesNotMatch(payload, STACK_TRACE);
      }),
      { numRuns: 300 },
    );
  });

  test('any other input to the /api/chat routes gets a documented status and chatwire’s error body, never a 500', async () => {
    const segment = fc.oneof(
      fc.string({ maxLength: 30 }).map((s) => encodeURIComponent(s)),
      fc.constantFrom('%', '%zz', '%E0%A4%A', '%00', '%2F..%2F', 'chat-fuzz', 'x'.repeat(300)),
    );
    const junk = fc.oneof(
      fc.jsonValue({ maxDepth: 4 }).map((v) => JSON.stringify(v)),
      fc.string({ unit: 'binary', maxLength: 200 }),
      fc.constantFrom('', '{', '[]', 'null', '{"id":"chat-fuzz","messages":[{"id":"m","role":"user","parts":[{"type":"text","text":"hi"}]}]'),
      fc.integer({ min: MAX_FRAME_BYTES - 10, max: MAX_FRAME_BYTES * 3 }).map((n) => JSON.stringify({ ...valid(), pad: 'z'.repeat(n) })),
    );
    const request = fc.oneof(
      fc.record({
        method: fc.constant('POST'),
        path: fc.constant('/api/chat'),
        body: junk,
        contentType: fc.constantFrom('application/json', 'text/plain', ''),
      }),
      fc.record({ method: fc.constant('GET'), path: segment.map((s) => `/api/chat/${s}/stream`), body: fc.constant(''), contentType: fc.constant('') }),
      fc.record({ method: fc.constant('POST'), path: segment.map((s) => `/api/chat/${s}/stop`), body: junk, contentType: fc.constant('') }),
    );
    await fc.assert(
      fc.asyncProperty(request, async (r) => {
        const headers: Record<string, string> = r.contentType === '' ? {} : { 'content-type': r.contentType };
        const init: RequestInit = { method: r.method, headers, signal: AbortSignal.timeout(15_000) };
        if (r.method === 'POST') init.body = r.body;
        const res = await fetch(`${server.http}${r.path}?user=fuzzer`, init);
        const payload = await res.text();
        assert.ok([200, 204, 400, 404, 413].includes(res.status), `${res.status} for ${r.method} ${r.path}: ${payload.slice(0, 300)}`);
        assert.doesNotMatch(payload, STACK_TRACE);
        if (res.status >= 400) {
          const { error } = JSON.parse(payload) as { error: { code: string; message: string } };
          assert.equal(error.code, { 400: 'bad_request', 404: 'not_found', 413: 'payload_too_large' }[res.status]);
          assert.equal(typeof error.message, 'string');
        }
      }),
      { numRuns: 300 },
    );
  });
});
