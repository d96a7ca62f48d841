import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, describe, it } from 'node:test';
import type { LimitDecision } from '../../src/chat/ports.js';
import { createRedisChatLimits } from '../../src/cluster/redis-buckets.js';
import type { RedisHub } from '../../src/cluster/redis.js';
import { createChatLimits } from '../../src/limits/chat-limits.js';
import { createRateLimits, type RateLimits } from '../../src/limits/rate-limits.js';
import { cutRedis, openTestRedis, redisTestOptions, restoreRedis } from '../helpers/redis.js';

/**
 * The chat limits as the chat service uses them, whichever implementation: answers may come at once or with a
 * Promise, and a reservation's settle and release may return one (awaited here so that the next check sees them).
 */
interface Limits {
  chat(userId: string): LimitDecision | Promise<LimitDecision>;
  reserveModelTokens(userId: string, maxTokens: number): Reserved | Promise<Reserved>;
  admit(userId: string, maxTokens: number | null): Admitted | Promise<Admitted>;
}
type Admitted =
  | { ok: true; reservation: { settle(used: number): void | Promise<void>; release(): void | Promise<void> } | null; info: LimitDecision['info'] }
  | Extract<LimitDecision, { ok: false }>;
type Reserved =
  | { ok: true; reservation: { settle(used: number): void | Promise<void>; release(): void | Promise<void> } }
  | Extract<LimitDecision, { ok: false }>;

interface Settings {
  chatsPerMinute: number;
  modelTokensPerMinute: number;
}

/** Two nodes' limits over one set of buckets (for the embedded limits, one process: the same object twice). */
type MakePair = (settings: Settings) => Promise<{ a: Limits; b: Limits; refused: string[] }>;

const localLimits = (settings: Settings): RateLimits => {
  const limits = createRateLimits({ messagesPerSecond: 50, maxConnectionsPerUser: 4, ...settings });
  after(() => limits.close());
  return limits;
};

let users = 0;
const newUser = () => `user-${++users}`;

async function reserve(limits: Limits, userId: string, maxTokens: number) {
  const r = await limits.reserveModelTokens(userId, maxTokens);
  if (!r.ok) assert.fail(`reserving ${maxTokens} tokens was refused: ${JSON.stringify(r)}`);
  return r.reservation;
}

async function refusal(limits: Limits, userId: string, maxTokens: number) {
  const r = await limits.reserveModelTokens(userId, maxTokens);
  if (r.ok) assert.fail(`reserving ${maxTokens} tokens was not refused`);
  return r;
}

function contract(name: string, makePair: MakePair, options: () => Promise<{ skip?: string }>): void {
  describe(`chat limits: ${name}`, async () => {
    const opts = await options();

    it('a user gets a burst of chatsPerMinute chats, then rate_limited with a retryAfterMs within one refill', opts, async () => {
      const { a, refused } = await makePair({ chatsPerMinute: 3, modelTokensPerMinute: 600 });
      const alice = newUser();
      const first = await a.chat(alice);
      assert.equal(first.ok, true);
      assert.deepEqual({ limit: first.info.limit, remaining: first.info.remaining }, { limit: 3, remaining: 2 });
      // One chat comes back every 20 s: the bucket is full again 20 s after the first is taken.
      assert.ok(first.info.resetMs > 0 && first.info.resetMs <= 20_000, `resetMs ${first.info.resetMs}`);
      assert.equal((await a.chat(alice)).info.remaining, 1);
      assert.equal((await a.chat(alice)).info.remaining, 0);
      const refusedChat = await a.chat(alice);
      assert.equal(refusedChat.ok, false);
      assert.ok(!refusedChat.ok);
      assert.equal(refusedChat.bucket, 'chats');
      assert.ok(refusedChat.retryAfterMs > 0 && refusedChat.retryAfterMs <= 20_000, `retryAfterMs ${refusedChat.retryAfterMs}`);
      assert.deepEqual({ limit: refusedChat.info.limit, remaining: refusedChat.info.remaining }, { limit: 3, remaining: 0 });
      assert.ok(refusedChat.info.resetMs >= refusedChat.retryAfterMs && refusedChat.info.resetMs <= 60_000);
      assert.deepEqual(refused, ['chats']);
      // Another user has buckets of its own.
      assert.equal((await a.chat(newUser())).info.remaining, 2);
    });

    it('a drained bucket refills at its rate: a reservation refused now passes once retryAfterMs has passed', opts, async () => {
      // 60 000 tokens a minute: one a millisecond.
      const { a } = await makePair({ chatsPerMinute: 3, modelTokensPerMinute: 60_000 });
      const bob = newUser();
      await reserve(a, bob, 60_000);
      let refused = await a.reserveModelTokens(bob, 200);
      // Each pass takes what dripped in meanwhile, so the bucket soon runs short of 200.
      for (let i = 0; i < 1000 && refused.ok; i++) refused = await a.reserveModelTokens(bob, 200);
      assert.ok(!refused.ok, 'never refused');
      assert.equal(refused.bucket, 'tokens');
      assert.ok(refused.retryAfterMs > 0 && refused.retryAfterMs <= 200, `retryAfterMs ${refused.retryAfterMs}`);
      await sleep(refused.retryAfterMs);
      assert.equal((await a.reserveModelTokens(bob, 200)).ok, true);
    });

    it('settle gives back the unused part of a reservation and release all of it; only the first of them counts', opts, async () => {
      // 60 tokens a minute: one a second, so the figures below hold for a second at least.
      const { a } = await makePair({ chatsPerMinute: 3, modelTokensPerMinute: 60 });
      const carol = newUser();
      const first = await reserve(a, carol, 50);
      assert.equal((await refusal(a, carol, 11)).info.remaining, 10);
      await first.settle(20);
      await first.settle(0);
      await first.release();
      assert.equal((await refusal(a, carol, 41)).info.remaining, 40);
      const second = await reserve(a, carol, 40);
      assert.equal((await refusal(a, carol, 1)).info.remaining, 0);
      await second.release();
      assert.equal((await refusal(a, carol, 41)).info.remaining, 40);
    });

    it('usage past a reservation is debt to wait out; a usage that is not a count is the whole reservation', opts, async () => {
      const { a } = await makePair({ chatsPerMinute: 3, modelTokensPerMinute: 60 });
      const dave = newUser();
      // maxTokens past the bucket: the whole bucket is reserved, and the rest of the usage is charged at settle.
      await (await reserve(a, dave, 100)).settle(100);
      const inDebt = await refusal(a, dave, 1);
      // 40 tokens of debt, then one token: 41 s at one a second.
      assert.ok(inDebt.retryAfterMs > 39_000 && inDebt.retryAfterMs <= 41_000, `retryAfterMs ${inDebt.retryAfterMs}`);
      assert.equal(inDebt.info.remaining, 0);
      const erin = newUser();
      await (await reserve(a, erin, 10)).settle(Number.NaN);
      assert.equal((await refusal(a, erin, 51)).info.remaining, 50);
      // A usage above maxTokens is charged as maxTokens.
      const frank = newUser();
      await (await reserve(a, frank, 10)).settle(1e12);
      assert.equal((await refusal(a, frank, 51)).info.remaining, 50);
    });

    it("admit takes a send's tokens, then one chat; a refused chat gives the tokens back, a refused reservation takes no chat", opts, async () => {
      const { a, b, refused } = await makePair({ chatsPerMinute: 2, modelTokensPerMinute: 60 });
      const jack = newUser();
      const first = await a.admit(jack, 25);
      assert.ok(first.ok);
      // The chats bucket's state, as the ack carries it.
      assert.deepEqual({ limit: first.info.limit, remaining: first.info.remaining }, { limit: 2, remaining: 1 });
      assert.equal((await refusal(b, jack, 36)).info.remaining, 35);
      // More tokens than are left: refused by the tokens bucket, and no chat is taken.
      const tooMany = await b.admit(jack, 36);
      assert.ok(!tooMany.ok);
      assert.equal(tooMany.bucket, 'tokens');
      assert.equal(tooMany.info.remaining, 35);
      // A cache hit reserves no tokens.
      const hit = await b.admit(jack, null);
      assert.ok(hit.ok);
      assert.equal(hit.reservation, null);
      assert.equal(hit.info.remaining, 0);
      assert.equal((await refusal(a, jack, 36)).info.remaining, 35);
      // No chat left: refused by the chats bucket, and the tokens it would have reserved are back.
      const noChat = await a.admit(jack, 30);
      assert.ok(!noChat.ok);
      assert.equal(noChat.bucket, 'chats');
      assert.ok(noChat.retryAfterMs > 0 && noChat.retryAfterMs <= 30_000, `retryAfterMs ${noChat.retryAfterMs}`);
      assert.equal((await refusal(b, jack, 36)).info.remaining, 35);
      // The reservation of an admitted send settles like any other.
      await first.reservation?.settle(5);
      assert.equal((await refusal(b, jack, 56)).info.remaining, 55);
      assert.deepEqual(refused, ['tokens', 'tokens', 'tokens', 'chats', 'tokens', 'tokens']);
    });

    it("two nodes charge one user's buckets together", opts, async () => {
      const { a, b } = await makePair({ chatsPerMinute: 3, modelTokensPerMinute: 60 });
      const gina = newUser();
      assert.equal((await a.chat(gina)).ok, true);
      assert.equal((await b.chat(gina)).ok, true);
      assert.equal((await a.chat(gina)).info.remaining, 0);
      assert.equal((await b.chat(gina)).ok, false);
      const all = await reserve(a, gina, 60);
      assert.equal((await refusal(b, gina, 1)).info.remaining, 0);
      await all.release();
      assert.equal((await b.reserveModelTokens(gina, 60)).ok, true);
    });
  });
}

contract(
  'embedded',
  async (settings) => {
    const refused: string[] = [];
    const limits = createChatLimits(localLimits(settings), (bucket) => refused.push(bucket));
    return { a: limits, b: limits, refused };
  },
  async () => ({}),
);

async function redisNodes(settings: Settings, onFallback?: (reason: string) => void) {
  const hubA = await openTestRedis();
  // Two nodes of one cluster share the prefix.
  const hubB = await openTestRedis({ prefix: hubA.prefix });
  const refused: string[] = [];
  const node = (hub: RedisHub) =>
    createRedisChatLimits({ hub, local: localLimits(settings), ...settings, refused: (bucket) => refused.push(bucket), ...(onFallback ? { onFallback } : {}) });
  return { a: node(hubA), b: node(hubB), refused, hubA };
}

contract('Redis', redisNodes, redisTestOptions);

describe('chat limits over Redis', async () => {
  const opts = await redisTestOptions();

  it('a bucket is a key only while it is not full: it expires when it would be full again', opts, async () => {
    const { a, hubA } = await redisNodes({ chatsPerMinute: 3, modelTokensPerMinute: 60 });
    const hank = newUser();
    await a.chat(hank);
    const ttl = await hubA.command.pttl(hubA.key(`bucket:chats:${hank}`));
    assert.ok(ttl > 0 && ttl <= 20_000, `PTTL ${ttl}`);
    const r = await reserve(a, hank, 60);
    assert.equal(await hubA.command.exists(hubA.key(`bucket:tokens:${hank}`)), 1);
    await r.release();
    assert.equal(await hubA.command.exists(hubA.key(`bucket:tokens:${hank}`)), 0);
  });

  it('while Redis is down a node decides with its own buckets, and with the shared ones once Redis answers again', opts, async () => {
    const reasons: string[] = [];
    const { a, hubA } = await redisNodes({ chatsPerMinute: 3, modelTokensPerMinute: 60 }, (reason) => reasons.push(reason));
    const ivy = newUser();
    for (let i = 0; i < 3; i++) assert.equal((await a.chat(ivy)).ok, true);
    assert.equal((await a.chat(ivy)).ok, false);
    const held = await reserve(a, ivy, 60);
    assert.deepEqual(reasons, []);

    await cutRedis(hubA);
    // The node's own buckets were never charged: the chats keep flowing, limited by this node alone.
    const local = await a.chat(ivy);
    assert.deepEqual({ ok: local.ok, remaining: local.info.remaining }, { ok: true, remaining: 2 });
    const localTokens = await reserve(a, ivy, 60);
    assert.equal((await refusal(a, ivy, 1)).bucket, 'tokens');
    // A reservation made in Redis cannot be settled there now: it is not an error, the bucket refills on its own.
    await held.settle(10);
    await localTokens.release();
    // admit too: this node's own buckets (one chat of three taken above), the tokens given back when its chats bucket refuses.
    const one = await a.admit(ivy, 30);
    const two = await a.admit(ivy, 30);
    assert.ok(one.ok);
    assert.ok(two.ok);
    assert.deepEqual([one.info.remaining, two.info.remaining], [1, 0]);
    await two.reservation?.release();
    const noLocalChat = await a.admit(ivy, 30);
    assert.ok(!noLocalChat.ok);
    assert.equal(noLocalChat.bucket, 'chats');
    await one.reservation?.release();
    assert.equal((await a.reserveModelTokens(ivy, 60)).ok, true);
    assert.ok(reasons.length > 0 && reasons.every((r) => r === 'buckets: Redis is down'), JSON.stringify(reasons));

    await restoreRedis(hubA);
    // Redis's buckets again: the chats bucket there is still empty, and so is the tokens bucket.
    assert.equal((await a.chat(ivy)).ok, false);
    assert.equal((await a.reserveModelTokens(ivy, 30)).ok, false);
    assert.equal((await a.admit(ivy, null)).ok, false);
  });
});
