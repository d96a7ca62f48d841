/**
 * npm run bench:soak -- [--minutes 10] [--active 100] [--idle 200] [--chats-per-second 50]
 *                       [--lookups-per-second 20] [--crash-every-seconds 30] [--disconnect-every-seconds 10]
 *                       [--disconnect-share 0.1] [--sample-seconds 5] [--warmup-minutes N] [--seed 1]
 *
 * The soak: chatwire (dev provider, fault injection on, its own process,
 * seeded data dir) under steady load from /ws and socket.io clients (chats
 * with cache hits, continued conversations, cancels; marketplace lookups; idle
 * sockets), while every --crash-every-seconds a worker is made to exit, throw
 * or hang past its deadline (in turn), and every --disconnect-every-seconds a
 * share of the clients drop their connection and resume their tasks on a new
 * one. Reports server RSS and heap over time and their trend after the
 * warm-up (by default the task retention window plus a minute: finished tasks
 * stay in memory that long by design, so memory climbs until then), ack and
 * time-to-first-token p99 per minute, errors by code, and, after a SIGTERM,
 * that every acknowledged message and every announced reply is in SQLite.
 * Prints a table per minute, a summary and one JSON line; exits 1 if anything
 * acknowledged was lost.
 */
import fs from 'node:fs';
import path from 'node:path';
import { createRandom } from '../src/db/marketplace-seed.js';
import { verifyLedger } from '../test/helpers/chat-ledger.js';
import { parseArgs, printTable, settle, sleep, summarize } from './bench-support.js';
import {
  LoadClient,
  LoadStats,
  MiB,
  consumerIds,
  openClients,
  openLoop,
  roundRobin,
  sampleServer,
  startLoadServer,
  type ServerSample,
} from './load-support.js';

const args = parseArgs({
  minutes: '10',
  active: '100',
  idle: '200',
  'chats-per-second': '50',
  'lookups-per-second': '20',
  'crash-every-seconds': '30',
  'disconnect-every-seconds': '10',
  'disconnect-share': '0.1',
  'sample-seconds': '5',
  'warmup-minutes': '',
  'retention-ms': '300000',
  seed: '1',
});
const MINUTES = Math.min(24 * 60, Math.max(1, Number(args.minutes)));
const ACTIVE = Math.max(1, Math.floor(Number(args.active)));
const IDLE = Math.max(0, Math.floor(Number(args.idle)));
const CHATS_PER_SECOND = Number(args['chats-per-second']);
const LOOKUPS_PER_SECOND = Number(args['lookups-per-second']);
const CRASH_EVERY_MS = Number(args['crash-every-seconds']) * 1000;
const DISCONNECT_EVERY_MS = Number(args['disconnect-every-seconds']) * 1000;
const DISCONNECT_SHARE = Number(args['disconnect-share']);
const SAMPLE_MS = Number(args['sample-seconds']) * 1000;
const RETENTION_MS = Math.max(300_000, Number(args['retention-ms']));
const WARMUP_MINUTES = args['warmup-minutes'] === '' ? Math.min(MINUTES / 2, Math.ceil(RETENTION_MS / 60_000) + 1) : Number(args['warmup-minutes']);
const random = createRandom(Number(args.seed)).next;
const SEED_REQUESTS = 20_000;

const log = (line: string) => process.stderr.write(`${line}\n`);
log(
  `bench:soak: ${MINUTES} min, ${ACTIVE} active + ${IDLE} idle clients, ${CHATS_PER_SECOND} chats/s, ${LOOKUPS_PER_SECOND} lookups/s, a worker fault every ${CRASH_EVERY_MS / 1000}s, ${DISCONNECT_SHARE * 100}% of clients drop every ${DISCONNECT_EVERY_MS / 1000}s; warm-up ${WARMUP_MINUTES} min`,
);
const server = await startLoadServer({
  seedRequests: SEED_REQUESTS,
  env: {
    CHATWIRE_DEV_FAULTS: 'true',
    CHATWIRE_WORKER_THREADS: '2',
    CHATWIRE_TASKS_PER_WORKER: '256',
    CHATWIRE_DEV_TOKEN_DELAY_MS: '15',
    // A hung worker is asked to stop at 5 s and replaced 2 s later.
    CHATWIRE_TASK_TIMEOUT_MS: '5000',
    CHATWIRE_TASK_RETENTION_MS: String(RETENTION_MS),
  },
});
const base = `http://127.0.0.1:${server.port}`;
const stats = new LoadStats();
const sampler = sampleServer(server.port, SAMPLE_MS, server.pid);
const consumers = consumerIds(SEED_REQUESTS);
const usesSocketIo = (i: number) => i % 5 === 0;

const idle = await openClients(IDLE, (i) => LoadClient.open(base, `soak-idle-${i}`, usesSocketIo(i) ? 'socket.io' : 'ws', stats, random));
const active = await openClients(ACTIVE, (i) =>
  LoadClient.open(base, consumers[i % consumers.length] as string, usesSocketIo(i) ? 'socket.io' : 'ws', stats, random),
);
const faulter = await LoadClient.open(base, 'soak-faults', 'ws', stats, random);

// ---------- steady load ----------
let skipped = 0;
let running = true;
const nextReady = roundRobin(active, (c) => c.ready && c.inFlight < 16);
const stopLoad = openLoop(
  { chatsPerSecond: CHATS_PER_SECOND, lookupsPerSecond: LOOKUPS_PER_SECOND },
  {
    chat: () => {
      const c = nextReady();
      if (!c) {
        skipped++;
        return;
      }
      if (random() < 0.2) c.chat({ text: `popular question number ${Math.floor(random() * 20)}`, cache: 'use', cancel: random() < 0.05 });
      else
        c.chat({
          text: `${c.user} asks about job ${stats.chatsSent} (${random().toString(36).slice(2, 10)})`,
          cache: 'use',
          continueConversation: random() < 0.3,
          cancel: random() < 0.05,
        });
    },
    lookup: () => nextReady()?.lookup(),
  },
);

// ---------- faults ----------
const FAULTS = ['exit', 'throw', 'hang'] as const;
let faultsSent = 0;
const faultTimer = setInterval(
  () => {
    if (!running || !faulter.ready || CRASH_EVERY_MS <= 0) return;
    const kind = FAULTS[faultsSent % FAULTS.length] as string;
    faultsSent++;
    faulter.chat({ text: `/fault ${kind}`, cache: 'bypass' });
  },
  Math.max(1000, CRASH_EVERY_MS),
);
let disconnects = 0;
const disconnectTimer = setInterval(
  () => {
    if (!running || DISCONNECT_EVERY_MS <= 0) return;
    for (const c of active) {
      if (c.ready && random() < DISCONNECT_SHARE) {
        disconnects++;
        void c.disconnectAndResume();
      }
    }
  },
  Math.max(1000, DISCONNECT_EVERY_MS),
);

// ---------- per-minute figures ----------
interface Minute {
  minute: number;
  chats: number;
  ack: ReturnType<typeof summarize>;
  ttft: ReturnType<typeof summarize>;
  lookup: ReturnType<typeof summarize>;
  errors: Record<string, number>;
  rssMiB: number;
  rssAnonMiB: number;
  rssFileMiB: number;
  heapMiB: number;
  heapMinMiB: number;
  eldP99Ms: number;
  workerFailures: number;
}
const minutes: Minute[] = [];
const started = performance.now();
let errorsBefore: Record<string, number> = {};
let sentBefore = 0;
for (let m = 1; m <= MINUTES; m++) {
  await sleep(Math.max(0, started + m * 60_000 - performance.now()));
  const from = started + (m - 1) * 60_000;
  const to = started + m * 60_000;
  const inMinute = sampler.samples.filter((s) => s.at >= from && s.at < to);
  const lastSample = (inMinute.at(-1) ?? sampler.latest()) as ServerSample;
  const errors: Record<string, number> = {};
  for (const [code, n] of Object.entries(stats.errors)) if (n - (errorsBefore[code] ?? 0) > 0) errors[code] = n - (errorsBefore[code] ?? 0);
  errorsBefore = { ...stats.errors };
  minutes.push({
    minute: m,
    chats: stats.chatsSent - sentBefore,
    ack: summarize(stats.ack.between(from, to)),
    ttft: summarize(stats.ttft.between(from, to)),
    lookup: summarize(stats.lookup.between(from, to)),
    errors,
    rssMiB: lastSample.rssBytes / MiB,
    rssAnonMiB: (lastSample.rssAnonBytes ?? NaN) / MiB,
    rssFileMiB: (lastSample.rssFileBytes ?? NaN) / MiB,
    heapMiB: lastSample.heapUsedBytes / MiB,
    heapMinMiB: Math.min(...inMinute.map((s) => s.heapUsedBytes)) / MiB,
    eldP99Ms: Math.max(...inMinute.map((s) => s.eldP99Ms)),
    workerFailures: lastSample.workerFailures,
  });
  sentBefore = stats.chatsSent;
  const row = minutes.at(-1) as Minute;
  log(
    `minute ${m}: ${row.chats} chats, ack p99 ${row.ack.p99.toFixed(1)} ms, ttft p99 ${row.ttft.p99.toFixed(1)} ms, RSS ${row.rssMiB.toFixed(0)} MiB, heap ${row.heapMiB.toFixed(0)} MiB, ` +
      `errors ${JSON.stringify(row.errors)}, worker failures so far ${row.workerFailures}, dropped ${stats.dropped}`,
  );
}
running = false;
stopLoad();
clearInterval(faultTimer);
clearInterval(disconnectTimer);

// ---------- settle, stop, verify ----------
const unfinished = await settle([...active, faulter], 60_000);
await sampler.stop();
await Promise.all([...idle, ...active, faulter].map((c) => c.close().catch(() => {})));
const exitCode = await server.terminate();
// What SQLite's page cache (cache_size 64 MiB) can hold of the database grows with it: part of the RSS after warm-up.
const sqliteMiB = ['', '-wal'].reduce((n, suffix) => n + (fs.existsSync(server.dbFile + suffix) ? fs.statSync(server.dbFile + suffix).size : 0), 0) / MiB;
const cacheMiB = fs.existsSync(path.join(server.dataDir, 'cache', 'data.mdb')) ? fs.statSync(path.join(server.dataDir, 'cache', 'data.mdb')).size / MiB : NaN;
const v = verifyLedger(server.dbFile, stats.ledger);
server.removeDataDir();

// ---------- trend after warm-up ----------
const warmEnd = started + WARMUP_MINUTES * 60_000;
const after = sampler.samples.filter((s) => s.at >= warmEnd);
function slopePerMinute(points: { at: number; v: number }[]): number {
  if (points.length < 2) return NaN;
  const xs = points.map((p) => (p.at - started) / 60_000);
  const mx = xs.reduce((a, b) => a + b, 0) / xs.length;
  const my = points.reduce((a, p) => a + p.v, 0) / points.length;
  let num = 0;
  let den = 0;
  points.forEach((p, i) => {
    num += ((xs[i] as number) - mx) * (p.v - my);
    den += ((xs[i] as number) - mx) ** 2;
  });
  return num / den;
}
const rssSlope = slopePerMinute(after.map((s) => ({ at: s.at, v: s.rssBytes / MiB })));
const heapSlope = slopePerMinute(after.map((s) => ({ at: s.at, v: s.heapUsedBytes / MiB })));
const afterMinutes = minutes.filter((m) => m.minute > WARMUP_MINUTES);
const totalErrors: Record<string, number> = { ...stats.errors };
const lost = v.lostAcked.length + v.lostReplies.length;

printTable(
  `bench:soak — ${MINUTES} min: ${ACTIVE} active (20% socket.io) + ${IDLE} idle clients, ${CHATS_PER_SECOND} chats/s + ${LOOKUPS_PER_SECOND} lookups/s offered; ` +
    `a worker fault every ${CRASH_EVERY_MS / 1000}s (exit/throw/hang), ${DISCONNECT_SHARE * 100}% of clients drop + resume every ${DISCONNECT_EVERY_MS / 1000}s`,
  [
    'minute',
    'chats',
    'ack p50 ms',
    'ack p99 ms',
    'ttft p99 ms',
    'lookup p99 ms',
    'RSS MiB (anon + file)',
    'heap MiB (min)',
    'eld p99 ms',
    'worker failures',
    'errors',
  ],
  minutes.map((m) => [
    String(m.minute),
    String(m.chats),
    m.ack.p50,
    m.ack.p99,
    m.ttft.p99,
    m.lookup.p99,
    `${m.rssMiB.toFixed(0)} (${m.rssAnonMiB.toFixed(0)} + ${m.rssFileMiB.toFixed(0)})`,
    `${m.heapMiB.toFixed(0)} (${m.heapMinMiB.toFixed(0)})`,
    m.eldP99Ms,
    String(m.workerFailures),
    Object.entries(m.errors)
      .map(([k, n]) => `${k}:${n}`)
      .join(' ') || 'none',
  ]),
);
printTable(
  'bench:soak — summary',
  ['figure', 'value'],
  [
    ['chats sent / acked / ended', `${stats.chatsSent} / ${stats.chatsAcked} / ${stats.chatsDone + stats.chatsFailed}`],
    ['chats not sent (clients at their in-flight cap)', String(skipped)],
    ['worker faults injected / model calls failed with a worker', `${faultsSent} / ${sampler.samples.at(-1)?.workerFailures ?? '?'}`],
    ['clients dropped + resumed / tasks resumed', `${disconnects} / ${stats.resumes}`],
    [
      'errors by code (whole run)',
      Object.entries(totalErrors)
        .map(([k, n]) => `${k}:${n}`)
        .join(' ') || 'none',
    ],
    [
      'delta seq gaps / double ends / unfinished after settle / dropped by server',
      `${stats.ledger.seqGaps} / ${stats.ledger.duplicateEnds} / ${unfinished} / ${stats.dropped}`,
    ],
    [
      `RSS MiB after warm-up (${WARMUP_MINUTES} min): first / last / slope per min`,
      after.length
        ? `${(after[0]!.rssBytes / MiB).toFixed(0)} / ${(after.at(-1)!.rssBytes / MiB).toFixed(0)} / ${rssSlope.toFixed(2)}`
        : 'run longer than the warm-up',
    ],
    [
      'heap used MiB after warm-up: first / last / slope per min',
      after.length ? `${(after[0]!.heapUsedBytes / MiB).toFixed(0)} / ${(after.at(-1)!.heapUsedBytes / MiB).toFixed(0)} / ${heapSlope.toFixed(2)}` : '-',
    ],
    ['heap used MiB, lowest sample of each minute after warm-up (the GC baseline)', afterMinutes.map((m) => m.heapMinMiB.toFixed(0)).join(' ') || '-'],
    [
      'RSS MiB anon / file-backed after warm-up: first -> last',
      after.length && after[0]!.rssAnonBytes !== undefined
        ? `${(after[0]!.rssAnonBytes! / MiB).toFixed(0)} -> ${(after.at(-1)!.rssAnonBytes! / MiB).toFixed(0)} / ${(after[0]!.rssFileBytes! / MiB).toFixed(0)} -> ${(after.at(-1)!.rssFileBytes! / MiB).toFixed(0)}`
        : '-',
    ],
    [
      'V8 heap committed / external MiB after warm-up: first -> last',
      after.length
        ? `${(after[0]!.heapTotalBytes / MiB).toFixed(0)} -> ${(after.at(-1)!.heapTotalBytes / MiB).toFixed(0)} / ${(after[0]!.externalBytes / MiB).toFixed(0)} -> ${(after.at(-1)!.externalBytes / MiB).toFixed(0)}`
        : '-',
    ],
    ['SQLite database (+ WAL) / LMDB reply cache file MiB at the end', `${sqliteMiB.toFixed(0)} / ${cacheMiB.toFixed(0)}`],
    ['ack p99 ms after warm-up: worst minute', afterMinutes.length ? Math.max(...afterMinutes.map((m) => m.ack.p99)).toFixed(1) : '-'],
    ['acknowledged chats checked in SQLite / lost', `${v.acked} / ${lost}`],
    ['announced replies checked / lost', `${v.replies} / ${v.lostReplies.length}`],
    ['SQLite integrity_check / server exit on SIGTERM', `${v.integrity} / ${exitCode}`],
  ],
);
console.log(
  JSON.stringify({
    bench: 'soak',
    minutes: MINUTES,
    warmupMinutes: WARMUP_MINUTES,
    active: ACTIVE,
    idle: IDLE,
    offered: { chatsPerSecond: CHATS_PER_SECOND, lookupsPerSecond: LOOKUPS_PER_SECOND },
    perMinute: minutes.map((m) => ({
      minute: m.minute,
      chats: m.chats,
      ackP50Ms: +m.ack.p50.toFixed(2),
      ackP99Ms: +m.ack.p99.toFixed(2),
      ttftP99Ms: +m.ttft.p99.toFixed(2),
      lookupP99Ms: +m.lookup.p99.toFixed(2),
      rssMiB: +m.rssMiB.toFixed(1),
      rssAnonMiB: +m.rssAnonMiB.toFixed(1),
      rssFileMiB: +m.rssFileMiB.toFixed(1),
      heapMiB: +m.heapMiB.toFixed(1),
      heapMinMiB: +m.heapMinMiB.toFixed(1),
      eldP99Ms: +m.eldP99Ms.toFixed(1),
      errors: m.errors,
    })),
    memory: {
      samples: sampler.samples.map((s) => ({
        t: +((s.at - started) / 1000).toFixed(0),
        rssMiB: +(s.rssBytes / MiB).toFixed(1),
        anonMiB: s.rssAnonBytes === undefined ? null : +(s.rssAnonBytes / MiB).toFixed(1),
        fileMiB: s.rssFileBytes === undefined ? null : +(s.rssFileBytes / MiB).toFixed(1),
        heapMiB: +(s.heapUsedBytes / MiB).toFixed(1),
        heapTotalMiB: +(s.heapTotalBytes / MiB).toFixed(1),
        externalMiB: +(s.externalBytes / MiB).toFixed(1),
      })),
      rssSlopeMiBPerMin: +rssSlope.toFixed(3),
      heapSlopeMiBPerMin: +heapSlope.toFixed(3),
    },
    faultsInjected: faultsSent,
    workerFailures: sampler.samples.at(-1)?.workerFailures ?? null,
    disconnects,
    resumes: stats.resumes,
    errors: totalErrors,
    seqGaps: stats.ledger.seqGaps,
    duplicateEnds: stats.ledger.duplicateEnds,
    unfinished,
    droppedByServer: stats.dropped,
    acked: v.acked,
    lostAcked: v.lostAcked.length,
    lostReplies: v.lostReplies.length,
    integrity: v.integrity,
    serverExitCode: exitCode,
    sqliteMiB: +sqliteMiB.toFixed(1),
    cacheFileMiB: +cacheMiB.toFixed(1),
  }),
);
process.exit(lost > 0 ? 1 : 0);
