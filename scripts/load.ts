/**
 * npm run load -- [--connections 1000] [--active 200] [--chats-per-second 200] [--duration 30] [--warmup 5]
 *                 [--socketio 0.2] [--cache-hits 0.2] [--continue 0.3] [--lookups-per-second 100]
 *                 [--cancel 0.05] [--reconnect 0.02] [--dead-readers 0] [--dead-replays 8] [--dead-replay-tokens 1024]
 *                 [--seed-requests 20000]
 *                 [--workers 2] [--tasks-per-worker 1024] [--token-delay-ms 15] [--max-in-flight 16]
 *                 [--settle-seconds 30] [--seed 1] [--port N]
 *
 * A load generator for chatwire, on loopback only. It seeds a temp data dir
 * with the marketplace, starts chatwire on it as a child process (or, with
 * --port, drives one already listening on 127.0.0.1), then holds
 * --connections sockets open (a --socketio share of them socket.io, the rest
 * /ws through chatwire's client library, src/client), of which --active chat and the rest stay idle, and
 * --dead-readers more that stop reading mid-stream (of a chat and of the
 * replay of --dead-replays finished replies of --dead-replay-tokens tokens). The active ones send
 * --chats-per-second chats in all (open loop: the schedule does not wait for
 * replies), a mix of repeated questions (cache hits), new and continued
 * conversations, cancels, and drops with reconnect + chat.resume; and
 * --lookups-per-second marketplace lookups (requests.list with paging,
 * consumer.requests, consumer.bookings). It prints a progress line every
 * second, then a table (throughput; ack, time-to-first-token and lookup
 * p50/p99/p999; errors by code; server RSS, heap and event-loop delay from
 * /metrics; memory per connection) and one JSON line. After the run it stops
 * the server with SIGTERM and checks in its SQLite file that every
 * acknowledged message and every reply a chat.done announced is stored.
 *
 * With --nodes N (and --kill-node-every S), the run is the cluster one instead: scripts/load-cluster.ts,
 * with its own flags (N nodes in cluster mode, a node SIGKILLed and restarted every S seconds).
 *
 * Bounded: at most 60,000 sockets, 3,600 s, 50,000 chats/s. Each socket is a
 * file descriptor in this process and in the server: `ulimit -n` must exceed
 * connections + dead readers (+ a margin); `npm run load` raises the soft limit
 * to the hard one first, and the script refuses to start when it is too low.
 */
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { createRandom } from '../src/db/marketplace-seed.js';
import { verifyLedger, type Verification } from '../test/helpers/chat-ledger.js';
import { parseArgs, printTable, settle, sleep, summarize } from './bench-support.js';
import { runClusterLoad } from './load-cluster.js';
import {
  LoadClient,
  LoadStats,
  MiB,
  consumerIds,
  openClients,
  openFileLimits,
  openLoop,
  roundRobin,
  sampleServer,
  scrapeServer,
  startLoadServer,
  type LoadServer,
  type ServerSample,
} from './load-support.js';

// --nodes: the cluster run, with its own flags.
if (process.argv.slice(2).includes('--nodes')) process.exit(await runClusterLoad());

const args = parseArgs({
  connections: '1000',
  active: '',
  'chats-per-second': '200',
  duration: '30',
  warmup: '5',
  socketio: '0.2',
  'cache-hits': '0.2',
  continue: '0.3',
  'lookups-per-second': '100',
  cancel: '0.05',
  reconnect: '0.02',
  'dead-readers': '0',
  'seed-requests': '20000',
  workers: '2',
  'tasks-per-worker': '1024',
  'token-delay-ms': '15',
  'max-in-flight': '16',
  'dead-replays': '8',
  'dead-replay-tokens': '1024',
  'settle-seconds': '30',
  seed: '1',
  port: '',
});

function num(name: string, min: number, max: number): number {
  const v = Number(args[name]);
  if (!Number.isFinite(v) || v < min || v > max) {
    console.error(`--${name} must be a number in [${min}, ${max}], got ${args[name]}`);
    process.exit(2);
  }
  return v;
}

const CONNECTIONS = Math.floor(num('connections', 1, 60_000));
const ACTIVE = Math.floor(args.active === '' ? Math.min(CONNECTIONS, 200) : num('active', 1, CONNECTIONS));
const IDLE = CONNECTIONS - ACTIVE;
const DEAD = Math.floor(num('dead-readers', 0, 20_000));
const CHATS_PER_SECOND = num('chats-per-second', 0, 50_000);
const LOOKUPS_PER_SECOND = num('lookups-per-second', 0, 50_000);
const DURATION = num('duration', 1, 3600);
const WARMUP = num('warmup', 0, 600);
const SOCKETIO = num('socketio', 0, 1);
const CACHE_HITS = num('cache-hits', 0, 1);
const CONTINUE = num('continue', 0, 1);
const CANCEL = num('cancel', 0, 1);
const RECONNECT = num('reconnect', 0, 1);
const SEED_REQUESTS = Math.floor(num('seed-requests', 0, 2_000_000));
const MAX_IN_FLIGHT = Math.floor(num('max-in-flight', 1, 10_000));
const DEAD_USER = 'stopped-reader';
const DEAD_REPLAYS = Math.floor(num('dead-replays', 0, 1000));
const DEAD_REPLAY_TOKENS = Math.floor(num('dead-replay-tokens', 1, 4096));
const SETTLE_SECONDS = num('settle-seconds', 0, 600);
const EXTERNAL_PORT = args.port === '' ? null : Math.floor(num('port', 1, 65_535));
const random = createRandom(Math.floor(num('seed', 0, 2 ** 31))).next;

// ---------- file descriptors ----------
const needFds = CONNECTIONS + DEAD + 256;
const limits = openFileLimits();
if (limits !== null && limits.soft < needFds) {
  console.error(
    `load: ${CONNECTIONS + DEAD} sockets need about ${needFds} open files in this process and in the server, but the soft limit is ${limits.soft} ` +
      `(hard ${limits.hard}). Raise it first: ulimit -n ${Math.min(limits.hard, Math.max(needFds, 65_536))}` +
      (limits.hard < needFds ? ` (the hard limit is too low too: raise it as root, e.g. in /etc/security/limits.conf)` : '') +
      '. `npm run load` does this itself up to the hard limit.',
  );
  process.exit(2);
}

const log = (line: string) => process.stderr.write(`${line}\n`);
const tty = process.stderr.isTTY;
const progress = (line: string) => (tty ? process.stderr.write(`\r${line.padEnd(150)}`) : log(line));

// ---------- server ----------
let server: LoadServer | null = null;
let port: number;
if (EXTERNAL_PORT === null) {
  log(
    `load: seeding ${SEED_REQUESTS} marketplace requests and starting chatwire (${args.workers} workers, ${args['tasks-per-worker']} tasks each, token delay ${args['token-delay-ms']} ms)`,
  );
  server = await startLoadServer({
    seedRequests: SEED_REQUESTS,
    env: {
      CHATWIRE_WORKER_THREADS: String(Math.floor(num('workers', 1, 64))),
      CHATWIRE_TASKS_PER_WORKER: String(Math.floor(num('tasks-per-worker', 1, 10_000))),
      CHATWIRE_DEV_TOKEN_DELAY_MS: String(Math.floor(num('token-delay-ms', 0, 10_000))),
    },
  });
  port = server.port;
} else {
  port = EXTERNAL_PORT;
}
const base = `http://127.0.0.1:${port}`;
const consumers = consumerIds(Math.max(SEED_REQUESTS, 10));
const stats = new LoadStats();
const sampler = sampleServer(port, 1000);
const generatorLag = monitorEventLoopDelay({ resolution: 10 });
generatorLag.enable();

/** Spreads socket.io clients evenly through each group: client i of n uses socket.io when it falls in the share. */
const usesSocketIo = (i: number) => Math.floor((i + 1) * SOCKETIO) > Math.floor(i * SOCKETIO);

async function settleSample(ms = 1500): Promise<ServerSample> {
  await sleep(ms);
  return scrapeServer(port);
}

// ---------- connections ----------
const baseline = await settleSample(2000);
// Long replies for the stopped readers to replay, produced while the connections open.
const replaysReady = prepareReplays();
log(`load: server RSS before connections ${(baseline.rssBytes / MiB).toFixed(1)} MiB`);

const idleWsCount = Array.from({ length: IDLE }, (_, i) => i).filter((i) => !usesSocketIo(i)).length;
const idleSioCount = IDLE - idleWsCount;
const idleWs = await openClients(idleWsCount, (i) => LoadClient.open(base, `idle-ws-${i}`, 'ws', stats, random), {
  onProgress: (n) => progress(`load: opened ${n}/${idleWsCount} idle /ws connections`),
});
const afterIdleWs = await settleSample();
const idleSio = await openClients(idleSioCount, (i) => LoadClient.open(base, `idle-sio-${i}`, 'socket.io', stats, random), {
  onProgress: (n) => progress(`load: opened ${n}/${idleSioCount} idle socket.io connections`),
});
const afterIdle = await settleSample();
if (tty) process.stderr.write('\n');
const active = await openClients(
  ACTIVE,
  (i) => LoadClient.open(base, consumers[i % consumers.length] as string, usesSocketIo(i) ? 'socket.io' : 'ws', stats, random),
  {
    onProgress: (n) => progress(`load: opened ${n}/${ACTIVE} active connections`),
  },
);
const afterActive = await settleSample();
log(
  `load: ${idleWsCount} idle /ws + ${idleSioCount} idle socket.io + ${ACTIVE} active connections open; server RSS ${(afterActive.rssBytes / MiB).toFixed(1)} MiB`,
);

// ---------- load ----------
let skipped = 0;
let dead: LoadClient[] = [];
let deadOpened: ServerSample | undefined;
let deadHung: ServerSample | undefined;
let deadSettledAt: number | undefined;

const chatClient = roundRobin(active, (c) => c.ready && c.inFlight < MAX_IN_FLIGHT);
const lookupClient = roundRobin(active, (c) => c.ready);

function issueChat(): void {
  const c = chatClient();
  if (!c) {
    skipped++;
    return;
  }
  const r = random();
  if (r < CACHE_HITS) {
    c.chat({
      text: `popular question number ${Math.floor(random() * 20)}: who can fix a leaking tap tomorrow?`,
      cache: 'use',
      cancel: random() < CANCEL,
      dropAndResume: random() < RECONNECT,
    });
  } else {
    c.chat({
      text: `${c.user} asks about job ${stats.chatsSent} (${random().toString(36).slice(2, 10)})`,
      cache: 'use',
      continueConversation: random() < CONTINUE,
      cancel: random() < CANCEL,
      dropAndResume: random() < RECONNECT,
    });
  }
}

const stopLoad = openLoop(
  { chatsPerSecond: CHATS_PER_SECOND, lookupsPerSecond: LOOKUPS_PER_SECOND },
  { chat: issueChat, lookup: () => lookupClient()?.lookup() },
);

const started = performance.now();
const measureFrom = started + WARMUP * 1000;
const measureTo = measureFrom + DURATION * 1000;
let snapshotAtWarmup: { sent: number; acked: number; done: number; deltas: number; lookups: number; skipped: number } | null = null;
let lastProgress = { at: started, sent: 0, lookups: 0 };
// This process's own event-loop delay per second: when it is high, the client-side latencies include it.
const generatorLagP99s: number[] = [];

const progressTimer = setInterval(() => {
  const now = performance.now();
  const s = sampler.latest();
  const window = now - 1000;
  const acks = summarize(stats.ack.between(window));
  const ttft = summarize(stats.ttft.between(window));
  const inFlight = active.reduce((n, c) => n + c.inFlight, 0);
  const errors = Object.values(stats.errors).reduce((a, b) => a + b, 0);
  const secs = (now - lastProgress.at) / 1000;
  const phase = now < measureFrom ? 'warm-up' : 'measure';
  progress(
    `t=${((now - started) / 1000).toFixed(0)}s ${phase} | chats/s ${((stats.chatsSent - lastProgress.sent) / secs).toFixed(0)} | lookups/s ${((stats.lookupsDone - lastProgress.lookups) / secs).toFixed(0)} | ` +
      `ack p99 ${fmtMs(acks.p99)} | ttft p99 ${fmtMs(ttft.p99)} | in flight ${inFlight} | skipped ${skipped} | errors ${errors} | dropped ${stats.dropped} | ` +
      `server ${s ? `${(s.rssBytes / MiB).toFixed(0)} MiB, eld p99 ${s.eldP99Ms.toFixed(1)} ms` : '?'} | gen eld p99 ${(generatorLag.percentile(99) / 1e6).toFixed(1)} ms`,
  );
  if (now >= measureFrom && now <= measureTo) generatorLagP99s.push(generatorLag.percentile(99) / 1e6);
  generatorLag.reset();
  lastProgress = { at: now, sent: stats.chatsSent, lookups: stats.lookupsDone };
}, 1000);

function fmtMs(v: number): string {
  return Number.isFinite(v) ? `${v.toFixed(1)} ms` : '-';
}

// Stopped readers come in once the load runs. Each asks a chat and replays a few finished long replies (as a
// client resuming old tasks would), then stops reading at its first delta: mid-stream of all of them. The
// replies replayed were asked with nobody listening, so they are a few 4 KB deltas each: the streams cost the
// server little CPU, and what is measured is what stopped readers hold, not the cost of sending 1,000 streams.
async function prepareReplays(): Promise<string[]> {
  if (DEAD === 0) return [];
  const ids = await Promise.all(
    Array.from({ length: DEAD_REPLAYS }, async (_, i) => {
      const res = await fetch(`${base}/v1/chat?user=${DEAD_USER}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ text: `an old long reply ${i}`, params: { maxTokens: DEAD_REPLAY_TOKENS }, cache: 'bypass' }),
      });
      return ((await res.json()) as { taskId: string }).taskId;
    }),
  );
  for (const id of ids) {
    while (((await (await fetch(`${base}/v1/tasks/${id}?user=${DEAD_USER}`)).json()) as { status: string }).status !== 'done') await sleep(250);
  }
  return ids;
}

async function startDeadReaders(replays: string[]): Promise<void> {
  if (DEAD === 0) return;
  const before = await scrapeServer(port);
  // Their own statistics: their connect burst and chats are not the load being measured.
  const deadStats = new LoadStats();
  dead = await openClients(DEAD, () => LoadClient.open(base, DEAD_USER, 'ws', deadStats, random));
  await Promise.all(
    dead.map(async (c) => {
      for (const taskId of replays) c.sendRaw({ type: 'chat.resume', taskId, fromSeq: 0 });
      c.chat({ text: 'a question asked just before the reader stops', cache: 'bypass' });
      for (let i = 0; i < 500 && c.runningTaskIds().length === 0; i++) await sleep(20);
      c.hang();
    }),
  );
  deadOpened = before;
  await sleep(5000);
  deadHung = await scrapeServer(port);
  deadSettledAt = performance.now();
  log(`\nload: ${DEAD} readers stopped mid-stream; server RSS ${(before.rssBytes / MiB).toFixed(1)} -> ${(deadHung.rssBytes / MiB).toFixed(1)} MiB`);
}

await sleep(WARMUP * 1000);
snapshotAtWarmup = { sent: stats.chatsSent, acked: stats.chatsAcked, done: stats.chatsDone, deltas: stats.deltas, lookups: stats.lookupsDone, skipped };
const deadReaders = startDeadReaders(await replaysReady);
await sleep(Math.max(0, measureTo - performance.now()));
stopLoad();
const atEnd = { sent: stats.chatsSent, acked: stats.chatsAcked, done: stats.chatsDone, deltas: stats.deltas, lookups: stats.lookupsDone, skipped };
await deadReaders;
const endSample = await scrapeServer(port);
clearInterval(progressTimer);
if (tty) process.stderr.write('\n');

// ---------- settle, stop, verify ----------
for (const c of dead) await c.close().catch(() => {});
const unfinished = await settle(active, SETTLE_SECONDS * 1000);
const slowClosed = (await scrapeServer(port)).slowClientsClosed;
await sampler.stop();
const dropped = stats.dropped;
await Promise.all([...idleWs, ...idleSio, ...active].map((c) => c.close().catch(() => {})));
generatorLag.disable();

let exitCode: number | null = null;
let verification: Verification | null = null;
if (server) {
  exitCode = await server.terminate();
  verification = verifyLedger(server.dbFile, stats.ledger);
  server.removeDataDir();
}

// ---------- report ----------
const seconds = DURATION;
const w = snapshotAtWarmup;
const ack = summarize(stats.ack.between(measureFrom, measureTo));
const ttft = summarize(stats.ttft.between(measureFrom, measureTo));
const lookup = summarize(stats.lookup.between(measureFrom, measureTo));
const measured = sampler.samples.filter((s) => s.at >= measureFrom && s.at <= measureTo);
const peakRss = Math.max(...sampler.samples.map((s) => s.rssBytes));
// Each scrape covers the time since the one before; a window in which no timer fired repeats the previous figures.
const eldP99s = measured
  .map((s) => s.eldP99Ms)
  .filter((v) => Number.isFinite(v))
  .sort((a, b) => a - b);
const eldMax = Math.max(0, ...measured.map((s) => s.eldMaxMs));
const perIdleWs = idleWsCount > 0 ? (afterIdleWs.rssBytes - baseline.rssBytes) / idleWsCount : NaN;
const perIdleSio = idleSioCount > 0 ? (afterIdle.rssBytes - afterIdleWs.rssBytes) / idleSioCount : NaN;
const perConnection = (afterActive.rssBytes - baseline.rssBytes) / CONNECTIONS;
const perDead = DEAD > 0 && deadOpened && deadHung ? (deadHung.rssBytes - deadOpened.rssBytes) / DEAD : NaN;
const errorList = Object.entries(stats.errors)
  .map(([k, v]) => `${k}:${v}`)
  .join(' ');
const lost = verification === null ? null : verification.lostAcked.length + verification.lostReplies.length;

const kib = (b: number) => (Number.isFinite(b) ? `${(b / 1024).toFixed(1)} KiB` : '-');
printTable(
  `load — ${CONNECTIONS} connections (${ACTIVE} active, ${IDLE} idle, ${Math.round(SOCKETIO * 100)}% socket.io) + ${DEAD} stopped readers; ` +
    `${CHATS_PER_SECOND} chats/s and ${LOOKUPS_PER_SECOND} lookups/s offered; ${seconds}s measured after ${WARMUP}s warm-up; loopback`,
  ['figure', 'value'],
  [
    [
      'chats/s sent / acked / ended',
      `${((atEnd.sent - w.sent) / seconds).toFixed(0)} / ${((atEnd.acked - w.acked) / seconds).toFixed(0)} / ${((atEnd.done - w.done) / seconds).toFixed(0)}`,
    ],
    ['chats not sent (every active client at --max-in-flight)', String(atEnd.skipped - w.skipped)],
    ['delta frames/s', ((atEnd.deltas - w.deltas) / seconds).toFixed(0)],
    ['lookups/s', ((atEnd.lookups - w.lookups) / seconds).toFixed(0)],
    ['ack ms p50 / p99 / p999', `${ack.p50.toFixed(2)} / ${ack.p99.toFixed(2)} / ${ack.p999.toFixed(2)} (n=${ack.n})`],
    ['time to first token ms p50 / p99 / p999', `${ttft.p50.toFixed(2)} / ${ttft.p99.toFixed(2)} / ${ttft.p999.toFixed(2)} (n=${ttft.n})`],
    ['lookup ms p50 / p99 / p999', `${lookup.p50.toFixed(2)} / ${lookup.p99.toFixed(2)} / ${lookup.p999.toFixed(2)} (n=${lookup.n})`],
    ['cache hits (acks with status cached)', stats.cachedAcks],
    ['cancels sent / chats ended cancelled', `${stats.cancelsSent} / ${stats.chatsCancelled}`],
    ['drops + reconnects / tasks resumed', `${stats.reconnects} / ${stats.resumes}`],
    ['errors by code', errorList || 'none'],
    ['delta seq gaps / double ends / unfinished after settle', `${stats.ledger.seqGaps} / ${stats.ledger.duplicateEnds} / ${unfinished}`],
    [
      'sockets closed by the server',
      `${dropped}${Object.keys(stats.dropCodes).length ? ` (${JSON.stringify(stats.dropCodes)})` : ''}; slow readers closed (server count): ${slowClosed}`,
    ],
    [
      'server RSS MiB: before / idle open / all open / end / peak',
      [baseline, afterIdle, afterActive, endSample].map((s) => (s.rssBytes / MiB).toFixed(0)).join(' / ') + ` / ${(peakRss / MiB).toFixed(0)}`,
    ],
    ['server heap used MiB at end', (endSample.heapUsedBytes / MiB).toFixed(0)],
    ['server RSS per idle connection: /ws / socket.io', `${kib(perIdleWs)} / ${kib(perIdleSio)}`],
    ['server RSS per connection (all, before any chat)', kib(perConnection)],
    ['server RSS per stopped reader', kib(perDead)],
    [
      'ack ms p50 / p99 once the stopped readers had stopped (+5 s to the end)',
      deadSettledAt === undefined
        ? '-'
        : ((a) => `${a.p50.toFixed(2)} / ${a.p99.toFixed(2)} (n=${a.n})`)(summarize(stats.ack.between(deadSettledAt, measureTo))),
    ],
    [
      'server RSS MiB with stopped readers: before / +5 s / end of run',
      deadOpened && deadHung
        ? `${(deadOpened.rssBytes / MiB).toFixed(0)} / ${(deadHung.rssBytes / MiB).toFixed(0)} / ${(endSample.rssBytes / MiB).toFixed(0)}`
        : '-',
    ],
    [
      'server event-loop delay ms: median of 1 s p99s / worst p99 / max',
      `${(eldP99s[Math.floor(eldP99s.length / 2)] ?? NaN).toFixed(1)} / ${(eldP99s.at(-1) ?? NaN).toFixed(1)} / ${eldMax.toFixed(1)}`,
    ],
    [
      'load generator event-loop delay ms: median / worst of 1 s p99s (client-side latencies include it)',
      ((l) => `${(l[Math.floor(l.length / 2)] ?? NaN).toFixed(1)} / ${(l.at(-1) ?? NaN).toFixed(1)}`)([...generatorLagP99s].sort((a, b) => a - b)),
    ],
    ['acknowledged chats checked in SQLite / lost', verification === null ? 'not checked (external server)' : `${verification.acked} / ${lost}`],
    ['server exit on SIGTERM', exitCode === null ? '-' : String(exitCode)],
  ],
);
console.log(
  JSON.stringify({
    bench: 'load',
    connections: CONNECTIONS,
    active: ACTIVE,
    idle: IDLE,
    deadReaders: DEAD,
    socketioShare: SOCKETIO,
    offered: { chatsPerSecond: CHATS_PER_SECOND, lookupsPerSecond: LOOKUPS_PER_SECOND },
    seconds,
    warmup: WARMUP,
    chatsPerSecond: {
      sent: +((atEnd.sent - w.sent) / seconds).toFixed(1),
      acked: +((atEnd.acked - w.acked) / seconds).toFixed(1),
      ended: +((atEnd.done - w.done) / seconds).toFixed(1),
    },
    skipped: atEnd.skipped - w.skipped,
    deltasPerSecond: Math.round((atEnd.deltas - w.deltas) / seconds),
    lookupsPerSecond: Math.round((atEnd.lookups - w.lookups) / seconds),
    ackMs: ack,
    ttftMs: ttft,
    lookupMs: lookup,
    cachedAcks: stats.cachedAcks,
    cancels: { sent: stats.cancelsSent, ended: stats.chatsCancelled },
    reconnects: stats.reconnects,
    resumes: stats.resumes,
    abandoned: stats.abandoned,
    errors: stats.errors,
    seqGaps: stats.ledger.seqGaps,
    duplicateEnds: stats.ledger.duplicateEnds,
    unfinished,
    droppedByServer: dropped,
    slowClientsClosed: slowClosed,
    serverRssMiB: {
      before: +(baseline.rssBytes / MiB).toFixed(1),
      idleOpen: +(afterIdle.rssBytes / MiB).toFixed(1),
      allOpen: +(afterActive.rssBytes / MiB).toFixed(1),
      end: +(endSample.rssBytes / MiB).toFixed(1),
      peak: +(peakRss / MiB).toFixed(1),
    },
    serverHeapUsedMiBAtEnd: +(endSample.heapUsedBytes / MiB).toFixed(1),
    bytesPerIdleConnection: { ws: Math.round(perIdleWs), socketio: Math.round(perIdleSio) },
    bytesPerConnection: Math.round(perConnection),
    bytesPerStoppedReader: Math.round(perDead),
    ackMsAfterStoppedReadersSettled: deadSettledAt === undefined ? null : summarize(stats.ack.between(deadSettledAt, measureTo)),
    stoppedReadersRssMiB:
      deadOpened && deadHung
        ? { before: +(deadOpened.rssBytes / MiB).toFixed(1), after5s: +(deadHung.rssBytes / MiB).toFixed(1), end: +(endSample.rssBytes / MiB).toFixed(1) }
        : null,
    generatorEventLoopDelayMs: ((l) => ({ medianP99: l[Math.floor(l.length / 2)] ?? null, worstP99: l.at(-1) ?? null }))(
      [...generatorLagP99s].sort((a, b) => a - b),
    ),
    eventLoopDelayMs: { medianP99: eldP99s[Math.floor(eldP99s.length / 2)] ?? null, worstP99: eldP99s.at(-1) ?? null, max: eldMax },
    verified:
      verification === null
        ? null
        : {
            acked: verification.acked,
            replies: verification.replies,
            lost,
            integrity: verification.integrity,
            corruptConversations: verification.corruptConversations.length,
          },
    serverExitCode: exitCode,
  }),
);
process.exit(lost !== null && lost > 0 ? 1 : 0);
