/**
 * Random, malformed, oversized and deeply nested input over every transport.
 * The seed is printed with any failure; replay one with FUZZ_SEED=<seed>.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import { after, before, describe, test } from 'node:test';
import fc from 'fast-check';
import { pino } from 'pino';
import WebSocket from 'ws';
import { createApp, type App } from '../../src/app.js';
import { signToken } from '../../src/auth/sign.js';
import { loadConfig } from '../../src/config.js';
import { errorCatalogue, type ErrorCode } from '../../src/protocol/index.js';
import { connectSocketIO, WsClient, type RecordingSocket } from '../helpers/clients.js';
import { tempDataDir } from '../helpers/server.js';

const SEED = process.env.FUZZ_SEED === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(process.env.FUZZ_SEED);
const SECRET = 'fuzz-integration-secret-0123456789-abcdefghij';
const MAX_FRAME_BYTES = 4096;
// Distinctive texts that must never reach the logs.
const MARK = 'qx7-canary-message-text';

/** Every code a client may be answered with for bad input or load; `internal` and worker/upstream failures are bugs here. */
const EXPECTED_CODES = new Set<ErrorCode>(['bad_request', 'unauthorized', 'forbidden', 'not_found', 'payload_too_large', 'rate_limited', 'overloaded']);
const DIRECT_REPLIES = new Set(['error', 'pong', 'ok', 'chat.ack', 'task', 'conversation.history', 'requests.list', 'consumer.requests', 'consumer.bookings']);
const STACK_TRACE = /\n\s+at |\(file:|\.js:\d+:\d+|node:internal/;
const CLIENT_TYPES = [
  'chat.send',
  'chat.cancel',
  'chat.resume',
  'task.get',
  'conversation.history',
  'requests.list',
  'consumer.requests',
  'consumer.bookings',
  'ping',
];
// socket.io clients refuse to emit these names themselves.
const RESERVED_EVENTS = new Set(['connect', 'connect_error', 'disconnect', 'disconnecting', 'newListener', 'removeListener']);

function run<T>(name: string, arb: fc.Arbitrary<T>, numRuns: number, check: (value: T) => Promise<void>): Promise<void> {
  return fc.assert(fc.asyncProperty(arb, check), { numRuns, seed: SEED, endOnFailure: true }).catch((err: unknown) => {
    const cause = err instanceof Error && err.cause instanceof Error ? `\ncaused by: ${err.cause.message}` : '';
    throw new Error(`${name} failed with FUZZ_SEED=${SEED}: ${err instanceof Error ? err.message : String(err)}${cause}`);
  });
}

/** Tally of answers, reported with t.diagnostic so a run shows how much got past validation. */
function tally(counts: Map<string, number>, key: string): void {
  counts.set(key, (counts.get(key) ?? 0) + 1);
}

function assertErrorShape(reply: Record<string, unknown>, what: string): void {
  assert.equal(typeof reply.message, 'string', what);
  assert.ok(EXPECTED_CODES.has(reply.code as ErrorCode), `${what}: code ${String(reply.code)}`);
}

// ---------- arbitraries ----------

/** Arbitrary JSON nested up to `depth` levels, made of arrays or objects. */
function nested(depth: number, leaf: unknown, kind: 'array' | 'object' | 'mixed', seed: number): unknown {
  let value = leaf;
  for (let i = 0; i < depth; i++) {
    const asArray = kind === 'array' || (kind === 'mixed' && (seed >> (i % 30)) & 1);
    value = asArray ? [value] : { a: value };
  }
  return value;
}

const deepValue = fc
  .tuple(fc.integer({ min: 50, max: 1000 }), fc.jsonValue({ maxDepth: 1 }), fc.constantFrom('array' as const, 'object' as const, 'mixed' as const), fc.nat())
  .map(([depth, leaf, kind, seed]) => nested(depth, leaf, kind, seed));

const text = fc.oneof(
  fc.string({ maxLength: 40 }),
  fc.string({ unit: 'grapheme', maxLength: 40 }),
  fc.string({ unit: 'binary', maxLength: 40 }),
  fc.constantFrom('', ' ', '\u0000', '\uD800', '__proto__', 'constructor', 'LAST', '%zz', 'task_nope', 'c_0000000001', '../../etc/passwd'),
);

const anyValue = fc.oneof(
  { weight: 4, arbitrary: fc.jsonValue({ maxDepth: 3 }) },
  { weight: 2, arbitrary: text },
  { weight: 2, arbitrary: fc.oneof(fc.integer(), fc.double(), fc.constantFrom(0, -1, 1.5, 1e308, -0, Number.MAX_SAFE_INTEGER + 2)) },
  { weight: 1, arbitrary: deepValue },
);

const opt = <T>(arb: fc.Arbitrary<T>) => fc.option(arb, { nil: undefined, freq: 2 });
const id = opt(fc.string({ minLength: 1, maxLength: 64 }));
const taskRef = fc.oneof({ weight: 3, arbitrary: fc.constant('LAST') }, { weight: 1, arbitrary: fc.string({ minLength: 1, maxLength: 40 }) });
const conversationRef = fc.oneof(
  { weight: 3, arbitrary: fc.constant('LAST_CONVERSATION') },
  { weight: 1, arbitrary: fc.string({ minLength: 1, maxLength: 40 }) },
);
const limit = opt(fc.integer({ min: 1, max: 100 }));
const cursor = opt(fc.oneof(fc.string({ minLength: 1, maxLength: 40 }), fc.base64String({ minLength: 4, maxLength: 80 })));
const consumerRef = fc.oneof(fc.constantFrom('c_0000000001', 'c_0000000002', 'fuzzer'), fc.string({ minLength: 1, maxLength: 20 }));

/** Drops the keys left undefined: fc.record with optional keys, as JSON would carry them. */
const compact = (m: Record<string, unknown>) => Object.fromEntries(Object.entries(m).filter(([, v]) => v !== undefined));

const chatSendBody = fc
  .record({
    id,
    text: fc.string({ minLength: 1, maxLength: 30 }).map((t) => `${MARK} ${t}`),
    conversationId: opt(conversationRef),
    model: opt(fc.string({ minLength: 1, maxLength: 20 })),
    params: opt(
      fc
        .record({
          temperature: opt(fc.double({ min: 0, max: 2, noNaN: true })),
          maxTokens: opt(fc.integer({ min: 1, max: 48 })),
          system: opt(fc.string({ maxLength: 30 }).map((t) => `${MARK} ${t}`)),
        })
        .map(compact),
    ),
    cache: opt(fc.constantFrom('use', 'bypass', 'refresh')),
  })
  .map(compact);

/** A valid message of every client type (as PROTOCOL.md lists them), before mutation. */
const validMessage: fc.Arbitrary<Record<string, unknown>> = fc.oneof(
  { weight: 3, arbitrary: chatSendBody.map((b) => ({ type: 'chat.send', ...b })) },
  { weight: 1, arbitrary: fc.record({ id, taskId: taskRef }).map((m) => compact({ type: 'chat.cancel', ...m })) },
  {
    weight: 2,
    arbitrary: fc
      .record({ id, taskId: taskRef, fromSeq: fc.oneof(fc.nat({ max: 60 }), fc.constant(Number.MAX_SAFE_INTEGER)) })
      .map((m) => compact({ type: 'chat.resume', ...m })),
  },
  { weight: 1, arbitrary: fc.record({ id, taskId: taskRef }).map((m) => compact({ type: 'task.get', ...m })) },
  {
    weight: 1,
    arbitrary: fc
      .record({ id, conversationId: conversationRef, before: opt(fc.string({ minLength: 1, maxLength: 30 })), limit })
      .map((m) => compact({ type: 'conversation.history', ...m })),
  },
  {
    weight: 1,
    arbitrary: fc
      .record({ id, status: opt(fc.constantFrom('open', 'booked', 'closed')), category: opt(fc.string({ minLength: 1, maxLength: 20 })), limit, cursor })
      .map((m) => compact({ type: 'requests.list', ...m })),
  },
  { weight: 1, arbitrary: fc.record({ id, consumerId: consumerRef, limit, cursor }).map((m) => compact({ type: 'consumer.requests', ...m })) },
  { weight: 1, arbitrary: fc.record({ id, consumerId: consumerRef, limit, cursor }).map((m) => compact({ type: 'consumer.bookings', ...m })) },
  { weight: 1, arbitrary: fc.record({ id }).map((m) => compact({ type: 'ping', ...m })) },
);

type Mutation = { kind: 'set'; key: string; value: unknown } | { kind: 'drop'; index: number } | { kind: 'retype'; type: unknown };
const fieldNames = fc.constantFrom(
  'id',
  'type',
  'text',
  'taskId',
  'fromSeq',
  'conversationId',
  'consumerId',
  'limit',
  'cursor',
  'before',
  'status',
  'params',
  'cache',
  'model',
  '__proto__',
  'constructor',
);
const mutation: fc.Arbitrary<Mutation> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant('set' as const),
      key: fc.oneof({ weight: 4, arbitrary: fieldNames }, { weight: 1, arbitrary: text }),
      value: anyValue,
    }),
  },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('drop' as const), index: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('retype' as const), type: fc.oneof(text, anyValue) }) },
);

function mutate(message: Record<string, unknown>, mutations: Mutation[]): Record<string, unknown> {
  const out = { ...message };
  for (const m of mutations) {
    if (m.kind === 'set') Object.defineProperty(out, m.key, { value: m.value, enumerable: true, writable: true, configurable: true });
    else if (m.kind === 'drop') {
      const keys = Object.keys(out);
      if (keys.length > 0) delete out[keys[m.index % keys.length] as string];
    } else out.type = m.type;
  }
  return out;
}

/** Half valid as they are, half with one to three fields broken, dropped or added. */
const messageLike = fc
  .tuple(validMessage, fc.oneof(fc.constant([] as Mutation[]), fc.array(mutation, { minLength: 1, maxLength: 3 })))
  .map(([m, mutations]) => mutate(m, mutations));

/** A POST /v1/chat body: chat.send without its type, often valid. */
const chatBodyLike = fc
  .tuple(chatSendBody, fc.oneof(fc.constant([] as Mutation[]), fc.array(mutation, { minLength: 1, maxLength: 2 })))
  .map(([m, mutations]) => mutate(m, mutations));

/** What goes over /ws: a message-like object, any JSON, raw text, or binary. */
const wsFrame = fc.oneof(
  { weight: 6, arbitrary: messageLike.map((m) => ({ kind: 'text' as const, data: JSON.stringify(m) })) },
  { weight: 2, arbitrary: anyValue.map((v) => ({ kind: 'text' as const, data: JSON.stringify(v) ?? 'undefined' })) },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 200 }).map((s) => ({ kind: 'text' as const, data: s })) },
  {
    weight: 1,
    arbitrary: fc.integer({ min: 1, max: 2040 }).map((n) => ({ kind: 'text' as const, data: `{"type":"ping","a":${'['.repeat(n)}${']'.repeat(n)}}` })),
  },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 200 }).map((b) => ({ kind: 'binary' as const, data: Buffer.from(b) })) },
);

function resolveIds(data: string, last: { taskId: string; conversationId: string }): string {
  return data.replaceAll('"LAST"', JSON.stringify(last.taskId)).replaceAll('"LAST_CONVERSATION"', JSON.stringify(last.conversationId));
}

// ---------- the server, with its log captured ----------

interface LoggedServer {
  app: App;
  http: string;
  ws: string;
  port: number;
  log: string[];
  close(): Promise<void>;
}

async function startLoggedServer(): Promise<LoggedServer> {
  const dataDir = tempDataDir();
  const config = loadConfig(
    {},
    {
      port: 0,
      host: '127.0.0.1',
      dataDir,
      workerThreads: 1,
      devTokenDelayMs: 1,
      jwtSecret: SECRET,
      maxFrameBytes: MAX_FRAME_BYTES,
      messagesPerSecond: 100_000,
      chatsPerMinute: 1000,
      logLevel: 'trace',
    },
  );
  const log: string[] = [];
  const app = await createApp(config, { log: pino({ level: 'trace' }, { write: (line: string) => void log.push(line) }) });
  return {
    app,
    log,
    port: app.port,
    http: `http://127.0.0.1:${app.port}`,
    ws: `ws://127.0.0.1:${app.port}/ws`,
    async close() {
      await app.close();
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/** A user chatting normally the whole time: every chat must come back whole. */
function startChatter(server: LoggedServer, token: string): { stop(): Promise<{ chats: number; failures: string[] }> } {
  let running = true;
  const failures: string[] = [];
  let chats = 0;
  const loop = (async () => {
    const c = await WsClient.connect(server.ws, { token });
    try {
      for (let i = 0; running; i++) {
        const ack = await c.request({ type: 'chat.send', text: `${MARK} steady question ${i}`, params: { maxTokens: 24 }, cache: 'bypass' });
        if (ack.type !== 'chat.ack') {
          failures.push(`chat ${i}: ${JSON.stringify(ack)}`);
          continue;
        }
        const { deltas, text, end } = await c.collect(ack.taskId as string);
        const seqsOk = deltas.every((d, k) => d.seq === k);
        const usage = end.usage as { completionTokens: number } | undefined;
        if (end.type !== 'chat.done' || end.finishReason !== 'length' || usage?.completionTokens !== 24 || !seqsOk || text.split(' ').length !== 24) {
          failures.push(`chat ${i}: ${JSON.stringify(end)} after ${deltas.length} deltas`);
        }
        chats += 1;
      }
    } finally {
      await c.close();
    }
  })().catch((err: unknown) => {
    failures.push(`the chatting connection failed: ${String(err)}`);
  });
  return {
    async stop() {
      running = false;
      await loop;
      return { chats, failures };
    },
  };
}

describe('fuzzing every transport', () => {
  let server: LoggedServer;
  let token: string;
  let chatterToken: string;
  let chatter: ReturnType<typeof startChatter>;
  // A real task and conversation of the fuzzing user, so that resume/get/cancel/history also hit live records.
  const last = { taskId: 'task_none', conversationId: 'conv_none' };

  before(async () => {
    server = await startLoggedServer();
    token = await signToken({ secret: SECRET, sub: 'fuzzer' });
    chatterToken = await signToken({ secret: SECRET, sub: 'steady' });
    chatter = startChatter(server, chatterToken);
    const c = await WsClient.connect(server.ws, { token });
    const ack = await c.request({ type: 'chat.send', text: `${MARK} seed chat`, params: { maxTokens: 40 } });
    last.taskId = ack.taskId as string;
    last.conversationId = ack.conversationId as string;
    await c.close();
  });
  after(async () => {
    await chatter.stop();
    await server.close();
  });

  test('over /ws every frame gets one documented reply, never internal, never a stack trace', async (t) => {
    const counts = new Map<string, number>();
    let c = await WsClient.connect(server.ws, { token });
    await c.nextOfType('hello');
    await run('/ws frames', wsFrame, 2500, async (frame) => {
      if (c.closeCode !== null) {
        c = await WsClient.connect(server.ws, { token });
        await c.nextOfType('hello');
      }
      if (frame.kind === 'binary') c.socket.send(frame.data);
      else c.send(resolveIds(frame.data, last));
      const reply = await c.next((m) => DIRECT_REPLIES.has(m.type));
      const shown = JSON.stringify(reply);
      assert.doesNotMatch(shown, STACK_TRACE);
      if (reply.type === 'error') assertErrorShape(reply, shown);
      tally(counts, reply.type === 'error' ? `error ${String(reply.code)}` : reply.type);
      if (reply.code === 'payload_too_large') assert.equal(await c.closed, 1009);
      if (reply.type === 'chat.ack') {
        last.taskId = reply.taskId as string;
        last.conversationId = reply.conversationId as string;
      }
    });
    // Nothing sent by the server on any stream was an internal error either.
    for (const m of c.received) {
      if (m.type === 'chat.error') assert.ok(EXPECTED_CODES.has(m.code as ErrorCode), JSON.stringify(m));
    }
    t.diagnostic(`seed ${SEED}; /ws replies: ${JSON.stringify(Object.fromEntries(counts))}`);
    await c.close();
  });

  test('frames over the limit get payload_too_large and close 1009; far over it the connection is dropped', async () => {
    await run(
      'oversized /ws frames',
      fc.tuple(fc.integer({ min: MAX_FRAME_BYTES + 1, max: MAX_FRAME_BYTES * 8 }), fc.boolean()),
      40,
      async ([size, binary]) => {
        const c = await WsClient.connect(server.ws, { token });
        await c.nextOfType('hello');
        const data = binary ? Buffer.alloc(size, 7) : JSON.stringify({ type: 'chat.send', text: `${MARK}${'y'.repeat(size)}` });
        c.socket.send(data);
        const code = await c.closed;
        const frames = c.received.filter((m) => m.type !== 'hello');
        // uWS itself drops a frame past 4x the limit before we see it (it would have to buffer it all first).
        if (Buffer.byteLength(data) <= MAX_FRAME_BYTES * 4) {
          assert.equal(code, 1009);
          assert.deepEqual(
            frames.map((m) => m.code),
            ['payload_too_large'],
          );
        } else {
          assert.ok(code === 1009 || code === 1006, String(code));
          assert.ok(frames.every((m) => m.code === 'payload_too_large'));
        }
      },
    );
  });

  test('over socket.io every event gets one documented reply through its ack', async (t) => {
    const counts = new Map<string, number>();
    let s: RecordingSocket = await connectSocketIO(server.http, { token });
    const event = fc.oneof({ weight: 4, arbitrary: fc.constantFrom(...CLIENT_TYPES) }, { weight: 1, arbitrary: text });
    const usable = (name: unknown) => (typeof name === 'string' && name !== '' && !RESERVED_EVENTS.has(name) ? name : 'ping');
    const emitted: fc.Arbitrary<[string, unknown[]]> = fc.oneof(
      // The message's type as the event name, the rest as the payload: how a client sends each message.
      { weight: 6, arbitrary: messageLike.map(({ type, ...rest }): [string, unknown[]] => [usable(type), [rest]]) },
      { weight: 2, arbitrary: fc.tuple(event.map(usable), fc.array(anyValue, { maxLength: 3 })) },
      {
        weight: 1,
        arbitrary: fc.tuple(
          event.map(usable),
          fc.uint8Array({ maxLength: 64 }).map((b) => [Buffer.from(b)]),
        ),
      },
      {
        weight: 1,
        arbitrary: fc.tuple(
          event.map(usable),
          deepValue.map((v) => [{ id: 'deep', nested: v }]),
        ),
      },
    );
    await run('socket.io events', emitted, 1200, async ([name, payload]) => {
      if (!s.connected) s = await connectSocketIO(server.http, { token });
      const resolved = payload.map((arg) => (Buffer.isBuffer(arg) ? arg : (JSON.parse(resolveIds(JSON.stringify(arg), last)) as unknown)));
      let reply: Record<string, unknown>;
      try {
        reply = (await s.timeout(10_000).emitWithAck(name, ...resolved)) as Record<string, unknown>;
      } catch (err) {
        // Only a payload over the frame limit may end the connection (payload_too_large and 1009, as on /ws).
        assert.ok(JSON.stringify(resolved).length > MAX_FRAME_BYTES / 2, `no ack for ${name}: ${String(err)}`);
        tally(counts, 'disconnected: over maxHttpBufferSize');
        return;
      }
      const shown = JSON.stringify(reply);
      assert.doesNotMatch(shown, STACK_TRACE);
      assert.ok(DIRECT_REPLIES.has(reply.type as string), shown);
      if (reply.type === 'error') assertErrorShape(reply, shown);
      tally(counts, reply.type === 'error' ? `error ${String(reply.code)}` : (reply.type as string));
    });
    t.diagnostic(`socket.io replies: ${JSON.stringify(Object.fromEntries(counts))}`);
    s.close();
  });

  test('upgrades with random tokens, subprotocols and origins are refused with 401 before any socket opens', async (t) => {
    const counts = new Map<string, number>();
    const segment = fc.base64String({ maxLength: 60 }).map((s) => s.replace(/=+$/, ''));
    const junkToken = fc.oneof(
      fc.stringMatching(/^[\x21-\x7e]{0,80}$/),
      fc.tuple(segment, segment, segment).map((p) => p.join('.')),
      // A real header and payload with a forged signature, and tokens past the size the server reads.
      fc.string({ maxLength: 40 }).map((sig) => `${token.split('.').slice(0, 2).join('.')}.${Buffer.from(sig).toString('base64url')}`),
      fc.integer({ min: 8000, max: 20_000 }).map((n) => 'e'.repeat(n)),
    );
    const upgrade = fc.record({
      where: fc.constantFrom('query' as const, 'subprotocol' as const, 'both' as const),
      token: junkToken,
      protocols: fc.array(
        fc.stringMatching(/^[\x21-\x7e]{1,30}$/).filter((p) => !p.includes(',')),
        { maxLength: 3 },
      ),
      origin: fc.option(fc.stringMatching(/^[\x20-\x7e]{0,40}$/), { nil: undefined }),
    });
    await run('upgrades', upgrade, 200, async (u) => {
      const path = u.where === 'subprotocol' ? '/ws' : `/ws?token=${encodeURIComponent(u.token)}`;
      const protocols = [...u.protocols, ...(u.where === 'query' ? [] : [`bearer.${u.token}`])].join(', ');
      const headers: Record<string, string> = {
        connection: 'Upgrade',
        upgrade: 'websocket',
        'sec-websocket-version': '13',
        'sec-websocket-key': 'dGhlIHNhbXBsZSBub25jZQ==',
      };
      if (protocols !== '') headers['sec-websocket-protocol'] = protocols;
      if (u.origin !== undefined) headers.origin = u.origin;
      const status = await new Promise<{ code: number; body: string }>((resolve, reject) => {
        const req = http.request({ host: '127.0.0.1', port: server.port, path, headers });
        req.on('upgrade', (_res, socket) => {
          socket.destroy();
          reject(new Error('a junk token opened a socket'));
        });
        req.on('response', (res) => {
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (c: string) => (body += c));
          res.on('end', () => resolve({ code: res.statusCode ?? 0, body }));
        });
        req.on('error', reject);
        req.end();
      });
      tally(counts, String(status.code));
      assert.equal(status.code, 401, status.body);
      assert.equal((JSON.parse(status.body) as { error: { code: string } }).error.code, 'unauthorized');
      assert.equal(status.body.includes(u.token) && u.token.length > 3, false, 'the token is not echoed');
      assert.doesNotMatch(status.body, STACK_TRACE);
    });
    t.diagnostic(`upgrade statuses: ${JSON.stringify(Object.fromEntries(counts))}`);
  });

  test('raw engine.io packets that are not valid socket.io cannot crash the server', async () => {
    const packet = fc.oneof(
      fc.string({ unit: 'binary', maxLength: 60 }),
      fc.string({ maxLength: 60 }).map((s) => `42${s}`),
      fc.string({ maxLength: 60 }).map((s) => `4${s}`),
      fc.jsonValue({ maxDepth: 3 }).map((v) => `42${JSON.stringify(v)}`),
      fc.integer({ min: 1, max: 1500 }).map((n) => `421${'['.repeat(n)}"ping"${']'.repeat(n)}`),
    );
    await run('engine.io packets', packet, 150, async (junk) => {
      const raw = new WebSocket(`ws://127.0.0.1:${server.port}/socket.io/?EIO=4&transport=websocket`);
      const frames: string[] = [];
      // A junk packet can also leave the namespace ("41") and keep the connection: then nothing more comes.
      let timer: NodeJS.Timeout | undefined;
      const outcome = new Promise<'pong' | 'closed' | 'silent'>((resolve) => {
        timer = setTimeout(() => resolve('silent'), 1500);
        raw.on('message', (data) => {
          const f = data.toString();
          frames.push(f);
          if (f.startsWith('0')) raw.send(`40${JSON.stringify({ token })}`);
          else if (f.startsWith('40')) {
            raw.send(junk);
            raw.send('4299["ping",{"id":"after"}]');
          } else if (f.startsWith('4399')) resolve('pong');
        });
        raw.on('close', () => resolve('closed'));
        raw.on('error', () => resolve('closed'));
      });
      await outcome;
      clearTimeout(timer);
      raw.terminate();
      for (const f of frames) {
        assert.doesNotMatch(f, STACK_TRACE);
        assert.doesNotMatch(f, /"code":"internal"/);
      }
    });
  });

  test('over HTTP every request gets a documented status and error body, never internal', async (t) => {
    const counts = new Map<string, number>();
    const segment = fc.oneof(
      fc.string({ maxLength: 30 }).map((s) => encodeURIComponent(s)),
      fc.constantFrom('%', '%zz', '%E0%A4%A', '%00', '%2F..%2F', 'task_nope', 'LAST', 'LAST_CONVERSATION', 'c_0000000001', 'x'.repeat(300)),
    );
    const route = fc.oneof(
      fc.constant('/v1/chat'),
      fc.constant('/v1/chat'),
      fc.constant('/v1/chat'),
      segment.map((s) => `/v1/tasks/${s}`),
      segment.map((s) => `/v1/tasks/${s}/stream`),
      segment.map((s) => `/v1/conversations/${s}/messages`),
      fc.constant('/v1/requests'),
      segment.map((s) => `/v1/consumers/${s}/requests`),
      segment.map((s) => `/v1/consumers/${s}/bookings`),
      fc.constant('/api/chat'),
      segment.map((s) => `/api/chat/${s}/stream`),
      segment.map((s) => `/api/chat/${s}/stop`),
      segment.map((s) => `/v1/${s}`),
      segment.map((s) => `/${s}`),
      fc.constantFrom('/healthz', '/readyz', '/'),
    );
    const printable = fc.stringMatching(/^[\x20-\x7e]{0,40}$/);
    const query = fc.array(
      fc.tuple(fc.constantFrom('limit', 'cursor', 'before', 'status', 'category', 'user', 'lastEventId', 'token', 'x'), fc.oneof(text, printable)),
      { maxLength: 4 },
    );
    const auth = fc.oneof(
      { weight: 8, arbitrary: fc.constant('good') },
      { weight: 1, arbitrary: fc.constant('none') },
      { weight: 1, arbitrary: printable.map((s) => `Bearer ${s}`) },
    );
    const body = fc.oneof(
      { weight: 3, arbitrary: chatBodyLike.map((m) => JSON.stringify(m)) },
      { weight: 1, arbitrary: anyValue.map((v) => JSON.stringify(v) ?? '') },
      { weight: 1, arbitrary: fc.string({ unit: 'binary', maxLength: 200 }) },
      {
        weight: 1,
        arbitrary: fc.integer({ min: MAX_FRAME_BYTES - 10, max: MAX_FRAME_BYTES * 4 }).map((n) => JSON.stringify({ text: `${MARK}${'z'.repeat(n)}` })),
      },
    );
    const request = fc.record({
      // The route's own method most of the time (POST for /v1/chat, /api/chat and its stop, GET elsewhere), sometimes any other.
      method: fc.oneof(
        { weight: 5, arbitrary: fc.constant('own') },
        { weight: 2, arbitrary: fc.constantFrom('GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'HEAD') },
      ),
      route,
      query,
      auth,
      body,
      contentType: fc.constantFrom('application/json', 'application/json; charset=utf-8', 'text/plain', '', 'multipart/form-data; boundary=x'),
      ifNoneMatch: fc.option(printable, { nil: undefined }),
      lastEventId: fc.option(fc.oneof(printable, fc.nat().map(String)), { nil: undefined }),
    });
    await run('HTTP requests', request, 700, async (r) => {
      const routePath = r.route
        .split('/')
        .map((seg) => (seg === 'LAST' ? last.taskId : seg === 'LAST_CONVERSATION' ? last.conversationId : seg))
        .join('/');
      const url = new URL(`${server.http}${routePath}`);
      for (const [k, v] of r.query) url.searchParams.append(k, v);
      const headers: Record<string, string> = {};
      if (r.auth === 'good') headers.authorization = `Bearer ${token}`;
      else if (r.auth !== 'none') headers.authorization = r.auth;
      if (r.contentType !== '') headers['content-type'] = r.contentType;
      if (r.ifNoneMatch !== undefined) headers['if-none-match'] = r.ifNoneMatch;
      if (r.lastEventId !== undefined) headers['last-event-id'] = r.lastEventId;
      const posted = r.route === '/v1/chat' || (r.route.startsWith('/api/chat') && !r.route.endsWith('/stream'));
      const method = r.method === 'own' ? (posted ? 'POST' : 'GET') : r.method;
      const init: RequestInit = { method, headers, signal: AbortSignal.timeout(15_000) };
      if (method !== 'GET' && method !== 'HEAD') init.body = resolveIds(r.body, last);
      const res = await fetch(url, init);
      const payload = await res.text();
      tally(counts, String(res.status));
      assert.doesNotMatch(payload, STACK_TRACE);
      assert.ok(
        [200, 202, 204, 304, 400, 401, 403, 404, 405, 413, 429].includes(res.status),
        `${res.status} for ${method} ${url.pathname}: ${payload.slice(0, 200)}`,
      );
      if (url.pathname === '/v1' || url.pathname.startsWith('/v1/')) {
        assert.ok(res.headers.get('ratelimit-policy') && res.headers.get('ratelimit'), `RateLimit fields on ${res.status} for ${method} ${url.pathname}`);
      }
      // A wrong method on a known route: 405 with Allow, the one error whose status is not its code's (docs/protocol.md).
      if (res.status === 405) assert.match(res.headers.get('allow') ?? '', /^(GET|POST), OPTIONS$/);
      if (method === 'HEAD') assert.equal(payload, '', 'no content in an answer to HEAD');
      else if (res.status >= 400) {
        const error = (JSON.parse(payload) as { error: Record<string, unknown> }).error;
        assertErrorShape(error, payload);
        if (res.status === 405) assert.equal(error.code, 'bad_request', payload);
        else assert.equal(errorCatalogue[error.code as ErrorCode].status, res.status, payload);
      }
    });
    t.diagnostic(`HTTP statuses: ${JSON.stringify(Object.fromEntries(counts))}`);
  });

  test('another user chatting all through the fuzzing got every reply in full', async () => {
    const { chats, failures } = await chatter.stop();
    assert.deepEqual(failures, []);
    assert.ok(chats >= 3, `only ${chats} chats completed`);
    assert.equal((await fetch(`${server.http}/healthz`)).status, 200);
    const metrics = await (await fetch(`${server.http}/metrics`)).text();
    assert.doesNotMatch(metrics, /^chatwire_errors_total\{code="internal"\} [1-9]/m);
    assert.doesNotMatch(metrics, /^chatwire_worker_failures_total [1-9]/m);
  });

  test('neither the tokens nor the message texts appear in the logs', () => {
    const all = server.log.join('');
    assert.ok(server.log.length > 0, 'the log was captured');
    assert.equal(all.includes(token), false, 'the fuzzing user token');
    assert.equal(all.includes(chatterToken), false, 'the chatting user token');
    // The signature alone is what makes a token usable: not even that part may appear.
    assert.equal(all.includes(token.split('.')[2] as string), false);
    assert.equal(all.includes(SECRET), false, 'the secret');
    assert.equal(all.includes(MARK), false, 'message texts');
  });
});
