import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, describe, it } from 'node:test';
import { createRedisConnectionQuota, type SharedConnectionQuota } from '../../src/cluster/redis-connections.js';
import type { RedisHub } from '../../src/cluster/redis.js';
import { connectionQuota, type ConnectionAdmission } from '../../src/limits/chat-limits.js';
import { createRateLimits, type RateLimits } from '../../src/limits/rate-limits.js';
import { cutRedis, openTestRedis, redisTestOptions, restoreRedis } from '../helpers/redis.js';

/** The connection cap as the transports use it, whichever implementation (answers at once or with a Promise). */
interface Quota {
  opened(userId: string): ConnectionAdmission | Promise<ConnectionAdmission>;
  closed(userId: string): void | Promise<void>;
}

/** Two nodes' caps over one count (for the embedded cap, one process: the same object twice). */
type MakePair = (maxConnectionsPerUser: number) => Promise<{ a: Quota; b: Quota }>;

const localLimits = (maxConnectionsPerUser: number): RateLimits => {
  const limits = createRateLimits({ messagesPerSecond: 50, chatsPerMinute: 60, modelTokensPerMinute: 1000, maxConnectionsPerUser });
  after(() => limits.close());
  return limits;
};

let users = 0;
const newUser = () => `user-${++users}`;

async function opens(quota: Quota, userId: string): Promise<boolean> {
  return (await quota.opened(userId)).ok;
}

function contract(name: string, makePair: MakePair, options: () => Promise<{ skip?: string }>): void {
  describe(`connection cap: ${name}`, async () => {
    const opts = await options();

    it('a user holds at most maxConnectionsPerUser connections on all nodes together; a close frees one', opts, async () => {
      const { a, b } = await makePair(3);
      const alice = newUser();
      assert.deepEqual([await opens(a, alice), await opens(b, alice), await opens(a, alice)], [true, true, true]);
      const refused = await b.opened(alice);
      assert.ok(!refused.ok);
      assert.equal(refused.error.code, 'rate_limited');
      assert.equal(refused.error.message, 'too many connections for this user: 3 open, at most 3 allowed');
      assert.equal(await opens(a, alice), false);
      // Another user has a cap of its own.
      assert.equal(await opens(b, newUser()), true);
      await a.closed(alice);
      assert.equal(await opens(b, alice), true);
      assert.equal(await opens(a, alice), false);
    });

    it('a close that was never counted (of a user with no connection, or reported twice) frees nothing', opts, async () => {
      const { a, b } = await makePair(1);
      const bob = newUser();
      assert.equal(await opens(a, bob), true);
      assert.equal(await opens(b, bob), false);
      await b.closed(newUser());
      assert.equal(await opens(b, bob), false);
      await a.closed(bob);
      await a.closed(bob);
      assert.equal(await opens(b, bob), true);
      assert.equal(await opens(a, bob), false);
    });
  });
}

contract(
  'embedded',
  async (max) => {
    const quota = connectionQuota(localLimits(max));
    return { a: quota, b: quota };
  },
  async () => ({}),
);

interface Node {
  quota: SharedConnectionQuota;
  hub: RedisHub;
  reasons: string[];
}

async function redisNode(max: number, nodeId: string, prefix?: string, nodeTtlMs?: number): Promise<Node> {
  const hub = await openTestRedis(prefix === undefined ? {} : { prefix });
  const reasons: string[] = [];
  const quota = createRedisConnectionQuota({
    hub,
    local: localLimits(max),
    nodeId,
    ...(nodeTtlMs === undefined ? {} : { nodeTtlMs }),
    onFallback: (reason) => reasons.push(reason),
  });
  after(() => quota.close());
  return { quota, hub, reasons };
}

/** Two nodes of one cluster: one prefix, a node id each. */
async function redisNodes(max: number, nodeTtlMs?: number): Promise<[Node, Node]> {
  const a = await redisNode(max, 'node-a', undefined, nodeTtlMs);
  return [a, await redisNode(max, 'node-b', a.hub.prefix, nodeTtlMs)];
}

contract(
  'Redis',
  async (max) => {
    const [a, b] = await redisNodes(max);
    return { a: a.quota, b: b.quota };
  },
  redisTestOptions,
);

describe('connection cap over Redis', async () => {
  const opts = await redisTestOptions();

  it('the connections of a node that died stop counting once its liveness lapses', opts, async () => {
    const [a, b] = await redisNodes(2, 300);
    const carol = newUser();
    assert.equal(await opens(a.quota, carol), true);
    assert.equal(await opens(a.quota, carol), true);
    assert.equal(await opens(b.quota, carol), false);
    // Node A is gone without a word: no heartbeat, no close.
    await a.hub.close();
    await sleep(600);
    assert.equal(await b.hub.command.exists(b.hub.key('conns:node-a')), 0);
    assert.equal(await opens(b.quota, carol), true);
    assert.equal(await opens(b.quota, carol), true);
    const third = await b.quota.opened(carol);
    assert.ok(!third.ok);
    assert.equal(third.error.message, 'too many connections for this user: 2 open, at most 2 allowed');
  });

  it("a close reported on a node that holds none of the user's connections frees nothing", opts, async () => {
    const [a, b] = await redisNodes(1);
    const hank = newUser();
    assert.equal(await opens(a.quota, hank), true);
    assert.equal(await opens(b.quota, hank), false);
    await b.quota.closed(hank);
    assert.equal(await opens(b.quota, hank), false);
    assert.equal(await opens(a.quota, hank), false);
  });

  it('a node that stops takes its connections out of the count', opts, async () => {
    const [a, b] = await redisNodes(2);
    const dave = newUser();
    assert.equal(await opens(a.quota, dave), true);
    assert.equal(await opens(a.quota, dave), true);
    await a.quota.close();
    assert.equal(await opens(b.quota, dave), true);
  });

  it('while Redis is down a node holds its own cap; once Redis is back it registers its connections as they are then', opts, async () => {
    const [a, b] = await redisNodes(3);
    const erin = newUser();
    assert.equal(await opens(a.quota, erin), true);
    assert.equal(await opens(a.quota, erin), true);
    assert.deepEqual(a.reasons, []);

    await cutRedis(a.hub);
    await a.quota.closed(erin);
    await a.quota.closed(erin);
    assert.equal(await opens(a.quota, erin), true);
    // Alone, the node counts only its own connections against the cap.
    assert.equal(await opens(a.quota, erin), true);
    assert.equal(await opens(a.quota, erin), true);
    assert.equal(await opens(a.quota, erin), false);
    await a.quota.closed(erin);
    await a.quota.closed(erin);
    assert.ok(a.reasons.length > 0 && a.reasons.every((r) => r === 'connections: Redis is down'), JSON.stringify(a.reasons));

    await restoreRedis(a.hub);
    assert.equal(await a.quota.resync(), true);
    // Node A holds one connection now (Redis had two before the cut): node B gets the other two.
    assert.equal(await opens(b.quota, erin), true);
    assert.equal(await opens(b.quota, erin), true);
    assert.equal(await opens(b.quota, erin), false);
    assert.equal(await opens(a.quota, erin), false);
  });

  it('a node whose entries lapsed (it could not refresh them in time) registers its connections again', opts, async () => {
    const [a, b] = await redisNodes(3);
    const frank = newUser();
    const gina = newUser();
    assert.equal(await opens(a.quota, frank), true);
    assert.equal(await opens(a.quota, frank), true);
    // What a lapse leaves: node A's count and liveness are gone from Redis.
    await a.hub.command.del(a.hub.key('conns:node-a'));
    await a.hub.command.zrem(a.hub.key('conn-nodes'), 'node-a');
    // Node A's next command finds it out, and it registers every count it holds again.
    assert.equal(await opens(a.quota, gina), true);
    assert.equal(await a.quota.resync(), true);
    assert.equal(await opens(b.quota, frank), true);
    assert.equal(await opens(b.quota, frank), false);
  });
});
