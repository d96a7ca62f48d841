import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, describe, it } from 'node:test';
import { createMemoryClaimStore, type ClaimStore } from '../../src/cluster/claims.js';
import { createRedisClaimStore } from '../../src/cluster/redis-claims.js';
import type { RedisHub } from '../../src/cluster/redis.js';
import { cutRedis, openTestRedis, redisTestOptions, restoreRedis } from '../helpers/redis.js';

/** Two nodes' claim stores over one set of claims (for the memory store, one process: the same object twice). */
type MakePair = () => Promise<[ClaimStore, ClaimStore]>;

let keys = 0;
const newKey = () => `flight:${++keys}`;

function contract(name: string, makePair: MakePair, options: () => Promise<{ skip?: string }>): void {
  describe(`claims: ${name}`, async () => {
    const opts = await options();

    it('of many claims on one key at once, on two nodes, exactly one wins and the others learn its holder', opts, async () => {
      const [a, b] = await makePair();
      const key = newKey();
      const results = await Promise.all(Array.from({ length: 20 }, (_, i) => (i % 2 === 0 ? a : b).claim(key, `task-${i}`, 10_000)));
      const winners = results.flatMap((r, i) => (r.won ? [`task-${i}`] : []));
      assert.equal(winners.length, 1);
      for (const r of results) if (!r.won) assert.equal(r.holder, winners[0]);
      // Other keys are free.
      assert.deepEqual(await b.claim(newKey(), 'other', 10_000), { won: true });
    });

    it('only the holder releases a claim; then anyone may take it', opts, async () => {
      const [a, b] = await makePair();
      const key = newKey();
      assert.deepEqual(await a.claim(key, 'holder', 10_000), { won: true });
      assert.equal(await b.release(key, 'not-the-holder'), false);
      assert.deepEqual(await b.claim(key, 'second', 10_000), { won: false, holder: 'holder' });
      assert.equal(await a.release(key, 'holder'), true);
      assert.equal(await a.release(key, 'holder'), false);
      assert.deepEqual(await b.claim(key, 'second', 10_000), { won: true });
    });

    it('a claim lapses after its TTL unless its holder refreshes it', opts, async () => {
      const [a, b] = await makePair();
      const lapsing = newKey();
      const refreshed = newKey();
      assert.deepEqual(await a.claim(lapsing, 'first', 100), { won: true });
      assert.deepEqual(await a.claim(refreshed, 'first', 100), { won: true });
      assert.equal(await b.refresh(refreshed, 'not-the-holder', 10_000), false);
      assert.equal(await a.refresh(refreshed, 'first', 10_000), true);
      await sleep(250);
      assert.deepEqual(await b.claim(lapsing, 'second', 10_000), { won: true });
      assert.deepEqual(await b.claim(refreshed, 'second', 10_000), { won: false, holder: 'first' });
      // A lapsed claim cannot be refreshed back by its old holder.
      assert.equal(await a.refresh(lapsing, 'first', 10_000), false);
    });
  });
}

contract(
  'memory',
  async () => {
    const store = createMemoryClaimStore();
    after(() => store.close());
    return [store, store];
  },
  async () => ({}),
);

async function redisNode(prefix?: string): Promise<{ store: ClaimStore; hub: RedisHub; reasons: string[] }> {
  const hub = await openTestRedis(prefix === undefined ? {} : { prefix });
  const reasons: string[] = [];
  const store = createRedisClaimStore({ hub, onFallback: (reason) => reasons.push(reason) });
  after(() => store.close());
  return { store, hub, reasons };
}

contract(
  'Redis',
  async () => {
    const a = await redisNode();
    const b = await redisNode(a.hub.prefix);
    return [a.store, b.store];
  },
  redisTestOptions,
);

describe('claims over Redis', async () => {
  const opts = await redisTestOptions();

  it("while Redis is down claims are the node's own; the node's claim still stands once Redis is back", opts, async () => {
    const a = await redisNode();
    const b = await redisNode(a.hub.prefix);
    const key = newKey();
    await cutRedis(a.hub);
    // Single-flight per node: node A decides alone, node B (which reaches Redis) knows nothing of it.
    const results = await Promise.all([a.store.claim(key, 'a-1', 10_000), a.store.claim(key, 'a-2', 10_000)]);
    assert.deepEqual(results, [{ won: true }, { won: false, holder: 'a-1' }]);
    assert.deepEqual(await b.store.claim(key, 'b-1', 10_000), { won: true });
    assert.ok(a.reasons.length > 0 && a.reasons.every((r) => r === 'claims: Redis is down'), JSON.stringify(a.reasons));
    await restoreRedis(a.hub);
    // Back on Redis, node A does not start a second holder of a key it holds itself.
    assert.deepEqual(await a.store.claim(key, 'a-3', 10_000), { won: false, holder: 'a-1' });
    assert.equal(await a.store.release(key, 'a-1'), true);
    assert.deepEqual(await a.store.claim(key, 'a-3', 10_000), { won: false, holder: 'b-1' });
  });
});
