import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { describe, it } from 'node:test';
import { setImmediate as nextTurn, setTimeout as sleep } from 'node:timers/promises';
import { createRedisBus, type NodeBus } from '../../src/cluster/bus.js';
import { createMemoryTaskLog, MemoryTaskRecords } from '../../src/cluster/memory-task-log.js';
import type { RedisHub } from '../../src/cluster/redis.js';
import { createRedisTaskLog, taskLogKeys } from '../../src/cluster/redis-task-log.js';
import {
  NODE_LOST_WITHIN_MS,
  type TaskLog,
  type TaskLogMeta,
  type TaskLogOptions,
  type TaskLogTerminal,
  type TaskLogWriter,
} from '../../src/cluster/task-log.js';
import type { ChatDone, ChatError } from '../../src/protocol/index.js';
import { openTestRedis, redisTestOptions } from '../helpers/redis.js';

type NodeOptions = Partial<Omit<TaskLogOptions, 'nodeId'>>;

/** Nodes of one cluster: each a task log of its own over shared records (memory) or one key prefix (Redis). */
interface Cluster {
  node(options?: NodeOptions): Promise<TaskLog>;
  close(): Promise<void>;
}

interface RedisNode {
  log: TaskLog;
  hub: RedisHub;
  bus: NodeBus;
}

function memoryCluster(): Cluster {
  const records = new MemoryTaskRecords();
  const logs: TaskLog[] = [];
  return {
    async node(options = {}) {
      const log = createMemoryTaskLog({ records, nodeId: newId('node'), retentionMs: 60_000, ...options });
      logs.push(log);
      return log;
    },
    async close() {
      await Promise.all(logs.map((l) => l.close()));
    },
  };
}

/** Redis nodes: each its own hub (connections) and bus, all on one prefix. */
async function redisCluster(): Promise<Cluster & { redisNode(options?: NodeOptions): Promise<RedisNode> }> {
  const first = await openTestRedis();
  const nodes: RedisNode[] = [];
  const redisNode = async (options: NodeOptions = {}) => {
    const hub = nodes.length === 0 ? first : await openTestRedis({ prefix: first.prefix });
    const bus = createRedisBus(hub);
    const log = createRedisTaskLog({ hub, bus, nodeId: newId('node'), retentionMs: 60_000, ...options });
    const node = { log, hub, bus };
    nodes.push(node);
    return node;
  };
  return {
    redisNode,
    node: async (options) => (await redisNode(options)).log,
    async close() {
      await Promise.all(nodes.map((n) => n.log.close()));
      for (const n of nodes) n.bus.close();
    },
  };
}

const newId = (prefix: string) => `${prefix}_${crypto.randomBytes(12).toString('base64url')}`;

function taskMeta(): TaskLogMeta {
  return { taskId: newId('task'), userId: newId('user'), conversationId: newId('conv'), createdAt: Date.now() - 1000 };
}

function done(taskId: string, finishReason: ChatDone['finishReason'] = 'stop'): ChatDone {
  return {
    type: 'chat.done',
    taskId,
    messageId: 'msg_1',
    finishReason,
    usage: { promptTokens: 3, completionTokens: 7 },
    cached: false,
    timings: { queueMs: 1, firstTokenMs: 2, totalMs: 3 },
  };
}

function failed(taskId: string): ChatError {
  return { type: 'chat.error', taskId, code: 'upstream_error', message: 'the model provider failed', retryable: true };
}

/**
 * Opens a task on `log`, counting the cancels and lapses its node is told of; resolves once readers anywhere can
 * find it (the chat service acknowledges a chat then).
 */
async function openTask(log: TaskLog, meta = taskMeta()) {
  const told = { cancels: 0, lapsed: [] as ChatError[] };
  const writer = log.open(meta, {
    onCancel: () => {
      told.cancels++;
    },
    onLapsed: (terminal) => {
      told.lapsed.push(terminal);
    },
  });
  assert.equal(await writer.opened, true);
  return { writer, meta, told };
}

/** A reader: everything a follow delivered, in order. */
function follow(log: TaskLog, taskId: string, fromSeq: number) {
  const deltas: [number, string][] = [];
  const terminals: TaskLogTerminal[] = [];
  let gone = 0;
  let settle: (t: TaskLogTerminal | 'gone') => void = () => {};
  const ended = new Promise<TaskLogTerminal | 'gone'>((resolve) => {
    settle = resolve;
  });
  const stop = log.follow(taskId, fromSeq, {
    delta: (seq, text) => deltas.push([seq, text]),
    end: (terminal) => {
      terminals.push(terminal);
      settle(terminal);
    },
    gone: () => {
      gone++;
      settle('gone');
    },
  });
  return { fromSeq, deltas, terminals, ended, stop, gone: () => gone };
}

type Reader = ReturnType<typeof follow>;

/** The reader's end; waited for with a timer running, as the nodes' own timers do not hold the process open. */
async function ended(reader: Reader): Promise<TaskLogTerminal | 'gone'> {
  await until(() => reader.terminals.length > 0 || reader.gone() > 0, `the end of the reader from seq ${reader.fromSeq}`);
  return reader.ended;
}

// Text that JSON and the Redis scripts must carry through unchanged: quotes, backslashes, slashes, newlines, non-Latin-1.
const textOf = (seq: number) => (seq % 4 === 3 ? `d${seq} "q" \\ / \n é 字 🙂 ` : `d${seq} `);

/** The deltas a reader from `fromSeq` must get of a task of `count` deltas: each once, in order. */
function expected(fromSeq: number, count: number): [number, string][] {
  const out: [number, string][] = [];
  for (let seq = fromSeq; seq < count; seq++) out.push([seq, textOf(seq)]);
  return out;
}

/** Waits until `check` holds (the behaviour under test, however long a loaded machine takes), failing after `ms`. */
async function until(check: () => boolean | Promise<boolean>, what: string, ms = 20_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) assert.fail(`still waiting for: ${what}`);
    await sleep(10);
  }
}

/** Appends `count` deltas from seq `from`, `perTurn` per event-loop turn. */
async function appendDeltas(writer: TaskLogWriter, from: number, count: number, perTurn = 3): Promise<void> {
  for (let seq = from; seq < from + count; seq++) {
    writer.append(seq, textOf(seq));
    if ((seq - from) % perTurn === perTurn - 1) await nextTurn();
  }
}

function assertExact(reader: Reader, count: number, terminal: TaskLogTerminal): void {
  assert.deepEqual(reader.deltas, expected(reader.fromSeq, count), `reader from seq ${reader.fromSeq}`);
  assert.deepEqual(reader.terminals, [terminal], `reader from seq ${reader.fromSeq}: one terminal message`);
}

// Short leases for the tests that need a node to die; the rest keep the default lease.
const SHORT_LEASE = { leaseMs: 400, renewEveryMs: 150 };
const FAST_SWEEP = { sweepEveryMs: 50 };

function contract(name: string, makeCluster: () => Promise<Cluster>, options: () => Promise<{ skip?: string }>): void {
  describe(`task log: ${name}`, async () => {
    const opts = await options();

    it('a reader on another node sees the owner, conversation, creation time, status and text so far', opts, async () => {
      const cluster = await makeCluster();
      try {
        const [a, b] = [await cluster.node(), await cluster.node()];
        const { writer, meta } = await openTask(a);
        assert.deepEqual(await b.meta(meta.taskId), { ...meta, nodeId: a.nodeId, status: 'queued' });
        assert.throws(() => a.open(meta, { onCancel() {}, onLapsed() {} }), /open already/);
        writer.markRunning();
        assert.equal(await a.flush(), true);
        assert.equal((await b.meta(meta.taskId))?.status, 'running');
        writer.append(0, 'Hello');
        writer.append(1, ', world');
        assert.equal(await a.flush(), true);
        assert.deepEqual(await b.snapshot(meta.taskId), { ...meta, nodeId: a.nodeId, status: 'running', seq: 2, text: 'Hello, world', terminal: null });
        writer.end(done(meta.taskId));
        assert.equal(await a.flush(), true);
        assert.deepEqual(await b.snapshot(meta.taskId), {
          ...meta,
          nodeId: a.nodeId,
          status: 'done',
          seq: 2,
          text: 'Hello, world',
          terminal: done(meta.taskId),
        });
        assert.equal(await b.meta(newId('task')), undefined);
        assert.equal(await b.snapshot(newId('task')), undefined);
      } finally {
        await cluster.close();
      }
    });

    it('a task ended by a cancel reads as cancelled, one ended by an error as error', opts, async () => {
      const cluster = await makeCluster();
      try {
        const [a, b] = [await cluster.node(), await cluster.node()];
        const cancelled = await openTask(a);
        const erred = await openTask(a);
        cancelled.writer.append(0, 'part');
        cancelled.writer.end(done(cancelled.meta.taskId, 'cancelled'));
        erred.writer.end(failed(erred.meta.taskId));
        assert.equal(await a.flush(), true);
        assert.equal((await b.meta(cancelled.meta.taskId))?.status, 'cancelled');
        assert.equal((await b.meta(erred.meta.taskId))?.status, 'error');
      } finally {
        await cluster.close();
      }
    });

    it('follow delivers every delta once, in order, from every fromSeq while the writer appends, then the terminal once', opts, async () => {
      const cluster = await makeCluster();
      try {
        const [a, b] = [await cluster.node(), await cluster.node()];
        const { writer, meta } = await openTask(a);
        const count = 60;
        const readers: Reader[] = [];
        // Readers join at every point of the stream, on the writer's node and on another, from behind and ahead of it.
        for (let seq = 0; seq < count; seq++) {
          writer.append(seq, textOf(seq));
          if (seq % 3 === 2) {
            readers.push(follow(b, meta.taskId, seq - 2), follow(b, meta.taskId, seq + 4), follow(a, meta.taskId, seq));
            await nextTurn();
          }
        }
        readers.push(follow(b, meta.taskId, 0), follow(b, meta.taskId, count), follow(b, meta.taskId, count + 5));
        writer.end(done(meta.taskId));
        const terminals = await Promise.all(readers.map(ended));
        assert.deepEqual(new Set(terminals.map((t) => JSON.stringify(t))), new Set([JSON.stringify(done(meta.taskId))]));
        // Anything delivered twice would have arrived by now.
        await a.flush();
        await sleep(50);
        for (const reader of readers) assertExact(reader, count, done(meta.taskId));
      } finally {
        await cluster.close();
      }
    });

    it('follow of a finished task replays from any seq and ends; a stopped reader gets nothing more', opts, async () => {
      const cluster = await makeCluster();
      try {
        const [a, b] = [await cluster.node(), await cluster.node()];
        const { writer, meta } = await openTask(a);
        await appendDeltas(writer, 0, 10);
        writer.end(done(meta.taskId));
        assert.equal(await a.flush(), true);
        const readers = [0, 4, 9, 10, 12].map((from) => follow(b, meta.taskId, from));
        await Promise.all(readers.map(ended));
        for (const reader of readers) assertExact(reader, 10, done(meta.taskId));

        const running = await openTask(a);
        await appendDeltas(running.writer, 0, 3);
        const reader = follow(b, running.meta.taskId, 0);
        await until(() => reader.deltas.length === 3, 'the first three deltas');
        reader.stop();
        await appendDeltas(running.writer, 3, 3);
        running.writer.end(done(running.meta.taskId));
        await a.flush();
        await sleep(50);
        assert.deepEqual(reader.deltas, expected(0, 3));
        assert.deepEqual(reader.terminals, []);
      } finally {
        await cluster.close();
      }
    });

    it('a log longer than one write or one read carries (appended in one turn, read in pages)', opts, async () => {
      const cluster = await makeCluster();
      try {
        const [a, b] = [await cluster.node(), await cluster.node()];
        const { writer, meta } = await openTask(a);
        const early = follow(b, meta.taskId, 0);
        const count = 2600;
        for (let seq = 0; seq < count; seq++) writer.append(seq, textOf(seq));
        writer.end(done(meta.taskId));
        assert.equal(await a.flush(), true);
        const late = [0, 999, 1001, 2599].map((from) => follow(b, meta.taskId, from));
        for (const reader of [early, ...late]) {
          await ended(reader);
          assertExact(reader, count, done(meta.taskId));
        }
        assert.equal((await b.snapshot(meta.taskId))?.seq, count);
      } finally {
        await cluster.close();
      }
    });

    it('the terminal message is written once: a second end and later appends are ignored', opts, async () => {
      const cluster = await makeCluster();
      try {
        const [a, b] = [await cluster.node(), await cluster.node()];
        const { writer, meta } = await openTask(a);
        const reader = follow(b, meta.taskId, 0);
        writer.append(0, textOf(0));
        writer.end(done(meta.taskId));
        writer.end(failed(meta.taskId));
        writer.append(1, textOf(1));
        await ended(reader);
        await a.flush();
        await sleep(50);
        assertExact(reader, 1, done(meta.taskId));
        const snapshot = await b.snapshot(meta.taskId);
        assert.equal(snapshot?.seq, 1);
        assert.deepEqual(snapshot?.terminal, done(meta.taskId));
      } finally {
        await cluster.close();
      }
    });

    it('a node that stops renewing (it died) has its tasks end as node_lost for every reader, and onLost fires on one node', opts, async () => {
      const cluster = await makeCluster();
      try {
        const lost: string[] = [];
        const a = await cluster.node(SHORT_LEASE);
        const sweepers = [
          await cluster.node({ ...FAST_SWEEP, onLost: (taskId) => lost.push(`b:${taskId}`) }),
          await cluster.node({ ...FAST_SWEEP, onLost: (taskId) => lost.push(`c:${taskId}`) }),
        ];
        const tasks = [await openTask(a), await openTask(a)];
        for (const { writer } of tasks) await appendDeltas(writer, 0, 4);
        assert.equal(await a.flush(), true);
        const readers = tasks.flatMap(({ meta }) => sweepers.map((node) => follow(node, meta.taskId, 1)));
        await until(() => readers.every((r) => r.deltas.length === 3), 'the deltas written before the death');
        const diedAt = Date.now();
        await a.close();
        await Promise.all(readers.map(ended));
        // The contract's bound (PROTOCOL.md, cluster mode), not a measure of speed.
        assert.ok(Date.now() - diedAt < NODE_LOST_WITHIN_MS);
        for (const [i, reader] of readers.entries()) {
          const taskId = (tasks[Math.floor(i / 2)] as (typeof tasks)[number]).meta.taskId;
          assert.deepEqual(reader.deltas, expected(1, 4));
          assert.deepEqual(reader.terminals, [
            { type: 'chat.error', taskId, code: 'node_lost', message: (reader.terminals[0] as ChatError).message, retryable: true },
          ]);
        }
        // Both nodes keep sweeping: the loss is still reported once per task.
        await sleep(300);
        assert.equal(lost.length, 2, lost.join(', '));
        assert.deepEqual(new Set(lost.map((l) => l.slice(2))), new Set(tasks.map((t) => t.meta.taskId)));
        for (const { meta } of tasks) {
          const snapshot = await sweepers[1]?.snapshot(meta.taskId);
          assert.equal(snapshot?.status, 'error');
          assert.equal(snapshot?.seq, 4);
          assert.equal((snapshot?.terminal as ChatError | undefined)?.code, 'node_lost');
        }
      } finally {
        await cluster.close();
      }
    });

    it('a node that renews as late as its lease allows never has its tasks declared lost', opts, async () => {
      const cluster = await makeCluster();
      try {
        const lost: string[] = [];
        // Renewed only every half lease, while two nodes look for lapsed leases all the time.
        const a = await cluster.node({ leaseMs: 1000, renewEveryMs: 500, onLost: (taskId) => lost.push(taskId) });
        const b = await cluster.node({ sweepEveryMs: 20, onLost: (taskId) => lost.push(taskId) });
        const c = await cluster.node({ sweepEveryMs: 20, onLost: (taskId) => lost.push(taskId) });
        const { writer, meta, told } = await openTask(a);
        const reader = follow(b, meta.taskId, 0);
        // Several leases long: each lapses unless renewed.
        const count = 40;
        for (let seq = 0; seq < count; seq++) {
          writer.append(seq, textOf(seq));
          await sleep(75);
        }
        writer.end(done(meta.taskId));
        await ended(reader);
        assertExact(reader, count, done(meta.taskId));
        assert.deepEqual(lost, []);
        assert.deepEqual(told.lapsed, []);
        assert.equal((await c.meta(meta.taskId))?.status, 'done');
      } finally {
        await cluster.close();
      }
    });

    it('a cancel from another node reaches the node running the task', opts, async () => {
      const cluster = await makeCluster();
      try {
        const [a, b] = [await cluster.node(), await cluster.node()];
        const { writer, meta, told } = await openTask(a);
        const other = await openTask(a);
        assert.equal(await b.requestCancel(meta.taskId), true);
        await until(() => told.cancels === 1, 'the cancel on the running node');
        assert.equal(other.told.cancels, 0);
        writer.end(done(meta.taskId, 'cancelled'));
        assert.equal(await a.flush(), true);
        assert.equal(await b.requestCancel(meta.taskId), false);
        assert.equal(await b.requestCancel(newId('task')), false);
        // On its own node a cancel needs no round trip.
        assert.equal(await a.requestCancel(other.meta.taskId), true);
        assert.equal(other.told.cancels, 1);
        assert.equal(told.cancels, 1);
      } finally {
        await cluster.close();
      }
    });

    it('an ended task is readable for the retention window, then gone', opts, async () => {
      const cluster = await makeCluster();
      try {
        const a = await cluster.node({ retentionMs: 300 });
        const b = await cluster.node();
        const { writer, meta } = await openTask(a);
        writer.append(0, textOf(0));
        writer.end(done(meta.taskId));
        assert.equal(await a.flush(), true);
        assert.equal((await b.meta(meta.taskId))?.status, 'done');
        await until(async () => (await b.meta(meta.taskId)) === undefined, 'the end of the retention window');
        assert.equal(await b.snapshot(meta.taskId), undefined);
        const reader = follow(b, meta.taskId, 0);
        assert.equal(await ended(reader), 'gone');
        assert.deepEqual(reader.deltas, []);
      } finally {
        await cluster.close();
      }
    });
  });
}

contract(
  'memory',
  async () => memoryCluster(),
  async () => ({}),
);
contract('Redis', redisCluster, redisTestOptions);

describe('task log over Redis', async () => {
  const opts = await redisTestOptions();

  it('many readers of a task on one node share the node one subscription', opts, async () => {
    const cluster = await redisCluster();
    try {
      const a = await cluster.redisNode();
      const b = await cluster.redisNode();
      const { writer, meta } = await openTask(a.log);
      const readers = Array.from({ length: 20 }, (_, i) => follow(b.log, meta.taskId, i % 5));
      await b.bus.subscribed();
      const subscribers = async () => Number(((await b.hub.command.call('PUBSUB', 'NUMSUB', b.hub.key(`tasklog:${meta.taskId}`))) as [string, number])[1]);
      assert.equal(await subscribers(), 1);
      await appendDeltas(writer, 0, 8);
      writer.end(done(meta.taskId));
      await Promise.all(readers.map(ended));
      for (const reader of readers) assertExact(reader, 8, done(meta.taskId));
      await b.bus.subscribed();
      assert.equal(await subscribers(), 0);
    } finally {
      await cluster.close();
    }
  });

  it('a bus cut mid-follow still delivers every delta exactly once', opts, async () => {
    const cluster = await redisCluster();
    try {
      const a = await cluster.redisNode();
      const b = await cluster.redisNode();
      const { writer, meta } = await openTask(a.log);
      const readers = [0, 5, 20, 39].map((from) => follow(b.log, meta.taskId, from));
      await appendDeltas(writer, 0, 10);
      await until(() => (readers[0] as Reader).deltas.length === 10, 'the first ten deltas');
      const resynced = new Promise<void>((resolve) => b.bus.onResync(resolve));
      // The subscriber connection drops (as when Redis restarts): notices sent until it is back are lost.
      b.hub.subscriber.disconnect(true);
      await appendDeltas(writer, 10, 20);
      await a.log.flush();
      await resynced;
      await appendDeltas(writer, 30, 10);
      writer.end(done(meta.taskId));
      await Promise.all(readers.map(ended));
      await sleep(50);
      for (const reader of readers) assertExact(reader, 40, done(meta.taskId));
    } finally {
      await cluster.close();
    }
  });

  it('a task opened, run and ended within one turn is written by one script: its first write opens its record', opts, async () => {
    const cluster = await redisCluster();
    try {
      const a = await cluster.redisNode();
      const b = await cluster.redisNode();
      const meta = taskMeta();
      const keys = taskLogKeys(a.hub, meta.taskId);
      // The scripts node A sends for this task, as they leave for Redis.
      const scripts: string[] = [];
      const command = a.hub.command as unknown as { sendCommand(c: { name: string; args: unknown[] }, ...rest: unknown[]): unknown };
      const send = command.sendCommand.bind(command);
      command.sendCommand = (c, ...rest) => {
        if (c.name.startsWith('eval') && c.args.includes(keys.meta)) scripts.push(c.name);
        return send(c, ...rest);
      };
      const writer = a.log.open(meta, { onCancel: () => {}, onLapsed: () => {} });
      writer.markRunning();
      for (let seq = 0; seq < 3; seq++) writer.append(seq, textOf(seq));
      writer.end(done(meta.taskId));
      assert.equal(await a.log.flush(), true);
      assert.equal(await writer.opened, true);
      assert.deepEqual(scripts, ['evalsha']);
      const snapshot = await b.log.snapshot(meta.taskId);
      assert.deepEqual(
        { userId: snapshot?.userId, conversationId: snapshot?.conversationId, createdAt: snapshot?.createdAt, nodeId: snapshot?.nodeId },
        { userId: meta.userId, conversationId: meta.conversationId, createdAt: meta.createdAt, nodeId: a.log.nodeId },
      );
      assert.equal(snapshot?.status, 'done');
      assert.equal(
        snapshot?.text,
        expected(0, 3)
          .map(([, text]) => text)
          .join(''),
      );
      assert.deepEqual(snapshot?.terminal, done(meta.taskId));
      // An ended task holds no lease and is off the running index.
      assert.equal(await a.hub.command.exists(keys.lease), 0);
      assert.equal(await a.hub.command.zscore(a.hub.key('tasklog:running'), meta.taskId), null);
    } finally {
      await cluster.close();
    }
  });

  it('a retried append writes nothing twice, and what the stream lost is written again', opts, async () => {
    const cluster = await redisCluster();
    try {
      const a = await cluster.redisNode();
      const b = await cluster.redisNode();
      const { writer, meta } = await openTask(a.log);
      const keys = taskLogKeys(a.hub, meta.taskId);
      const reader = follow(b.log, meta.taskId, 0);
      await appendDeltas(writer, 0, 5);
      assert.equal(await a.log.flush(), true);
      // Seq 5 is in the stream already, as after a write whose reply was lost: the retry must not add it again.
      await a.hub.command.xadd(keys.stream, '5-1', 'j', JSON.stringify([textOf(5)]));
      await appendDeltas(writer, 5, 3);
      assert.equal(await a.log.flush(), true);
      // The last two entries are lost, as when Redis restarts without its last writes: the next append restores them.
      await a.hub.command.del(keys.stream);
      await a.hub.command.xadd(keys.stream, '2-1', 'j', JSON.stringify([0, 1, 2].map(textOf)));
      await a.hub.command.xadd(keys.stream, '5-1', 'j', JSON.stringify([3, 4, 5].map(textOf)));
      await appendDeltas(writer, 8, 2);
      assert.equal(await a.log.flush(), true);
      // The command connection drops while appends are in flight: they are sent again once it is back.
      for (let round = 0; round < 5; round++) {
        const from = 10 + round * 4;
        writer.append(from, textOf(from));
        setImmediate(() => a.hub.command.disconnect(true));
        await appendDeltas(writer, from + 1, 3, 1);
        await until(() => a.hub.up, 'the command connection back');
      }
      writer.end(done(meta.taskId));
      await until(async () => (await a.log.flush()) && (await b.log.meta(meta.taskId))?.status === 'done', 'the end written');
      // Each entry holds the deltas of one write, named by the seq of its last one; the terminal message comes last.
      const entries = (await a.hub.command.xrange(keys.stream, '-', '+')) as [string, string[]][];
      const deltas: string[] = [];
      for (const [id, fields] of entries.slice(0, -1)) {
        assert.equal(fields[0], 'j');
        deltas.push(...(JSON.parse(fields[1] as string) as string[]));
        assert.equal(id, `${deltas.length - 1}-1`);
      }
      assert.deepEqual(
        deltas,
        expected(0, 30).map(([, text]) => text),
      );
      assert.deepEqual(entries.at(-1), ['9007199254740991-0', ['e', JSON.stringify(done(meta.taskId))]]);
      await ended(reader);
      assertExact(reader, 30, done(meta.taskId));
    } finally {
      await cluster.close();
    }
  });

  it('entries of one delta each (field d, as written before a write shared an entry) read as the same deltas', opts, async () => {
    const cluster = await redisCluster();
    try {
      const a = await cluster.redisNode();
      const b = await cluster.redisNode();
      const { writer, meta } = await openTask(a.log);
      await appendDeltas(writer, 0, 3);
      assert.equal(await a.log.flush(), true);
      const keys = taskLogKeys(a.hub, meta.taskId);
      for (const seq of [3, 4]) await a.hub.command.xadd(keys.stream, `${seq}-1`, 'd', textOf(seq));
      await appendDeltas(writer, 3, 4);
      writer.end(done(meta.taskId));
      await until(async () => (await a.log.flush()) && (await b.log.meta(meta.taskId))?.status === 'done', 'the end written');
      for (const fromSeq of [0, 3, 4, 5, 7]) {
        const reader = follow(b.log, meta.taskId, fromSeq);
        await ended(reader);
        assertExact(reader, 7, done(meta.taskId));
      }
      assert.equal(
        (await b.log.snapshot(meta.taskId))?.text,
        expected(0, 7)
          .map(([, text]) => text)
          .join(''),
      );
    } finally {
      await cluster.close();
    }
  });

  it('a task whose record Redis lost while its lease held is written again in full', opts, async () => {
    const cluster = await redisCluster();
    try {
      const a = await cluster.redisNode();
      const b = await cluster.redisNode();
      const { writer, meta, told } = await openTask(a.log);
      await appendDeltas(writer, 0, 4);
      assert.equal(await a.log.flush(), true);
      const keys = taskLogKeys(a.hub, meta.taskId);
      await a.hub.command.del(keys.stream, keys.meta, keys.lease);
      await appendDeltas(writer, 4, 2);
      await until(async () => (await b.log.snapshot(meta.taskId))?.seq === 6, 'the record written again');
      writer.end(done(meta.taskId));
      const reader = follow(b.log, meta.taskId, 0);
      await ended(reader);
      assertExact(reader, 6, done(meta.taskId));
      assert.deepEqual(told.lapsed, []);
    } finally {
      await cluster.close();
    }
  });

  it('Redis unreachable for less than the lease: the writer keeps its deltas, writes them when it is back, and loses nothing', opts, async () => {
    const cluster = await redisCluster();
    try {
      const lost: string[] = [];
      const a = await cluster.redisNode({ leaseMs: 3000, renewEveryMs: 500 });
      const b = await cluster.redisNode({ ...FAST_SWEEP, onLost: (taskId) => lost.push(taskId) });
      const { writer, meta, told } = await openTask(a.log);
      const reader = follow(b.log, meta.taskId, 0);
      await appendDeltas(writer, 0, 3);
      assert.equal(await a.log.flush(), true);
      a.hub.command.disconnect();
      await until(() => !a.hub.up, 'the command connection down');
      await appendDeltas(writer, 3, 7);
      assert.equal(await a.log.flush(), false);
      // A node that cannot reach Redis cannot see the task: not_found.
      assert.equal(await a.log.meta(meta.taskId), undefined);
      await sleep(400);
      await a.hub.command.connect();
      writer.end(done(meta.taskId));
      await ended(reader);
      assertExact(reader, 10, done(meta.taskId));
      const late = follow(b.log, meta.taskId, 0);
      await ended(late);
      assertExact(late, 10, done(meta.taskId));
      assert.deepEqual(lost, []);
      assert.deepEqual(told.lapsed, []);
    } finally {
      await cluster.close();
    }
  });

  it('Redis unreachable for longer than the lease: other nodes end the task as node_lost, and the writer, back, is told and writes no more', opts, async () => {
    const cluster = await redisCluster();
    try {
      const lost: string[] = [];
      const a = await cluster.redisNode(SHORT_LEASE);
      const b = await cluster.redisNode({ ...FAST_SWEEP, onLost: (taskId) => lost.push(taskId) });
      const { writer, meta, told } = await openTask(a.log);
      const reader = follow(b.log, meta.taskId, 0);
      await appendDeltas(writer, 0, 2);
      assert.equal(await a.log.flush(), true);
      a.hub.command.disconnect();
      const terminal = (await ended(reader)) as ChatError;
      assert.equal(terminal.code, 'node_lost');
      assert.deepEqual(lost, [meta.taskId]);
      writer.append(2, textOf(2));
      await a.hub.command.connect();
      await until(() => told.lapsed.length === 1, 'the writer told its task lapsed');
      assert.deepEqual(told.lapsed, [terminal]);
      writer.append(3, textOf(3));
      writer.end(done(meta.taskId));
      await a.log.flush();
      const snapshot = await b.log.snapshot(meta.taskId);
      assert.equal(snapshot?.seq, 2);
      assert.deepEqual(snapshot?.terminal, terminal);
      assertExact(reader, 2, terminal);
    } finally {
      await cluster.close();
    }
  });

  it('a cancel whose notice the running node missed (its bus was cut) reaches it with its next lease renewal', opts, async () => {
    const cluster = await redisCluster();
    try {
      const a = await cluster.redisNode({ leaseMs: 1000, renewEveryMs: 200 });
      const b = await cluster.redisNode();
      const { meta, told } = await openTask(a.log);
      // Down for good: no notice reaches node A until the test ends.
      a.hub.subscriber.disconnect();
      assert.equal(await b.log.requestCancel(meta.taskId), true);
      await until(() => told.cancels === 1, 'the cancel on the running node');
      await sleep(500);
      assert.equal(told.cancels, 1);
    } finally {
      await cluster.close();
    }
  });

  it('a running log expires unless renewed, an ended one after the retention window, and neither holds a lease', opts, async () => {
    const cluster = await redisCluster();
    try {
      const a = await cluster.redisNode({ retentionMs: 2000, runningExpiryMs: 600_000 });
      const { writer, meta } = await openTask(a.log);
      await appendDeltas(writer, 0, 2);
      assert.equal(await a.log.flush(), true);
      const keys = taskLogKeys(a.hub, meta.taskId);
      const ttls = async () => Promise.all([keys.stream, keys.meta, keys.lease].map((k) => a.hub.command.pttl(k)));
      const [streamTtl = 0, metaTtl = 0, leaseTtl = 0] = await ttls();
      for (const ttl of [streamTtl, metaTtl]) assert.ok(ttl > 2000 && ttl <= 600_000, `running expiry ${ttl}`);
      assert.ok(leaseTtl > 0 && leaseTtl <= 5000, `lease ${leaseTtl}`);
      assert.equal((await a.hub.command.zscore(a.hub.key('tasklog:running'), meta.taskId)) !== null, true);
      writer.end(done(meta.taskId));
      assert.equal(await a.log.flush(), true);
      const [endedStream = 0, endedMeta = 0, endedLease] = await ttls();
      for (const ttl of [endedStream, endedMeta]) assert.ok(ttl > 0 && ttl <= 2000, `retention ${ttl}`);
      assert.equal(endedLease, -2);
      assert.equal(await a.hub.command.zscore(a.hub.key('tasklog:running'), meta.taskId), null);
    } finally {
      await cluster.close();
    }
  });
});
