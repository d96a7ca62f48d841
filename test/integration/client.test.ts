import assert from 'node:assert/strict';
import fs from 'node:fs';
import type { Socket } from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { projectRoot } from '../../scripts/gen-docs.js';
import { signToken } from '../../src/auth/sign.js';
import { errorCatalogue, errorCodes } from '../../src/protocol/index.js';
import {
  ChatwireError,
  connect,
  RETRYABLE,
  type ChatStream,
  type ChatwireClient,
  type ClientEvents,
  type ConnectOptions,
  type WebSocketConstructor,
} from '../../src/client/client.js';
import { startServer, type TestServer } from '../helpers/server.js';

/** The `ws` WebSocket, remembering every socket the client opens, so a test can kill one. */
function recordingWebSocket(): { Ctor: WebSocketConstructor; sockets: WebSocket[] } {
  const sockets: WebSocket[] = [];
  class Recording extends WebSocket {
    constructor(url: string, protocols?: string | string[]) {
      super(url, protocols);
      sockets.push(this);
    }
  }
  return { Ctor: Recording, sockets };
}

function open(server: TestServer, options: ConnectOptions = {}): ChatwireClient {
  return connect(server.ws, { WebSocket, ...options });
}

/** Resolves with the next event of that kind that matches. */
function nextEvent<K extends keyof ClientEvents>(
  client: ChatwireClient,
  event: K,
  match: (v: ClientEvents[K]) => boolean = () => true,
): Promise<ClientEvents[K]> {
  return new Promise((resolve) => {
    const off = client.on(event, (v) => {
      if (!match(v)) return;
      off();
      resolve(v);
    });
  });
}

/** The dev provider's reply to `text` in a fresh conversation, computed by the model (not the cache). */
async function referenceText(server: TestServer, text: string, maxTokens: number): Promise<string> {
  const client = open(server, { user: 'reference' });
  try {
    const stream = await client.chat.send(text, { params: { maxTokens }, cache: 'bypass' });
    return (await stream.result).text;
  } finally {
    client.close();
  }
}

async function rejection(promise: Promise<unknown>): Promise<ChatwireError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof ChatwireError, `expected a ChatwireError, got ${String(err)}`);
    return err;
  }
  assert.fail('expected a rejection');
}

describe('the client library as shipped', () => {
  test("its retryable flags for the server's codes are the error catalogue's", () => {
    for (const code of errorCodes) assert.equal(RETRYABLE[code], errorCatalogue[code].retryable, code);
    assert.equal(new ChatwireError('overloaded', 'busy').retryable, true);
    assert.equal(new ChatwireError('forbidden', 'no').retryable, false);
  });

  test('the compiled module imports nothing, so a browser loads it without a bundler', () => {
    const compiled = fs.readFileSync(new URL('../../src/client/client.js', import.meta.url), 'utf8');
    assert.doesNotMatch(compiled, /^\s*import\s/m);
    assert.doesNotMatch(compiled, /\bimport\(|\brequire\(/);
    assert.match(compiled, /^export function connect\(/m);
  });

  test('the server serves /client.js and /openapi.json as they were built and generated', async () => {
    const server = await startServer();
    try {
      const lib = await fetch(`${server.http}/client.js`);
      assert.equal(lib.status, 200);
      assert.equal(await lib.text(), fs.readFileSync(new URL('../../src/client/client.js', import.meta.url), 'utf8'));
      const api = await fetch(`${server.http}/openapi.json`);
      assert.equal(api.status, 200);
      assert.equal(api.headers.get('content-type'), 'application/json');
      assert.equal(api.headers.get('access-control-allow-origin'), '*');
      const generated = fs.readFileSync(path.join(projectRoot(), 'docs', 'openapi.json'), 'utf8');
      assert.deepEqual(await api.json(), JSON.parse(generated));
    } finally {
      await server.close();
    }
  });
});

describe('the client library in Node', () => {
  let server: TestServer;
  before(async () => {
    server = await startServer({ devTokenDelayMs: 5 });
  });
  after(() => server.close());

  test('send resolves at the ack; the reply streams as an async iterator and as events, and equals the stored reply', async () => {
    const client = open(server, { user: 'ana' });
    const hello = await client.ready();
    assert.equal(hello.userId, 'ana');
    assert.equal(client.state, 'open');
    const stream = await client.chat.send('Can someone fix a leaking tap?', { params: { maxTokens: 12 } });
    assert.match(stream.taskId, /^task_/);
    assert.equal(stream.ack.status, 'queued');
    assert.equal(typeof stream.conversationId, 'string');
    const events: { text: string; seq: number }[] = [];
    stream.on('delta', (d) => events.push(d));
    const iterated: string[] = [];
    for await (const text of stream) iterated.push(text);
    const result = await stream.result;
    assert.equal(result.finishReason, 'length');
    assert.equal(result.cached, false);
    assert.equal(result.usage.completionTokens, 12);
    assert.equal(iterated.join(''), result.text);
    assert.equal(result.text.split(' ').length, 12);
    // Listeners added after the ack see every delta that arrives after they were added, with contiguous seq.
    assert.deepEqual(
      events.map((e) => e.seq),
      events.map((_, i) => iterated.length - events.length + i),
    );
    // A second iterator taken after the end replays the whole reply.
    const again: string[] = [];
    for await (const text of stream) again.push(text);
    assert.deepEqual(again, iterated);
    const history = await client.history(stream.conversationId);
    assert.deepEqual(
      history.messages.map((m) => [m.role, m.text]),
      [
        ['user', 'Can someone fix a leaking tap?'],
        ['assistant', result.text],
      ],
    );
    assert.equal(history.messages[1]?.messageId, result.messageId);
    client.close();
  });

  test('calls made before the connection opens are queued and sent once it is up', async () => {
    const client = open(server, { user: 'early' });
    assert.equal(client.state, 'connecting');
    const pending = client.chat.send('queued before hello', { params: { maxTokens: 3 } });
    const stream = await pending;
    assert.equal((await stream.result).text.split(' ').length, 3);
    client.close();
  });

  test('cancel ends the stream with finishReason cancelled and the text so far, which is what was stored', async () => {
    const client = open(server, { user: 'bea' });
    const stream = await client.chat.send('a long answer please', { params: { maxTokens: 4096 }, cache: 'bypass' });
    await new Promise<void>((resolve) => {
      const off = stream.on('delta', (d) => {
        if (d.seq < 2) return;
        off();
        resolve();
      });
    });
    await stream.cancel();
    const result = await stream.result;
    assert.equal(result.finishReason, 'cancelled');
    assert.ok(result.text.length > 0);
    assert.ok(result.text.split(' ').length < 4096);
    assert.equal(stream.text, result.text);
    const history = await client.history(stream.conversationId);
    assert.equal(history.messages[1]?.text, result.text);
    // Cancelling a finished stream is a no-op.
    await stream.cancel();
    client.close();
  });

  test('a socket killed mid-stream reconnects by itself and resumes: every delta arrives once, in order, and the text is complete', async () => {
    const expected = await referenceText(server, 'resume after a dropped socket', 60);
    const { Ctor, sockets } = recordingWebSocket();
    const client = open(server, { user: 'cai', WebSocket: Ctor, reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });
    const first = await client.ready();
    const states: string[] = [];
    client.on('state', (s) => states.push(s.state));
    const stream = await client.chat.send('resume after a dropped socket', { params: { maxTokens: 60 }, cache: 'bypass' });
    const seqs: number[] = [];
    let textAtKill = '';
    stream.on('delta', (d) => {
      seqs.push(d.seq);
      // Kill the TCP connection without a close handshake, as a network failure would.
      if (d.seq === 2) {
        textAtKill = stream.text;
        sockets[0]?.terminate();
      }
    });
    const resumed = nextEvent(client, 'resumed');
    const result = await stream.result;
    assert.deepEqual(await resumed, [stream]);
    assert.equal(result.text, expected);
    assert.equal(stream.chunks.join(''), expected);
    assert.ok(textAtKill.length > 0 && textAtKill.length < expected.length, 'the socket died mid-stream');
    assert.deepEqual(
      seqs,
      seqs.map((_, i) => i),
    );
    assert.equal(sockets.length, 2);
    assert.deepEqual(states, ['reconnecting', 'open']);
    assert.notEqual(client.hello?.connectionId, first.connectionId);
    client.close();
  });

  test('after the server closes every socket mid-stream, the client reconnects and the reply still completes', async () => {
    const expected = await referenceText(server, 'server restart of sockets', 50);
    const client = open(server, { user: 'dan', reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });
    const stream = await client.chat.send('server restart of sockets', { params: { maxTokens: 50 }, cache: 'bypass' });
    const off = stream.on('delta', (d) => {
      if (d.seq !== 1) return;
      off();
      server.app.server.closeConnections(1012, 'service restart');
    });
    const reconnecting = nextEvent(client, 'state', (s) => s.state === 'reconnecting');
    assert.equal((await stream.result).text, expected);
    assert.equal((await reconnecting).code, 1012);
    client.close();
  });

  test('reads and an unacked chat.send in flight when the socket dies are sent again after the reconnect; the chat is stored once', async () => {
    const { Ctor, sockets } = recordingWebSocket();
    const client = open(server, { user: 'eve', WebSocket: Ctor, reconnect: { initialDelayMs: 20, maxDelayMs: 50 } });
    await client.ready();
    const first = await client.chat.send('something to read back', { params: { maxTokens: 2 } });
    await first.result;
    const history = client.history(first.conversationId);
    const send = client.chat.send('lost in the void', { params: { maxTokens: 4 } });
    // Both frames are written synchronously; the socket dies before any reply can be read.
    sockets[0]?.terminate();
    const stream = await send;
    const reply = await stream.result;
    assert.ok(reply.text.length > 0);
    const read = await history;
    assert.equal(read.messages.length, 2);
    assert.equal(sockets.length, 2);
    // Whether the first socket's frame reached the server or not, the message is stored once, with one reply.
    const list = await client.request({ type: 'conversations.list' });
    const lost = list.items.filter((c) => c.title === 'lost in the void');
    assert.equal(lost.length, 1);
    assert.equal(lost[0]?.messageCount, 2);
    const stored = await client.history(stream.conversationId);
    assert.deepEqual(
      stored.messages.map((m) => [m.role, m.text]),
      [
        ['user', 'lost in the void'],
        ['assistant', reply.text],
      ],
    );
    client.close();
  });

  test('a second identical chat is acked as cached and streams the same text with cached: true', async () => {
    const client = open(server, { user: 'fay' });
    const a = await client.chat.send('What does a plumber charge per hour?', { params: { maxTokens: 8 } });
    const first = await a.result;
    const b = await client.chat.send('What does a plumber charge per hour?', { params: { maxTokens: 8 } });
    assert.equal(b.ack.status, 'cached');
    const second = await b.result;
    assert.equal(second.cached, true);
    assert.equal(second.text, first.text);
    assert.deepEqual(b.chunks, a.chunks);
    client.close();
  });

  test('errors are typed objects with code, retryable and details', async () => {
    const owner = open(server, { user: 'gus' });
    const other = open(server, { user: 'hal' });
    const stream = await owner.chat.send('private conversation', { params: { maxTokens: 2 } });
    await stream.result;
    const forbidden = await rejection(other.chat.send('let me in', { conversationId: stream.conversationId }));
    assert.equal(forbidden.code, 'forbidden');
    assert.equal(forbidden.retryable, false);
    assert.equal(forbidden.retryAfterMs, undefined);
    const missing = await rejection(other.task('task_doesnotexist0000000'));
    assert.equal(missing.code, 'not_found');
    const bad = await rejection(owner.chat.send('x', { params: { temperature: 7 } }));
    assert.equal(bad.code, 'bad_request');
    assert.deepEqual(
      bad.details?.map((d) => d.path),
      ['params.temperature'],
    );
    // Over the 64 KiB frame limit in UTF-8: refused before it is sent (the server would close the socket).
    const huge = await rejection(owner.chat.send('€'.repeat(16000), { params: { system: '€'.repeat(8000) } }));
    assert.equal(huge.code, 'payload_too_large');
    // The connection stays usable after every one of them.
    assert.equal((await owner.request({ type: 'ping' })).type, 'pong');
    owner.close();
    other.close();
  });

  test('a frame the client cannot read is reported as a bad_frame error event, and the client keeps working', async () => {
    const { Ctor, sockets } = recordingWebSocket();
    const client = open(server, { user: 'ida', WebSocket: Ctor });
    await client.ready();
    const errors: ChatwireError[] = [];
    client.on('error', (e) => errors.push(e));
    // Delivered through the socket's own message event, exactly as a frame off the wire is.
    sockets[0]?.emit('message', Buffer.from('{not json'), false);
    sockets[0]?.emit('message', Buffer.from('[1,2]'), false);
    assert.deepEqual(
      errors.map((e) => [e.code, e.retryable]),
      [
        ['bad_frame', false],
        ['bad_frame', false],
      ],
    );
    const stream = await client.chat.send('still here?', { params: { maxTokens: 2 } });
    assert.equal((await stream.result).finishReason, 'length');
    client.close();
  });

  test('a socket that stops answering is dropped by the heartbeat and replaced', async () => {
    const { Ctor, sockets } = recordingWebSocket();
    const client = open(server, { user: 'jon', WebSocket: Ctor, heartbeatMs: 100, reconnect: { initialDelayMs: 20, maxDelayMs: 50 } });
    await client.ready();
    // Stop reading from the first socket: the server's pongs never arrive.
    (sockets[0] as unknown as { _socket: Socket })._socket.pause();
    const reconnecting = await nextEvent(client, 'state', (s) => s.state === 'reconnecting');
    assert.equal(reconnecting.code, 4000);
    await nextEvent(client, 'state', (s) => s.state === 'open');
    assert.equal(sockets.length, 2);
    assert.equal((await client.request({ type: 'ping' })).type, 'pong');
    client.close();
    sockets[0]?.terminate();
  });

  test('close() fails unfinished streams and pending calls with closed, and nothing reconnects', async () => {
    const { Ctor, sockets } = recordingWebSocket();
    const client = open(server, { user: 'kim', WebSocket: Ctor });
    const stream = await client.chat.send('close me', { params: { maxTokens: 4096 }, cache: 'bypass' });
    client.close();
    const err = await rejection(stream.result);
    assert.equal(err.code, 'closed');
    assert.equal(stream.status, 'error');
    assert.equal((await rejection(client.history(stream.conversationId))).code, 'closed');
    assert.equal((await rejection(client.ready())).code, 'closed');
    assert.equal(client.state, 'closed');
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(sockets.length, 1);
    // The task itself goes on on the server; cancel it so the test leaves nothing running.
    const cleanup = open(server, { user: 'kim' });
    await cleanup.request({ type: 'chat.cancel', taskId: stream.taskId });
    cleanup.close();
  });
});

describe('the client library against rate limits', () => {
  let server: TestServer;
  before(async () => {
    // 12 chats a minute: a burst of 12, then one every 5 s.
    server = await startServer({ chatsPerMinute: 12 });
  });
  after(() => server.close());

  async function exhaust(client: ChatwireClient): Promise<ChatwireError> {
    const streams: ChatStream[] = [];
    for (let i = 0; i < 40; i++) {
      try {
        streams.push(await client.chat.send(`burst ${i}`, { params: { maxTokens: 1 } }));
      } catch (err) {
        await Promise.all(streams.map((s) => s.result));
        assert.ok(streams.length >= 12, String(streams.length));
        return err as ChatwireError;
      }
    }
    assert.fail('never rate limited');
  }

  test('a rate-limited send fails with rate_limited, retryable and retryAfterMs; asked to, it waits and retries', async () => {
    const client = open(server, { user: 'busy' });
    const limited = await exhaust(client);
    assert.ok(limited instanceof ChatwireError);
    assert.equal(limited.code, 'rate_limited');
    assert.equal(limited.retryable, true);
    assert.ok(typeof limited.retryAfterMs === 'number' && limited.retryAfterMs > 0 && limited.retryAfterMs <= 5000, String(limited.retryAfterMs));

    // A wait longer than the caller allows is not taken.
    const tooLong = await rejection(client.chat.send('not worth the wait', { retryOnRateLimit: { maxWaitMs: 1 } }));
    assert.equal(tooLong.code, 'rate_limited');

    // An abort during the wait ends it at once.
    const controller = new AbortController();
    const aborted = client.chat.send('never mind', { retryOnRateLimit: true, signal: controller.signal, onRateLimited: () => controller.abort() });
    assert.equal((await rejection(aborted)).code, 'aborted');

    const waits: number[] = [];
    const stream = await client.chat.send('worth the wait', {
      params: { maxTokens: 2 },
      retryOnRateLimit: true,
      onRateLimited: (w) => {
        assert.equal(w.error.code, 'rate_limited');
        assert.equal(w.retryAt - Date.now() <= w.retryAfterMs, true);
        waits.push(w.attempt);
      },
    });
    assert.deepEqual(waits, [1]);
    assert.equal((await stream.result).text.split(' ').length, 2);
    client.close();
  });
});

describe('the client library with tokens', () => {
  const secret = 'client-library-secret-0123456789-abcdefghij';
  let server: TestServer;
  before(async () => {
    server = await startServer({ jwtSecret: secret });
  });
  after(() => server.close());

  test('a token (or a function giving one at each connect) authenticates as its subject', async () => {
    let calls = 0;
    const { Ctor, sockets } = recordingWebSocket();
    const client = open(server, {
      WebSocket: Ctor,
      reconnect: { initialDelayMs: 20, maxDelayMs: 50 },
      token: async () => {
        calls++;
        return signToken({ secret, sub: `tok-user` });
      },
    });
    assert.equal((await client.ready()).userId, 'tok-user');
    assert.equal(sockets[0]?.protocol, 'chatwire.v1');
    sockets[0]?.terminate();
    await nextEvent(client, 'hello');
    assert.equal(calls, 2);
    client.close();

    const fixed = open(server, { token: await signToken({ secret, sub: 'fixed-user' }) });
    assert.equal((await fixed.ready()).userId, 'fixed-user');
    fixed.close();
  });

  test('without a valid token the upgrade is refused and the client keeps trying with backoff', async () => {
    const client = open(server, { token: 'not-a-jwt', reconnect: { initialDelayMs: 10, maxDelayMs: 40 } });
    const delays: number[] = [];
    await new Promise<void>((resolve) => {
      const off = client.on('state', (s) => {
        assert.equal(s.state, 'connecting');
        delays.push(s.delayMs as number);
        if (delays.length === 4) {
          off();
          resolve();
        }
      });
    });
    // Jittered in [d/2, d] with d doubling from 10 up to 40.
    const ceilings = [10, 20, 40, 40];
    for (const [i, d] of delays.entries()) assert.ok(d >= (ceilings[i] as number) / 2 && d <= (ceilings[i] as number), `attempt ${i + 1}: ${d}`);
    client.close();
    assert.equal(client.state, 'closed');
  });
});
