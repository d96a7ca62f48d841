/**
 * npm run bench:cluster [-- --connections 100 --seconds 10 --warmup 3 --resumes 200 --setups embedded,cluster-1,cluster-3
 *                          --database-url postgres://postgres@127.0.0.1:5432/postgres --redis-url redis://127.0.0.1:6379]
 *
 * chatwire embedded (one node: SQLite, LMDB, memory) next to chatwire in cluster mode (one node, then three
 * nodes, on a scratch PostgreSQL database and a Redis key prefix of their own), all on this machine, driven
 * by the same clients in the same run (dev provider, token delay 0, limits raised; in the three-node run
 * the connections are spread over the nodes):
 * - chats/s of closed-loop clients (each sends its next chat when the last one is done);
 * - ack p50/p99 next to the ping round trip p50/p99 on the same sockets under the same load;
 * - time to first token p50/p99 (send to the first delta);
 * - resume latency on a quiet cluster: a chat sent on one node, chat.resume from seq 0 on another (on the
 *   same node for the one-node runs), timed from the resume to its first replayed delta;
 * - integrity: no delta lost or repeated, every chat ended, no connection dropped.
 * Targets: a cluster-mode node delivers at least 60% of an embedded node's chats/s; ack p99 <= 3x ping p99.
 * `--setups` runs only some of the setups (e.g. `cluster-1` alone, to time or profile one node); the ratios to the
 * embedded node are printed only when it ran.
 */
import crypto from 'node:crypto';
import os from 'node:os';
import { Cluster, createScratchDatabase, deleteRedisKeys } from '../test/helpers/cluster-nodes.js';
import { parseArgs, printTable, settle, sleep, startChatwire, summarize, UNLIMITED_ENV } from './bench-support.js';
import { ClosedChatLoop, openClients, wsConn, type Conn, type LoopFrame } from './load-support.js';

const args = parseArgs({
  connections: '100',
  seconds: '10',
  warmup: '3',
  resumes: '200',
  'ping-interval-ms': '100',
  setups: 'embedded,cluster-1,cluster-3',
  'database-url': process.env.CHATWIRE_TEST_DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres',
  'redis-url': process.env.CHATWIRE_TEST_REDIS_URL ?? 'redis://127.0.0.1:6379',
});
const CONNECTIONS = Number(args.connections);
const SECONDS = Number(args.seconds);
const WARMUP = Number(args.warmup);
const RESUMES = Number(args.resumes);
const PING_EVERY_MS = Number(args['ping-interval-ms']);
const DATABASE_URL = args['database-url'] as string;
const REDIS_URL = args['redis-url'] as string;
const SETUPS: Record<string, () => Promise<Setup>> = { embedded, 'cluster-1': () => cluster(1), 'cluster-3': () => cluster(3) };
const chosen = (args.setups as string).split(',').map((s) => s.trim());
for (const s of chosen) if (!(s in SETUPS)) throw new Error(`--setups: no setup ${s} (known: ${Object.keys(SETUPS).join(', ')})`);

/** The settings of every node, embedded or not: what startChatwire gives the one-node benchmarks. */
const NODE_ENV = { ...UNLIMITED_ENV, CHATWIRE_DEV_TOKEN_DELAY_MS: '0' };

interface Setup {
  name: string;
  kind: 'embedded' | 'cluster';
  nodes: number;
  /** The nodes' ports. */
  ports: number[];
  stop(): Promise<void>;
}

async function embedded(): Promise<Setup> {
  const server = await startChatwire(NODE_ENV);
  return { name: 'embedded, 1 node', kind: 'embedded', nodes: 1, ports: [server.port], stop: () => server.stop() };
}

async function cluster(nodes: number): Promise<Setup> {
  const database = await createScratchDatabase(DATABASE_URL, 'bench');
  const redisPrefix = `chatwire-bench:${process.pid}:${crypto.randomBytes(4).toString('hex')}:`;
  const cleanUp = async () => {
    await database.drop();
    await deleteRedisKeys(REDIS_URL, redisPrefix);
  };
  let c: Cluster;
  try {
    // The same settings as the embedded node, worker threads included (its default: one per core).
    c = await Cluster.start({
      nodes,
      databaseUrl: database.url,
      redisUrl: REDIS_URL,
      redisPrefix,
      env: { ...NODE_ENV, CHATWIRE_WORKER_THREADS: String(Math.max(1, os.availableParallelism())) },
    });
  } catch (err) {
    await cleanUp();
    throw err;
  }
  return {
    name: `cluster, ${nodes} node${nodes === 1 ? '' : 's'}`,
    kind: 'cluster',
    nodes,
    ports: c.nodes.map((n) => n.port),
    stop: async () => {
      await c.stop();
      await cleanUp();
    },
  };
}

interface Run {
  setup: string;
  kind: Setup['kind'];
  nodes: number;
  connections: number;
  seconds: number;
  chats: number;
  ack: ReturnType<typeof summarize>;
  ping: ReturnType<typeof summarize>;
  ttft: ReturnType<typeof summarize>;
  resume: ReturnType<typeof summarize> & { crossNode: boolean; failed: number };
  lostDeltas: number;
  unfinished: number;
  dropped: number;
  errors: Record<string, number>;
}

/** Chat on `from`, chat.resume from seq 0 on `to`: the time from the resume to its first replayed delta. */
async function resumeLatencies(fromPort: number, toPort: number, count: number): Promise<{ samples: number[]; failed: number }> {
  const user = `resume-${crypto.randomBytes(3).toString('hex')}`;
  type Waiter = { match: (f: LoopFrame) => boolean; resolve: (f: LoopFrame) => void };
  /** Frames are awaited per socket: the sender's own copy of the reply must not pass for the resumed one. */
  const waitersOf = () => new Set<Waiter>();
  const onFrameOf = (waiters: Set<Waiter>) => (f: LoopFrame) => {
    for (const w of waiters)
      if (w.match(f)) {
        waiters.delete(w);
        w.resolve(f);
      }
  };
  const nextOf = (waiters: Set<Waiter>) => (match: (f: LoopFrame) => boolean) =>
    new Promise<LoopFrame>((resolve, reject) => {
      const w: Waiter = { match, resolve };
      waiters.add(w);
      setTimeout(() => {
        if (waiters.delete(w)) reject(new Error('no answer within 10 s'));
      }, 10_000).unref();
    });
  const onSender = waitersOf();
  const onReader = waitersOf();
  const sender = await wsConn<LoopFrame>(`ws://127.0.0.1:${fromPort}/ws?user=${user}`, onFrameOf(onSender));
  const reader = await wsConn<LoopFrame>(`ws://127.0.0.1:${toPort}/ws?user=${user}`, onFrameOf(onReader));
  const fromSender = nextOf(onSender);
  const fromReader = nextOf(onReader);
  const samples: number[] = [];
  let failed = 0;
  try {
    for (let i = 0; i < count; i++) {
      const id = `s${i}`;
      const acked = fromSender((f) => f.id === id);
      sender.send({ type: 'chat.send', id, text: `resume me ${i} (${user})`, cache: 'bypass', params: { maxTokens: 64 } });
      const ack = await acked;
      if (ack.type !== 'chat.ack') {
        failed++;
        continue;
      }
      const taskId = ack.taskId as string;
      const rid = `r${i}`;
      // Frames of the resumed task on the reader's socket: its reply, then the first delta (or an error).
      const answered = fromReader((f) => f.id === rid);
      const first = fromReader((f) => f.taskId === taskId && (f.type === 'chat.delta' || f.type === 'chat.error') && (f.type !== 'chat.delta' || f.seq === 0));
      const t0 = performance.now();
      reader.send({ type: 'chat.resume', id: rid, taskId, fromSeq: 0 });
      const reply = await answered;
      if (reply.type !== 'ok') {
        failed++;
        first.catch(() => {});
        continue;
      }
      const f = await first.catch(() => null);
      if (f?.type === 'chat.delta') samples.push(performance.now() - t0);
      else failed++;
    }
  } finally {
    sender.terminate();
    reader.terminate();
  }
  return { samples, failed };
}

async function measure(setup: Setup): Promise<Run> {
  const clients = await openClients(
    CONNECTIONS,
    async (i) => {
      let conn: Conn | undefined;
      const loop = new ClosedChatLoop(i, (m) => conn?.send(m), PING_EVERY_MS);
      const port = setup.ports[i % setup.ports.length] as number;
      conn = await wsConn<LoopFrame>(`ws://127.0.0.1:${port}/ws?user=bench-${i}`, (f) => loop.onFrame(f));
      return { conn, loop };
    },
    { concurrency: 50 },
  );
  for (const c of clients) c.loop.start();
  await sleep(WARMUP * 1000);
  for (const c of clients) c.loop.measuring = true;
  const t0 = performance.now();
  await sleep(SECONDS * 1000);
  const seconds = (performance.now() - t0) / 1000;
  for (const c of clients) {
    c.loop.measuring = false;
    c.loop.stop();
  }
  const loops = clients.map((c) => c.loop);
  await settle(loops, 30_000);
  const dropped = clients.filter((c) => !c.conn.open).length;
  for (const c of clients) c.conn.terminate();
  const errors: Record<string, number> = {};
  for (const l of loops) for (const [k, v] of Object.entries(l.errors)) errors[k] = (errors[k] ?? 0) + v;
  // On the quiet cluster: send on the first node, resume on the second (the same one when there is one).
  const from = setup.ports[0] as number;
  const to = setup.ports[1] ?? from;
  const resumes = await resumeLatencies(from, to, RESUMES);
  return {
    setup: setup.name,
    kind: setup.kind,
    nodes: setup.nodes,
    connections: CONNECTIONS,
    seconds,
    chats: loops.reduce((n, l) => n + l.chats, 0),
    ack: summarize(loops.flatMap((l) => l.acks)),
    ping: summarize(loops.flatMap((l) => l.pings)),
    ttft: summarize(loops.flatMap((l) => l.ttfts)),
    resume: { ...summarize(resumes.samples), crossNode: to !== from, failed: resumes.failed },
    lostDeltas: loops.reduce((n, l) => n + l.lost, 0),
    unfinished: loops.reduce((n, l) => n + Math.max(0, l.inFlight), 0),
    dropped,
    errors,
  };
}

const loadAtStart = os.loadavg().map((x) => Math.round(x * 10) / 10);
const runs: Run[] = [];
for (const name of chosen) {
  const setup = await (SETUPS[name] as () => Promise<Setup>)();
  process.stderr.write(`bench:cluster: ${setup.name} on ports ${setup.ports.join(', ')}\n`);
  try {
    runs.push(await measure(setup));
  } finally {
    await setup.stop();
  }
}
const loadAtEnd = os.loadavg().map((x) => Math.round(x * 10) / 10);

const perSecond = (r: Run) => r.chats / r.seconds;
const base = runs.find((r) => r.kind === 'embedded');
const one = runs.find((r) => r.kind === 'cluster' && r.nodes === 1);
const three = runs.find((r) => r.kind === 'cluster' && r.nodes === 3);
/** r's chats/s over the embedded node's, when that ran. */
const overEmbedded = (r: Run) => (base === undefined ? undefined : perSecond(r) / perSecond(base));
printTable(
  `bench:cluster — dev provider, token delay 0, ${CONNECTIONS} closed-loop /ws clients, ${SECONDS}s measured after ${WARMUP}s warm-up; ` +
    `resume: ${RESUMES} chats sent on the first node and resumed from seq 0 on the second; latencies in ms; load average ${loadAtStart.join(' ')} at the start`,
  [
    'setup',
    'chats/s',
    'vs embedded',
    'ack p50',
    'ack p99',
    'ping p50',
    'ping p99',
    'ack p99 / ping p99',
    'ttft p50',
    'ttft p99',
    'resume p50',
    'resume p99',
    'lost/unfinished/dropped',
    'errors',
  ],
  runs.map((r) => [
    r.setup,
    perSecond(r),
    overEmbedded(r) === undefined ? '-' : `${overEmbedded(r)?.toFixed(2)}x`,
    r.ack.p50,
    r.ack.p99,
    r.ping.p50,
    r.ping.p99,
    (r.ack.p99 / r.ping.p99).toFixed(2),
    r.ttft.p50,
    r.ttft.p99,
    `${r.resume.p50.toFixed(2)}${r.resume.crossNode ? ' (cross-node)' : ''}`,
    r.resume.p99,
    `${r.lostDeltas}/${r.unfinished}/${r.dropped}`,
    [...Object.entries(r.errors).map(([k, v]) => `${k}:${v}`), ...(r.resume.failed > 0 ? [`resumes failed:${r.resume.failed}`] : [])].join(' ') || 'none',
  ]),
);
const ratio = (r: Run | undefined) => (r === undefined ? undefined : overEmbedded(r));
const targets = {
  ...(ratio(one) === undefined ? {} : { clusterNodeAtLeast60PctOfEmbedded: (ratio(one) as number) >= 0.6 }),
  ackP99Within3xPing: runs.every((r) => r.ack.p99 <= 3 * r.ping.p99),
  noLossNoDrop: runs.every((r) => r.lostDeltas + r.unfinished + r.dropped + r.resume.failed === 0),
};
console.log(
  `one cluster node / embedded chats/s = ${ratio(one)?.toFixed(2) ?? '-'} (target >= 0.6); three nodes / embedded = ${ratio(three)?.toFixed(2) ?? '-'}; ` +
    `ack p99 / ping p99 = ${runs.map((r) => (r.ack.p99 / r.ping.p99).toFixed(2)).join(' / ')} (target <= 3); load average ${loadAtEnd.join(' ')} at the end`,
);
console.log(
  JSON.stringify({
    bench: 'cluster',
    connections: CONNECTIONS,
    seconds: SECONDS,
    loadAverage: { start: loadAtStart, end: loadAtEnd },
    results: runs.map((r) => ({
      setup: r.setup,
      kind: r.kind,
      nodes: r.nodes,
      chatsPerSec: Math.round(perSecond(r)),
      ...(overEmbedded(r) === undefined ? {} : { overEmbedded: +(overEmbedded(r) as number).toFixed(2) }),
      ackMs: r.ack,
      pingMs: r.ping,
      ackP99OverPingP99: +(r.ack.p99 / r.ping.p99).toFixed(2),
      ttftMs: r.ttft,
      resumeMs: r.resume,
      lostDeltas: r.lostDeltas,
      unfinished: r.unfinished,
      dropped: r.dropped,
      errors: r.errors,
    })),
    targetsMet: targets,
  }),
);
process.exit(0);
