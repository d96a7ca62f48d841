/**
 * What the response cache and single-flight buy, measured through a real
 * chatwire server (its own process, dev provider) over /ws, side by side in one run.
 *
 *   npm run bench:cache -- [--questions 1500] [--requests 1200] [--zipf 0.8] [--seed 1]
 *                          [--hit-samples 400] [--miss-samples 24] [--throughput-clients 32] [--throughput-seconds 3]
 *                          [--flight-size 100] [--flight-groups 3]
 *
 * 1. Hit rate. A generated workload: `requests` questions drawn from
 *    `questions` distinct ones by a Zipf law (a few popular questions, a long
 *    tail), each asked in one of five surface forms (as typed, CRLF line ends,
 *    doubled spaces, NFD accents, NFD + CRLF). It is replayed one chat at a
 *    time through a server with CHATWIRE_DEV_TOKEN_DELAY_MS=0 (the hit rate
 *    does not depend on the model's speed): the normalized key's hit rate is
 *    MEASURED there (acks with status cached). The raw exact-text key is not
 *    something the server can be switched to, so its hit rate is COMPUTED by
 *    an in-benchmark counter: rawCacheKey and cacheKey over the same sequence
 *    (an unbounded cache, as the server's is for this workload). The counter's
 *    normalized figure must equal the server's, which checks the counter.
 * 2. Latency. The server restarts on the same data dir (the cache survives)
 *    with the default token delay (15 ms), so a miss takes as long as a
 *    32-token model reply. On the same sockets, one request at a time: the
 *    ping round trip, the full reply of a hit (send to chat.done), and the
 *    full reply of a miss (a question never asked before).
 * 3. Hits per second: `throughput-clients` sockets in a closed loop, each
 *    asking cached questions, for `throughput-seconds`.
 * 4. Single-flight: `flight-groups` times, `flight-size` sockets send the same
 *    new question at once; the model calls are counted per group.
 *
 * The server runs in its own process (dist/src/main.js), the clients in
 * this one, so each side has its own event loop and heap, as in a
 * deployment. Prints a table, then one JSON line.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import WebSocket from 'ws';
import { cacheKey, rawCacheKey } from '../src/cache/cache-key.js';
import { createRandom } from '../src/db/marketplace-seed.js';
import { DIST, scrape, startChild, type Child } from './bench-support.js';

const { values: args } = parseArgs({
  options: {
    questions: { type: 'string', default: '1500' },
    requests: { type: 'string', default: '1200' },
    zipf: { type: 'string', default: '0.8' },
    seed: { type: 'string', default: '1' },
    'hit-samples': { type: 'string', default: '400' },
    'miss-samples': { type: 'string', default: '24' },
    'throughput-clients': { type: 'string', default: '32' },
    'throughput-seconds': { type: 'string', default: '3' },
    'flight-size': { type: 'string', default: '100' },
    'flight-groups': { type: 'string', default: '3' },
  },
});

function intArg(name: keyof typeof args, min: number): number {
  const n = Number(args[name]);
  if (!Number.isInteger(n) || n < min) throw new Error(`--${name} must be an integer >= ${min}`);
  return n;
}
const questionCount = intArg('questions', 1);
const requestCount = intArg('requests', 1);
const zipfS = Number(args.zipf);
if (!(zipfS >= 0)) throw new Error('--zipf must be a number >= 0');
const seed = intArg('seed', 0);
const hitSamples = intArg('hit-samples', 10);
const missSamples = intArg('miss-samples', 2);
const throughputClients = intArg('throughput-clients', 1);
const throughputSeconds = Number(args['throughput-seconds']);
const flightSize = intArg('flight-size', 2);
const flightGroups = intArg('flight-groups', 1);
const MODEL = 'dev-1';

// ---------------------------------------------------------------- workload

const TRADES = ['plumber', 'electrician', 'gardener', 'painter', 'roofer', 'cleaner', 'carpenter', 'locksmith', 'tiler', 'handyman'];
const PLACES = ['kitchen', 'bathroom', 'garden', 'garage', 'attic', 'hallway', 'café', 'studio'];
const WHENS = ['tomorrow morning', 'this weekend', 'next week', 'on Friday'];
// Every question has an accented word and a line break, so its NFD and CRLF forms really differ from it.
const EXTRAS = [
  'Is the résumé of the team available?',
  'Do you cover the São Paulo area?',
  'Can you match a crème colour?',
  'Is a déjà-vu second visit free?',
  'What does the façade cost?',
  'Naïve question: is VAT included?',
];

const FORMS: { name: string; apply: (q: string) => string }[] = [
  { name: 'as typed', apply: (q) => q },
  { name: 'CRLF', apply: (q) => q.replaceAll('\n', '\r\n') },
  { name: 'doubled spaces', apply: (q) => `${q.split(' ').join('  ')} ` },
  { name: 'NFD', apply: (q) => q.normalize('NFD') },
  { name: 'NFD + CRLF', apply: (q) => q.normalize('NFD').replaceAll('\n', '\r\n') },
];

function allQuestions(): string[] {
  const out: string[] = [];
  for (const extra of EXTRAS)
    for (const when of WHENS) for (const place of PLACES) for (const trade of TRADES) out.push(`Can a ${trade} come to my ${place} ${when}?\n${extra}`);
  return out;
}

/** `requestCount` texts: a Zipf(s) draw over `questionCount` questions, each in a uniformly drawn surface form. */
function generateWorkload(): { texts: string[]; popular: string[] } {
  const rnd = createRandom(seed);
  const pool = allQuestions();
  if (questionCount > pool.length) throw new Error(`--questions is at most ${pool.length}`);
  // A seeded shuffle, so rank 1 is not always the same template.
  for (let i = pool.length - 1; i > 0; i--) {
    const j = rnd.int(i + 1);
    [pool[i], pool[j]] = [pool[j] as string, pool[i] as string];
  }
  const questions = pool.slice(0, questionCount);
  const cumulative: number[] = [];
  let total = 0;
  for (let r = 1; r <= questionCount; r++) {
    total += 1 / r ** zipfS;
    cumulative.push(total);
  }
  const draw = (): number => {
    const x = rnd.next() * total;
    let lo = 0;
    let hi = cumulative.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if ((cumulative[mid] as number) < x) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  const texts: string[] = [];
  const asked = new Map<string, number>();
  for (let i = 0; i < requestCount; i++) {
    const q = questions[draw()] as string;
    asked.set(q, (asked.get(q) ?? 0) + 1);
    texts.push((FORMS[rnd.int(FORMS.length)] as (typeof FORMS)[number]).apply(q));
  }
  // The most asked questions of this workload: all of them are in the cache once it has been replayed.
  const popular = [...asked.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, 50)
    .map(([q]) => q);
  return { texts, popular };
}

/** The hit rate of a key function over the sequence, with an unbounded cache: a key seen before is a hit. */
function countedHitRate(texts: string[], key: typeof cacheKey): { hits: number; rate: number } {
  const seen = new Set<string>();
  let hits = 0;
  for (const text of texts) {
    // The same input the server keys a dev chat by (ChatCache.keyOf in src/app.ts): no temperature, no maxTokens.
    const k = key({ provider: 'dev', backend: '', model: MODEL, messages: [{ role: 'user', content: text }] });
    if (seen.has(k)) hits++;
    else seen.add(k);
  }
  return { hits, rate: hits / texts.length };
}

// ---------------------------------------------------------------- server and client

/** chatwire in its own process (as a deployment runs it: clients are never in the server's process) on `dataDir`. */
function startServer(dataDir: string, devTokenDelayMs: number): Promise<Child> {
  return startChild(path.join(DIST, 'src', 'main.js'), {
    PORT: '0',
    HOST: '127.0.0.1',
    CHATWIRE_DATA_DIR: dataDir,
    CHATWIRE_DEV_TOKEN_DELAY_MS: String(devTokenDelayMs),
    CHATWIRE_CHATS_PER_MINUTE: '1000000',
    CHATWIRE_MESSAGES_PER_SECOND: '1000000',
    CHATWIRE_MODEL_TOKENS_PER_MINUTE: '1000000000',
    CHATWIRE_MAX_CONNECTIONS_PER_USER: '1000',
    CHATWIRE_MAX_RUNNING_PER_USER: '100000',
    // info: the start line carries the port.
    LOG_LEVEL: 'info',
  });
}

type Msg = Record<string, unknown> & { type: string };

interface ChatResult {
  status: string;
  text: string;
  seqOk: boolean;
  end: Msg;
  /** From the send to the chat.ack, ms. */
  ackMs: number;
  /** From the send to the chat.done / chat.error, ms. */
  totalMs: number;
}

/** A lean /ws client: replies matched by id, a chat's frames by task id (registered when its ack arrives). */
class BenchClient {
  private nextId = 0;
  private readonly replies = new Map<string, (m: Msg) => void>();
  private readonly tasks = new Map<string, (m: Msg) => void>();

  private constructor(private readonly ws: WebSocket) {
    ws.on('message', (data) => {
      const m = JSON.parse(data.toString()) as Msg;
      const id = m.id as string | undefined;
      if (id !== undefined && this.replies.has(id)) {
        const reply = this.replies.get(id) as (m: Msg) => void;
        this.replies.delete(id);
        reply(m);
        return;
      }
      const taskId = m.taskId as string | undefined;
      if (taskId !== undefined) this.tasks.get(taskId)?.(m);
    });
  }

  static connect(url: string, user: string): Promise<BenchClient> {
    const ws = new WebSocket(`${url}?user=${encodeURIComponent(user)}`);
    return new Promise((resolve, reject) => {
      ws.once('message', () => resolve(new BenchClient(ws)));
      ws.once('error', reject);
    });
  }

  request(message: Record<string, unknown>): Promise<Msg> {
    const id = `b${++this.nextId}`;
    return new Promise((resolve) => {
      this.replies.set(id, resolve);
      this.ws.send(JSON.stringify({ ...message, id }));
    });
  }

  async ping(): Promise<number> {
    const t0 = performance.now();
    await this.request({ type: 'ping' });
    return performance.now() - t0;
  }

  chat(text: string): Promise<ChatResult> {
    const t0 = performance.now();
    const id = `b${++this.nextId}`;
    return new Promise((resolve, reject) => {
      let text_ = '';
      let expectSeq = 0;
      let seqOk = true;
      let ackMs = 0;
      this.replies.set(id, (ack) => {
        ackMs = performance.now() - t0;
        if (ack.type !== 'chat.ack') {
          reject(new Error(`chat refused: ${JSON.stringify(ack)}`));
          return;
        }
        const taskId = ack.taskId as string;
        // Registered in the ack's own message event: the task's deltas come after it on this socket.
        this.tasks.set(taskId, (m) => {
          if (m.type === 'chat.delta') {
            if (m.seq !== expectSeq) seqOk = false;
            expectSeq++;
            text_ += m.text as string;
          } else if (m.type === 'chat.done' || m.type === 'chat.error') {
            this.tasks.delete(taskId);
            resolve({ status: ack.status as string, text: text_, seqOk, end: m, ackMs, totalMs: performance.now() - t0 });
          }
        });
      });
      this.ws.send(JSON.stringify({ type: 'chat.send', id, text }));
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      if (this.ws.readyState === WebSocket.CLOSED) resolve();
      this.ws.once('close', () => resolve());
      this.ws.close();
    });
  }
}

const COUNTERS = {
  modelCalls: 'chatwire_model_calls_total',
  cacheHits: 'chatwire_cache_hits_total',
  singleflightJoins: 'chatwire_singleflight_joins_total',
} as const;

async function counter(server: Child, name: keyof typeof COUNTERS): Promise<number> {
  const value = await scrape(server.port, COUNTERS[name]);
  return Number.isNaN(value) ? 0 : value;
}

/** What the cache and single-flight saved, as the server counts it: model calls not made and the tokens they would have cost. */
async function savedBy(server: Child) {
  const read = async (name: string, reason: string) => {
    const value = await scrape(server.port, `${name}{reason="${reason}"}`);
    return Number.isNaN(value) ? 0 : value;
  };
  const of = async (reason: string) => ({
    calls: await read('chatwire_model_calls_saved_total', reason),
    tokens: await read('chatwire_model_tokens_saved_total', reason),
  });
  return { cache: await of('cache'), joined: await of('joined') };
}

/** Mean time of one SQLite group commit since the server started (a hit's question and reply share one). */
async function meanCommitMs(server: Child): Promise<number> {
  const sum = await scrape(server.port, 'chatwire_db_commit_seconds_sum');
  const count = await scrape(server.port, 'chatwire_db_commit_seconds_count');
  return !(count > 0) ? 0 : Math.round((sum / count) * 1e6) / 1000;
}

function percentile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))] as number;
}

function summary(samples: number[]): { n: number; p50: number; p99: number } {
  const sorted = [...samples].sort((a, b) => a - b);
  const r = (x: number) => Math.round(x * 1000) / 1000;
  return { n: samples.length, p50: r(percentile(sorted, 0.5)), p99: r(percentile(sorted, 0.99)) };
}

const connectAll = (url: string, n: number, prefix: string) => Promise.all(Array.from({ length: n }, (_, i) => BenchClient.connect(url, `${prefix}-${i}`)));

// ---------------------------------------------------------------- phases

async function hitRatePhase(dataDir: string, texts: string[]) {
  const server = await startServer(dataDir, 0);
  const url = `ws://127.0.0.1:${server.port}/ws`;
  const clients = await connectAll(url, 4, 'replay');
  let served = 0;
  let bad = 0;
  try {
    // One chat at a time, so that no two identical requests overlap: every repeat is a cache hit, never a join.
    for (const [i, text] of texts.entries()) {
      const r = await (clients[i % clients.length] as BenchClient).chat(text);
      if (r.status === 'cached') served++;
      if (r.end.type !== 'chat.done' || !r.seqOk) bad++;
    }
    return {
      hits: served,
      rate: served / texts.length,
      bad,
      metricHits: await counter(server, 'cacheHits'),
      modelCalls: await counter(server, 'modelCalls'),
      saved: await savedBy(server),
    };
  } finally {
    await Promise.all(clients.map((c) => c.close()));
    await server.stop();
  }
}

async function latencyPhase(server: Child, popular: string[]) {
  const url = `ws://127.0.0.1:${server.port}/ws`;
  const clients = await connectAll(url, 4, 'latency');
  const pings: number[] = [];
  const hits: number[] = [];
  const hitAcks: number[] = [];
  const misses: number[] = [];
  let notCached = 0;
  try {
    // Warm-up outside the measurement (JIT, first frames).
    for (let i = 0; i < 40; i++) {
      const c = clients[i % clients.length] as BenchClient;
      await c.ping();
      await c.chat(popular[i % popular.length] as string);
    }
    for (let i = 0; i < hitSamples; i++) {
      const c = clients[i % clients.length] as BenchClient;
      pings.push(await c.ping());
      const r = await c.chat(popular[i % popular.length] as string);
      if (r.status !== 'cached') notCached++;
      hits.push(r.totalMs);
      hitAcks.push(r.ackMs);
    }
    for (let i = 0; i < missSamples; i++) {
      const c = clients[i % clients.length] as BenchClient;
      pings.push(await c.ping());
      const r = await c.chat(`A question never asked before, number ${i}, run ${Date.now()}`);
      if (r.status !== 'queued') notCached++;
      misses.push(r.totalMs);
    }
  } finally {
    await Promise.all(clients.map((c) => c.close()));
  }
  return {
    ping: summary(pings),
    hit: summary(hits),
    hitAck: summary(hitAcks),
    miss: summary(misses),
    unexpected: notCached,
    commitMs: await meanCommitMs(server),
  };
}

async function throughputPhase(server: Child, popular: string[]) {
  const url = `ws://127.0.0.1:${server.port}/ws`;
  const clients = await connectAll(url, throughputClients, 'load');
  let served = 0;
  let other = 0;
  const t0 = performance.now();
  const until = t0 + throughputSeconds * 1000;
  try {
    await Promise.all(
      clients.map(async (c, ci) => {
        for (let i = ci; performance.now() < until; i += clients.length) {
          const r = await c.chat(popular[i % popular.length] as string);
          if (r.status === 'cached' && r.end.type === 'chat.done') served++;
          else other++;
        }
      }),
    );
  } finally {
    await Promise.all(clients.map((c) => c.close()));
  }
  const seconds = (performance.now() - t0) / 1000;
  return { clients: throughputClients, seconds: Math.round(seconds * 100) / 100, hits: served, other, hitsPerSecond: Math.round(served / seconds) };
}

async function singleFlightPhase(server: Child) {
  const url = `ws://127.0.0.1:${server.port}/ws`;
  const clients = await connectAll(url, flightSize, 'flight');
  const groups: { requests: number; modelCalls: number; joins: number; identical: boolean }[] = [];
  try {
    for (let g = 0; g < flightGroups; g++) {
      const text = `Everyone asks this at once: group ${g}, run ${Date.now()}`;
      const calls0 = await counter(server, 'modelCalls');
      const joins0 = await counter(server, 'singleflightJoins');
      const results = await Promise.all(clients.map((c) => c.chat(text)));
      const first = results[0] as ChatResult;
      groups.push({
        requests: results.length,
        modelCalls: (await counter(server, 'modelCalls')) - calls0,
        joins: (await counter(server, 'singleflightJoins')) - joins0,
        identical: results.every((r) => r.text === first.text && r.seqOk && r.end.type === 'chat.done'),
      });
    }
  } finally {
    await Promise.all(clients.map((c) => c.close()));
  }
  const requests = groups.reduce((n, g) => n + g.requests, 0);
  const modelCalls = groups.reduce((n, g) => n + g.modelCalls, 0);
  return {
    groups,
    requests,
    modelCalls,
    saved: requests - modelCalls,
    onePerGroup: groups.every((g) => g.modelCalls === 1),
    allIdentical: groups.every((g) => g.identical),
  };
}

// ---------------------------------------------------------------- run

const started = performance.now();
const { texts, popular } = generateWorkload();
const counted = { normalized: countedHitRate(texts, cacheKey), raw: countedHitRate(texts, rawCacheKey) };
const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-bench-cache-'));
let measured: Awaited<ReturnType<typeof hitRatePhase>>;
let latency: Awaited<ReturnType<typeof latencyPhase>>;
let throughput: Awaited<ReturnType<typeof throughputPhase>>;
let flight: Awaited<ReturnType<typeof singleFlightPhase>>;
let savedLater: Awaited<ReturnType<typeof savedBy>>;
try {
  measured = await hitRatePhase(dataDir, texts);
  // Same data dir, default model speed: the replay above filled the cache, and it survives the restart.
  const server = await startServer(dataDir, 15);
  try {
    latency = await latencyPhase(server, popular);
    throughput = await throughputPhase(server, popular);
    flight = await singleFlightPhase(server);
    savedLater = await savedBy(server);
  } finally {
    await server.stop();
  }
} finally {
  fs.rmSync(dataDir, { recursive: true, force: true });
}

const pct = (x: number) => `${(x * 100).toFixed(1)}%`;
const ratio = (a: number, b: number) => Math.round((a / b) * 100) / 100;
const keyRatio = ratio(measured.rate, counted.raw.rate);
const hitVsPing = ratio(latency.hit.p99, latency.ping.p99);
const targets = {
  hitP99Within2xPingP99: hitVsPing <= 2,
  normalizedAtLeast1_5xRaw: keyRatio >= 1.5,
  oneModelCallPerGroup: flight.onePerGroup,
};
const checks = {
  counterMatchesServer: counted.normalized.hits === measured.hits && measured.metricHits === measured.hits && measured.saved.cache.calls === measured.hits,
  everyReplyComplete: measured.bad === 0 && latency.unexpected === 0 && throughput.other === 0 && flight.allIdentical,
};

const rows: [string, string, string][] = [
  ['workload', `${requestCount} chats over ${questionCount} questions, Zipf s=${zipfS}, ${FORMS.length} surface forms`, ''],
  ['hit rate, normalized key', `${pct(measured.rate)} (${measured.hits}/${requestCount})`, 'measured through the server'],
  ['hit rate, normalized key', pct(counted.normalized.rate), 'in-benchmark counter (cross-check)'],
  ['hit rate, raw exact-text key', pct(counted.raw.rate), 'in-benchmark counter, same sequence'],
  [
    'model calls saved by the cache',
    `${measured.saved.cache.calls} of ${requestCount} (${measured.saved.cache.tokens} tokens)`,
    'chatwire_model_calls_saved_total / chatwire_model_tokens_saved_total {reason="cache"}, hit-rate phase',
  ],
  [
    'model calls saved by single-flight',
    `${savedLater.joined.calls} (${savedLater.joined.tokens} tokens)`,
    '{reason="joined"}, over the latency, throughput and single-flight phases',
  ],
  ['normalized / raw', `${keyRatio}x`, `target >= 1.5x: ${targets.normalizedAtLeast1_5xRaw ? 'met' : 'MISSED'}`],
  ['ping round trip p50 / p99', `${latency.ping.p50} / ${latency.ping.p99} ms`, `n=${latency.ping.n}`],
  ['hit, full reply p50 / p99', `${latency.hit.p50} / ${latency.hit.p99} ms`, `n=${latency.hit.n}`],
  ['hit, ack p50 / p99', `${latency.hitAck.p50} / ${latency.hitAck.p99} ms`, `after its group commit (mean ${latency.commitMs} ms per commit)`],
  ['miss, full reply p50 / p99', `${latency.miss.p50} / ${latency.miss.p99} ms`, `n=${latency.miss.n}, 32 tokens at 15 ms`],
  ['hit p99 / ping p99', `${hitVsPing}x`, `target <= 2x: ${targets.hitP99Within2xPingP99 ? 'met' : 'MISSED'}`],
  ['hits served per second', String(throughput.hitsPerSecond), `${throughput.clients} sockets, closed loop, ${throughput.seconds} s`],
  [
    `single-flight, ${flightSize} identical at once`,
    `${flight.modelCalls} model calls for ${flight.requests} chats (${flight.saved} saved)`,
    `one per group: ${targets.oneModelCallPerGroup ? 'met' : 'MISSED'}`,
  ],
];
console.log('| figure | value | note |');
console.log('|---|---|---|');
for (const [a, b, c] of rows) console.log(`| ${a} | ${b} | ${c} |`);
console.log('');
console.log(
  JSON.stringify({
    bench: 'cache',
    node: process.version,
    workload: { requests: requestCount, questions: questionCount, zipf: zipfS, forms: FORMS.map((f) => f.name), seed },
    hitRate: {
      normalizedMeasured: Math.round(measured.rate * 10000) / 10000,
      normalizedCounted: Math.round(counted.normalized.rate * 10000) / 10000,
      rawCounted: Math.round(counted.raw.rate * 10000) / 10000,
      ratio: keyRatio,
      modelCallsInReplay: measured.modelCalls,
    },
    saved: { hitRatePhase: measured.saved, laterPhases: savedLater },
    latencyMs: { ping: latency.ping, hit: latency.hit, hitAck: latency.hitAck, miss: latency.miss, hitP99OverPingP99: hitVsPing, meanCommit: latency.commitMs },
    throughput,
    singleFlight: { size: flightSize, groups: flight.groups, requests: flight.requests, modelCalls: flight.modelCalls, saved: flight.saved },
    targets,
    checks,
    runtimeSeconds: Math.round((performance.now() - started) / 100) / 10,
  }),
);
if (!checks.counterMatchesServer || !checks.everyReplyComplete) process.exitCode = 1;
