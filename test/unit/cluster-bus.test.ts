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

  it('a subscribe made the moment the subscriber connection comes up takes effect without cutting it', opts, async () => {
    const hub = await openTestRedis();
    const bus = createRedisBus(hub);
    const errors: string[] = [];
    hub.subscriber.on('error', (err: Error) => errors.push(err.message));
    let cuts = 0;
    const offResync = bus.onResync(() => cuts++);
    // Subscribed between the socket's connect and its ready: ioredis sends the SUBSCRIBE at once.
    const early = await new Promise<ReturnType<typeof collect>>((resolve) => {
      hub.subscriber.once('connect', () => resolve(collect(bus, 'early')));
      hub.subscriber.disconnect(true);
    });
    await bus.subscribed();
    const arrived = early.next();
    assert.equal(await bus.publish('early', 'first message'), true);
    assert.equal(await arrived, 'first message');
    await settle();
    assert.deepEqual(errors, []);
    // The one reconnect is the one this test made.
    assert.equal(cuts, 1);
    early.off();
    offResync();
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
