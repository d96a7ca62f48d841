import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { createLocalBus, createRedisBus, type NodeBus } from '../../src/cluster/bus.js';
import { openTestRedis, redisTestOptions } from '../helpers/redis.js';

function collect(bus: NodeBus, channel: string): { got: string[]; off: () => void; next: () => Promise<string> } {
  const got: string[] = [];
  const waiters: ((m: string) => void)[] = [];
  const off = bus.subscribe(channel, (m) => {
    got.push(m);
    waiters.shift()?.(m);
  });
  return { got, off, next: () => new Promise((resolve) => waiters.push(resolve)) };
}

const settle = () => new Promise((resolve) => setTimeout(resolve, 100));

function contract(name: string, makePair: () => Promise<[NodeBus, NodeBus]>, options: () => Promise<{ skip?: string }>): void {
  describe(`node bus: ${name}`, async () => {
    const opts = await options();

    it('delivers to every listener of a channel, on every node, and to no other channel', opts, async () => {
      const [a, b] = await makePair();
      const onA = collect(a, 'task:1');
      const onB1 = collect(b, 'task:1');
      const onB2 = collect(b, 'task:1');
      const other = collect(b, 'task:2');
      await Promise.all([a.subscribed(), b.subscribed()]);
      const arrived = Promise.all([onA.next(), onB1.next(), onB2.next()]);
      assert.equal(await a.publish('task:1', 'hello'), true);
      assert.deepEqual(await arrived, ['hello', 'hello', 'hello']);
      await settle();
      assert.deepEqual(other.got, []);
      for (const c of [onA, onB1, onB2, other]) c.off();
    });

    it('stops delivering once a listener unsubscribes, and a throwing listener does not stop the others', opts, async () => {
      const [a, b] = await makePair();
      const kept = collect(b, 'c');
      const dropped = collect(b, 'c');
      const off = b.subscribe('c', () => {
        throw new Error('listener failure');
      });
      await b.subscribed();
      dropped.off();
      const arrived = kept.next();
      await a.publish('c', 'one');
      assert.equal(await arrived, 'one');
      await settle();
      assert.deepEqual(dropped.got, []);
      off();
      kept.off();
    });
  });
}

contract(
  'local',
  async () => {
    const bus = createLocalBus();
    return [bus, bus];
  },
  async () => ({}),
);

contract(
  'Redis',
  async () => {
    const hubA = await openTestRedis();
    // Two nodes of one cluster share the prefix.
    const hubB = await openTestRedis({ prefix: hubA.prefix });
    return [createRedisBus(hubA), createRedisBus(hubB)];
  },
  redisTestOptions,
);

describe('node bus over Redis: one subscription per node', async () => {
  const opts = await redisTestOptions();
  it('subscribes to a channel once however many local listeners it has, and unsubscribes after the last', opts, async () => {
    const hub = await openTestRedis();
    const bus = createRedisBus(hub);
    const subscribers = async () => Number(((await hub.command.call('PUBSUB', 'NUMSUB', hub.key('busy'))) as [string, number])[1]);
    const offs = Array.from({ length: 50 }, () => bus.subscribe('busy', () => {}));
    // The SUBSCRIBE commands are sent in order: once a PING behind them answers, they have been applied.
    await bus.subscribed();
    assert.equal(await subscribers(), 1);
    for (const off of offs) off();
    await bus.subscribed();
    assert.equal(await subscribers(), 0);
    bus.close();
  });

  it('tells its listeners to resync after the subscriber connection is cut and comes back', opts, async () => {
    const hub = await openTestRedis();
    const bus = createRedisBus(hub);
    const resynced = new Promise<void>((resolve) => bus.onResync(resolve));
    const onC = collect(bus, 'after-cut');
    await bus.subscribed();
    // The connection drops (as when Redis restarts) and ioredis reconnects it.
    hub.subscriber.disconnect(true);
    await resynced;
    await bus.subscribed();
    const arrived = onC.next();
    await bus.publish('after-cut', 'still here');
    assert.equal(await arrived, 'still here');
    bus.close();
  });
});
