import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, it } from 'node:test';
import { pino } from 'pino';
import { createChatCache } from '../../src/cache/chat-cache.js';
import { openResponseCache, type ResponseCache } from '../../src/cache/response-cache.js';
import type { CachedReply } from '../../src/chat/ports.js';
import type { RedisHub } from '../../src/cluster/redis.js';
import { createTieredChatCache, type TieredChatCache } from '../../src/cluster/tiered-cache.js';
import type { ModelRequest } from '../../src/llm/provider.js';
import { cutRedis, openTestRedis, redisTestOptions, restoreRedis } from '../helpers/redis.js';

const TTL_MS = 60 * 60_000;

/** The reply cache as the chat service uses it, whichever implementation (get answers at once or with a Promise). */
interface Cache {
  keyOf(request: ModelRequest): string | null;
  get(key: string): CachedReply | undefined | Promise<CachedReply | undefined>;
  put(key: string, reply: CachedReply): void | Promise<void>;
}

/** A node's first level: the LMDB cache in a directory of its own, closed and removed when the file ends. */
function firstLevel(): { chat: ReturnType<typeof createChatCache>; store: ResponseCache } {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-tiered-'));
  const store = openResponseCache({ path: path.join(dir, 'cache'), ttlMs: TTL_MS, maxBytes: 16 * 1024 * 1024 });
  after(async () => {
    await store.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  // An upstream provider: only temperature 0 is reproducible.
  return { chat: createChatCache({ cache: store, provider: 'openai', backend: 'http://upstream', model: 'm1', log: pino({ level: 'silent' }) }), store };
}

let asked = 0;
/** A request no other test asks. */
function request(temperature = 0): ModelRequest {
  asked += 1;
  return { model: 'm1', temperature, maxTokens: 16, messages: [{ role: 'user', content: `question ${asked}` }] };
}

const reply = (text: string): CachedReply => ({ chunks: [text, ' and', ' more'], finishReason: 'stop', usage: { promptTokens: 3, completionTokens: 3 } });

/** What a hit serves (an embedded hit also carries the stored entry's model and createdAt). */
function served(hit: CachedReply | undefined): CachedReply | undefined {
  return hit && { chunks: hit.chunks, finishReason: hit.finishReason, usage: hit.usage };
}

/** Two nodes' caches (for the embedded cache, one process: the same object twice). */
type MakePair = () => Promise<{ a: Cache; b: Cache }>;

function keyOf(cache: Cache, r: ModelRequest): string {
  const key = cache.keyOf(r);
  assert.ok(key !== null);
  return key;
}

function contract(name: string, makePair: MakePair, options: () => Promise<{ skip?: string }>): void {
  describe(`reply cache: ${name}`, async () => {
    const opts = await options();

    it('only a reproducible request has a key, the same on every node', opts, async () => {
      const { a, b } = await makePair();
      const r = request();
      assert.equal(a.keyOf(r), b.keyOf(r));
      assert.match(keyOf(a, r), /^[0-9a-f]{64}$/);
      assert.equal(a.keyOf(request(1)), null);
    });

    it('a reply put on one node is a hit with its chunks, finish reason and usage on every node; others miss', opts, async () => {
      const { a, b } = await makePair();
      const key = keyOf(a, request());
      assert.equal(await b.get(key), undefined);
      await a.put(key, reply('hello'));
      assert.deepEqual(served(await a.get(key)), reply('hello'));
      assert.deepEqual(served(await b.get(key)), reply('hello'));
      assert.equal(await b.get(keyOf(a, request())), undefined);
    });

    it('a put replaces the reply under its key', opts, async () => {
      const { a, b } = await makePair();
      const key = keyOf(a, request());
      await a.put(key, reply('first'));
      await a.put(key, reply('second'));
      assert.deepEqual(served(await b.get(key)), reply('second'));
    });
  });
}

contract(
  'embedded',
  async () => {
    const { chat } = firstLevel();
    return { a: chat, b: chat };
  },
  async () => ({}),
);

interface Node {
  cache: TieredChatCache;
  store: ResponseCache;
  hub: RedisHub;
  reasons: string[];
}

async function redisNode(prefix?: string, maxValueBytes?: number): Promise<Node> {
  const hub = await openTestRedis(prefix === undefined ? {} : { prefix });
  const { chat, store } = firstLevel();
  const reasons: string[] = [];
  const cache = createTieredChatCache({
    first: chat,
    hub,
    ttlMs: TTL_MS,
    model: 'm1',
    ...(maxValueBytes === undefined ? {} : { maxValueBytes }),
    onFallback: (reason) => reasons.push(reason),
  });
  return { cache, store, hub, reasons };
}

/** Two nodes of one cluster: one Redis prefix, an LMDB directory each. */
async function redisNodes(maxValueBytes?: number): Promise<[Node, Node]> {
  const a = await redisNode(undefined, maxValueBytes);
  return [a, await redisNode(a.hub.prefix, maxValueBytes)];
}

contract(
  'LMDB + Redis',
  async () => {
    const [a, b] = await redisNodes();
    return { a: a.cache, b: b.cache };
  },
  redisTestOptions,
);

describe('reply cache: LMDB + Redis', async () => {
  const opts = await redisTestOptions();

  it("a reply found in Redis is copied to the node's own cache, which serves it without Redis", opts, async () => {
    const [a, b] = await redisNodes();
    const key = keyOf(a.cache, request());
    await a.cache.put(key, reply('shared'));
    assert.equal(b.store.stats().entries, 0);
    assert.deepEqual(served(await b.cache.get(key)), reply('shared'));
    assert.equal(b.store.stats().entries, 1);
    await cutRedis(b.hub);
    assert.deepEqual(served(await b.cache.get(key)), reply('shared'));
    assert.deepEqual(b.reasons, []);
    await restoreRedis(b.hub);
  });

  it('a value in Redis that is not a reply is a miss', opts, async () => {
    const [a, b] = await redisNodes();
    const garbled = keyOf(a.cache, request());
    const misshapen = keyOf(a.cache, request());
    await a.hub.command.set(a.hub.key(`reply:${garbled}`), '{"chunks":["half');
    await a.hub.command.set(a.hub.key(`reply:${misshapen}`), JSON.stringify({ ...reply('x'), finishReason: 'cancelled', model: 'm1', createdAt: 1 }));
    assert.equal(await b.cache.get(garbled), undefined);
    assert.equal(await b.cache.get(misshapen), undefined);
    assert.equal(b.store.stats().entries, 0);
  });

  it('a reply expires from Redis after the cache TTL, and one over maxValueBytes stays on its node', opts, async () => {
    const [a, b] = await redisNodes(1024);
    const small = keyOf(a.cache, request());
    await a.cache.put(small, reply('small'));
    const ttl = await a.hub.command.pttl(a.hub.key(`reply:${small}`));
    assert.ok(ttl > 0 && ttl <= TTL_MS, `PTTL ${ttl}`);
    const large = keyOf(a.cache, request());
    await a.cache.put(large, reply('x'.repeat(2000)));
    assert.equal(await a.hub.command.exists(a.hub.key(`reply:${large}`)), 0);
    assert.deepEqual(served(await a.cache.get(large)), reply('x'.repeat(2000)));
    assert.equal(await b.cache.get(large), undefined);
  });

  it("while Redis is down a node's own cache alone answers, and the nodes share again once it is back", opts, async () => {
    const [a, b] = await redisNodes();
    await cutRedis(a.hub);
    const key = keyOf(a.cache, request());
    await a.cache.put(key, reply('alone'));
    assert.deepEqual(served(await a.cache.get(key)), reply('alone'));
    assert.equal(await a.cache.get(keyOf(a.cache, request())), undefined);
    assert.equal(await b.cache.get(key), undefined);
    assert.ok(a.reasons.length > 0 && a.reasons.every((r) => r === 'reply cache: Redis is down'), JSON.stringify(a.reasons));
    await restoreRedis(a.hub);
    await a.cache.put(key, reply('together'));
    assert.deepEqual(served(await b.cache.get(key)), reply('together'));
  });
});
