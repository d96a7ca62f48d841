/**
 * What chatwire's model path costs, measured side by side in one run.
 *
 * upstream: a fake OpenAI-compatible upstream in its own process
 *   (scripts/bench-upstream-server.ts) streams every reply at a fixed pace, each
 *   token stamped with the moment it was written. chatwire runs in its own
 *   process (CHATWIRE_LLM=openai, pointed at that upstream). The clients, here,
 *   run rounds of N concurrent chats in turn: directly against the upstream
 *   (keep-alive HTTP, the SSE events parsed to tokens), through chatwire over
 *   /ws (one socket each, the frames parsed to tokens) and through chatwire's
 *   OpenAI-compatible route (POST /v1/chat/completions, streamed, keep-alive HTTP,
 *   parsed as the direct path parses). Next to chatwire, the relay's floor
 *   (scripts/bench-relay-floor.ts, two processes of its own): the same upstream
 *   request on chatwire's HTTP client and SSE parser, the same /ws frames, and
 *   nothing else, read on its main thread (floor, inline) or in one worker thread
 *   (floor, worker), each read over /ws as chatwire is. The clients do the same
 *   work per token (one JSON.parse per event or frame, the stamps read out of the
 *   text), so the difference between a relayed path and the direct one is what the
 *   relay adds. Rounds alternate (direct, /ws, openai, floor inline, floor worker,
 *   then the reverse, ...) so that a change in the machine's load falls on every
 *   path. Two arrival patterns, each its own rounds:
 *   - burst: all N chats of a round sent at the same moment (the worst case: the
 *     N requests queue behind each other for the CPU on every hop);
 *   - steady: N users in a closed loop, each sending its next chat when its
 *     reply ends, their first chats spread over one reply's length, so about N
 *     replies stream at any time and chats arrive spread out, as from real users:
 *     what one chat costs when the server is not handed N at once.
 * local: the local provider on a generated GGUF model (random weights), run
 *   through the worker pool with 1 and 2 workers and 1, 2 or the library's
 *   default threads per worker: tokens per second.
 *
 * Options: USAGE below (`--help` prints it).
 *
 * Figures (p50 and p99 over every chat, or every token, of every measured round):
 * - first token: the client sending its request (POST / chat.send) to the client holding the first token (the
 *   /v1/chat/completions row next to the /ws one: the same through the OpenAI-compatible route);
 * - token latency: the upstream writing a token to the client holding it (the token's stamp against the
 *   client's clock: process.hrtime, one monotonic clock for the whole machine);
 * - end: the upstream writing the reply's last token to the reply finished in the client's hands ([DONE] / chat.done);
 * - total: the request sent to the reply finished ([DONE] / chat.done); it also holds the upstream's own pacing;
 * - added: through chatwire (or the floor) minus direct, percentile by percentile (p50 minus p50, p99 minus p99);
 * - tokens/s: tokens received over the wall time of the rounds (first request to last reply);
 * - CPU: each process's user + system CPU time over a path's rounds, per token (the relay's: chatwire's or the floor's);
 * - hops: round trips of a socket and of a thread message, pinged alongside every round (scripts/bench-hops.ts):
 *   the floor under what any extra hop adds on this machine at that moment.
 *
 * Prints tables and, last, one JSON line with every figure.
 */
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import WebSocket from 'ws';
import { loadConfig } from '../src/config.js';
import { writeTinyLlamaGguf } from '../test/fixtures/gguf-tiny-llama.js';
import { createModelPool } from '../src/llm/pool.js';
import { providerSettingsFrom, type ModelRequest } from '../src/llm/provider.js';
import { startHopProbe } from './bench-hops.js';
import { type Child, DIST, printTable, processCpuMs, sleep, startChatwire, startChild, summarize } from './bench-support.js';

const USAGE = `npm run bench:upstream -- [--part upstream|local|all] [--chats 100] [--tokens 50] [--interval-ms 10] [--rounds 6]
                            [--paths ws,openai,floor-inline,floor-worker] (the relayed paths to run; direct always runs)
                            [--steady-replies 3] (replies per user in a steady round)
                            [--workers <CHATWIRE_WORKER_THREADS, default: cores>]
                            [--local-embd 256] [--local-layers 4] [--local-streams 4] [--local-tokens 64] [--local-seconds 8]`;

const { values: args } = parseArgs({
  options: {
    help: { type: 'boolean', short: 'h', default: false },
    part: { type: 'string', default: 'all' },
    chats: { type: 'string', default: '100' },
    tokens: { type: 'string', default: '50' },
    'interval-ms': { type: 'string', default: '10' },
    rounds: { type: 'string', default: '6' },
    paths: { type: 'string', default: 'ws,openai,floor-inline,floor-worker' },
    'steady-replies': { type: 'string', default: '3' },
    workers: { type: 'string' },
    'local-embd': { type: 'string', default: '256' },
    'local-layers': { type: 'string', default: '4' },
    'local-streams': { type: 'string', default: '4' },
    'local-tokens': { type: 'string', default: '64' },
    'local-seconds': { type: 'string', default: '8' },
  },
});
if (args.help) {
  console.log(USAGE);
  process.exit(0);
}
const part = args.part;
const chats = Number(args.chats);
const tokens = Number(args.tokens);
const intervalMs = Number(args['interval-ms']);
const rounds = Number(args.rounds);
const steadyReplies = Number(args['steady-replies']);

/** The relayed paths a run may measure; the direct one always runs (every "added" figure is against it). */
const RELAYED = ['ws', 'openai', 'floor-inline', 'floor-worker'] as const;
type Relayed = (typeof RELAYED)[number];
const relayed = (args.paths as string).split(',').map((p) => p.trim()) as Relayed[];
for (const p of relayed) if (!RELAYED.includes(p)) throw new Error(`--paths: unknown path ${p} (known: ${RELAYED.join(', ')})`);
/** The processes whose CPU time is counted: the fake upstream, this one (the clients), and the relays. */
type Proc = 'upstream' | 'clients' | 'chatwire' | 'floorInline' | 'floorWorker';

const round1 = (n: number) => Math.round(n * 10) / 10;
const round2 = (n: number) => Math.round(n * 100) / 100;
const nowUs = () => Number(process.hrtime.bigint() / 1000n);
const STAMP = /w(\d+)@(\d+)/g;
// The first tokens of a reply arrive while the other chats of the round are still being set up.
const START_TOKENS = 5;

interface Side {
  firstTokenMs: number[];
  totalMs: number[];
  /** Per token: upstream write to client receipt, ms; the first START_TOKENS of each reply and the rest apart. */
  tokenMs: number[];
  startTokenMs: number[];
  restTokenMs: number[];
  /** The upstream writing a reply's last token to the reply being complete in the client's hands ([DONE] / chat.done). */
  endMs: number[];
  /** chat.send to chat.ack (chatwire only). */
  ackMs: number[];
  tokens: number;
  /** Wall time of each round: first request sent to last reply finished. */
  wallMs: number[];
  errors: number;
  /** CPU time (ms) of each running process over the measured rounds of this path. */
  cpuMs: Partial<Record<Proc, number>>;
  /** Replies whose tokens were not exactly w0..w(n-1) in order. */
  corrupted: number;
  /** Round trips of the hop probe (scripts/bench-hops.ts) during this path's rounds, ms. */
  socketRttMs: number[];
  threadRttMs: number[];
}

const newSide = (): Side => ({
  firstTokenMs: [],
  totalMs: [],
  tokenMs: [],
  startTokenMs: [],
  restTokenMs: [],
  endMs: [],
  ackMs: [],
  tokens: 0,
  wallMs: [],
  errors: 0,
  cpuMs: {},
  corrupted: 0,
  socketRttMs: [],
  threadRttMs: [],
});

/** One reply as a client sees it: the same bookkeeping for both paths. */
class Reply {
  private first = NaN;
  private next = 0;
  private bad = false;
  private readonly latencies: number[] = [];
  private readonly startLatencies: number[] = [];
  private lastStampUs = NaN;

  constructor(private readonly t0: number) {}

  /** The text of one SSE event or one /ws frame: reads the token stamps out of it. */
  text(text: string): void {
    const receivedUs = nowUs();
    if (Number.isNaN(this.first)) this.first = performance.now() - this.t0;
    for (const m of text.matchAll(STAMP)) {
      if (Number(m[1]) !== this.next) this.bad = true;
      this.lastStampUs = Number(m[2]);
      const latency = (receivedUs - this.lastStampUs) / 1000;
      (this.next < START_TOKENS ? this.startLatencies : this.latencies).push(latency);
      this.next++;
    }
  }

  finish(side: Side): void {
    side.firstTokenMs.push(this.first);
    side.totalMs.push(performance.now() - this.t0);
    side.endMs.push((nowUs() - this.lastStampUs) / 1000);
    side.startTokenMs.push(...this.startLatencies);
    side.restTokenMs.push(...this.latencies);
    side.tokenMs.push(...this.startLatencies, ...this.latencies);
    side.tokens += this.next;
    if (this.bad || this.next !== tokens) side.corrupted++;
  }
}

const directAgent = new http.Agent({ keepAlive: true, maxSockets: Infinity });
const openaiAgent = new http.Agent({ keepAlive: true, maxSockets: Infinity });

/** The request chatwire's openai provider sends for the same chat. */
function completionBody(content: string): string {
  return JSON.stringify({
    model: 'fake-1',
    messages: [{ role: 'user', content }],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: tokens,
  });
}

/** One chat read directly from the upstream: SSE events split and parsed to tokens. */
function directChat(upstreamPort: number, content: string, side: Side): Promise<void> {
  return sseChat(directAgent, upstreamPort, completionBody(content), { authorization: 'Bearer bench' }, side);
}

/** The same request through chatwire's OpenAI-compatible route, for a user of its own, past the reply cache. */
function openaiChat(port: number, user: number, content: string, side: Side): Promise<void> {
  const body = JSON.stringify({ ...(JSON.parse(completionBody(content)) as object), user: `bench-openai-${user}` });
  return sseChat(openaiAgent, port, body, { 'x-chatwire-cache': 'bypass' }, side);
}

/** One streamed chat completion over keep-alive HTTP: SSE events split and parsed to tokens (comment lines skipped). */
function sseChat(agent: http.Agent, port: number, body: string, headers: Record<string, string>, side: Side): Promise<void> {
  return new Promise((resolve) => {
    const reply = new Reply(performance.now());
    const failed = () => {
      side.errors++;
      resolve();
    };
    const req = http.request(
      {
        agent,
        host: '127.0.0.1',
        port,
        path: '/v1/chat/completions',
        method: 'POST',
        headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...headers },
      },
      (res) => {
        if (res.statusCode !== 200) {
          res.resume();
          return failed();
        }
        res.setEncoding('utf8');
        let buffer = '';
        let done = false;
        res.on('data', (chunk: string) => {
          buffer += chunk;
          for (let end = buffer.indexOf('\n\n'); end >= 0; end = buffer.indexOf('\n\n')) {
            const event = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            if (!event.startsWith('data: ')) continue;
            const data = event.slice(6);
            if (data === '[DONE]') {
              done = true;
              reply.finish(side);
              continue;
            }
            const content = (JSON.parse(data) as { choices: Array<{ delta?: { content?: string } }> }).choices[0]?.delta?.content;
            if (content) reply.text(content);
          }
        });
        res.on('end', () => (done ? resolve() : failed()));
        res.on('error', failed);
      },
    );
    req.on('error', failed);
    req.end(body);
  });
}

type ChatFn = (user: number, label: string, side: Side) => Promise<void>;
type Arrivals = 'burst' | 'steady';

/** One round of N users: all at once (burst), or a closed loop with the first chats spread over one reply (steady). */
async function round(arrivals: Arrivals, chat: ChatFn, side: Side, label: string): Promise<void> {
  const start = performance.now();
  const spreadMs = tokens * intervalMs;
  await Promise.all(
    Array.from({ length: chats }, async (_, user) => {
      if (arrivals === 'burst') return chat(user, label, side);
      await sleep((user * spreadMs) / chats);
      for (let k = 0; k < steadyReplies; k++) await chat(user, `${label}.${k}`, side);
    }),
  );
  side.wallMs.push(performance.now() - start);
}

function openSocket(url: string): Promise<WebSocket> {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(url);
    socket.once('open', () => resolve(socket));
    socket.once('error', reject);
  });
}

type Frame = { type: string; id?: string; text?: string };

/** One chat through chatwire over /ws, on the user's own open connection. */
function serverChat(socket: WebSocket, user: number, label: string, side: Side): Promise<void> {
  return new Promise<void>((resolve) => {
    const sent = performance.now();
    const reply = new Reply(sent);
    const onMessage = (data: WebSocket.RawData) => {
      const msg = JSON.parse(data.toString()) as Frame;
      if (msg.type === 'chat.delta') {
        reply.text(msg.text as string);
      } else if (msg.type === 'chat.ack') {
        side.ackMs.push(performance.now() - sent);
      } else if (msg.type === 'chat.done') {
        reply.finish(side);
        end();
      } else if (msg.type === 'chat.error' || msg.type === 'error') {
        side.errors++;
        end();
      }
    };
    const end = () => {
      socket.off('message', onMessage);
      resolve();
    };
    socket.on('message', onMessage);
    socket.send(JSON.stringify({ type: 'chat.send', id: `c${user}`, text: `server chat ${label} ${user}`, params: { maxTokens: tokens }, cache: 'bypass' }));
  });
}

/** How a relayed path is run and reported: the process that relays it, its rows and its keys in the JSON line. */
interface RelayedSpec {
  proc: Proc;
  name: string;
  addedName: string;
  throughKey: string;
  addedKey: string;
  /** Read over /ws (chat.send, chat.ack, chat.delta, chat.done): its acks are timed too. */
  ws: boolean;
}

const RELAYED_SPECS: Record<Relayed, RelayedSpec> = {
  ws: { proc: 'chatwire', name: 'through chatwire /ws', addedName: 'added by chatwire', throughKey: 'throughChatwire', addedKey: 'added', ws: true },
  openai: {
    proc: 'chatwire',
    name: 'through chatwire /v1/chat/completions',
    addedName: 'added by chatwire (/v1/chat/completions)',
    throughKey: 'throughOpenAI',
    addedKey: 'addedOpenAI',
    ws: false,
  },
  'floor-inline': {
    proc: 'floorInline',
    name: 'through the floor, inline',
    addedName: 'added by the floor, inline',
    throughKey: 'throughFloorInline',
    addedKey: 'addedFloorInline',
    ws: true,
  },
  'floor-worker': {
    proc: 'floorWorker',
    name: 'through the floor, worker',
    addedName: 'added by the floor, worker',
    throughKey: 'throughFloorWorker',
    addedKey: 'addedFloorWorker',
    ws: true,
  },
};

async function benchUpstream() {
  const upstream = await startChild(path.join(DIST, 'scripts', 'bench-upstream-server.js'), { BENCH_INTERVAL_MS: String(intervalMs) });
  const upstreamUrl = `http://127.0.0.1:${upstream.port}/v1`;
  const workers = args.workers ?? String(os.availableParallelism());
  const runs = (p: Relayed) => relayed.includes(p);
  const server =
    runs('ws') || runs('openai')
      ? await startChatwire({
          CHATWIRE_LLM: 'openai',
          CHATWIRE_MODEL: 'fake-1',
          CHATWIRE_OPENAI_BASE_URL: upstreamUrl,
          CHATWIRE_UPSTREAM_MAX_RETRIES: '0',
          CHATWIRE_WORKER_THREADS: workers,
        })
      : null;
  const floor = (mode: 'inline' | 'worker') =>
    startChild(path.join(DIST, 'scripts', 'bench-relay-floor.js'), { BENCH_FLOOR_MODE: mode, BENCH_UPSTREAM_URL: upstreamUrl }, `floor ${mode}`);
  const floorInline = runs('floor-inline') ? await floor('inline') : null;
  const floorWorker = runs('floor-worker') ? await floor('worker') : null;
  const processes: Array<[Proc, Child | null]> = [
    ['upstream', upstream],
    ['chatwire', server],
    ['floorInline', floorInline],
    ['floorWorker', floorWorker],
  ];
  const running = processes.filter((p): p is [Proc, Child] => p[1] !== null);
  const config = loadConfig({ CHATWIRE_WORKER_THREADS: workers });
  const hopEcho = await startChild(path.join(DIST, 'scripts', 'bench-hops.js'), { BENCH_HOPS_ROLE: 'echo' });
  const hops = await startHopProbe(hopEcho.port, intervalMs);
  const patterns: Arrivals[] = ['burst', 'steady'];
  const keys = ['direct', ...relayed] as const;
  type Key = (typeof keys)[number];
  const sides = Object.fromEntries(patterns.map((a) => [a, Object.fromEntries(keys.map((k) => [k, newSide()]))])) as Record<Arrivals, Record<Key, Side>>;
  /** One open /ws connection per user on a relay, as a chat client keeps one. */
  const openSockets = (port: number) => Promise.all(Array.from({ length: chats }, (_, i) => openSocket(`ws://127.0.0.1:${port}/ws?user=bench-${i}`)));
  const wsChat =
    (sockets: WebSocket[]): ChatFn =>
    (user, label, side) =>
      serverChat(sockets[user] as WebSocket, user, label, side);
  const allSockets: WebSocket[] = [];
  const chatFns = {} as Record<Key, ChatFn>;
  chatFns.direct = (user, label, side) => directChat(upstream.port, `direct chat ${label} ${user}`, side);
  for (const p of relayed) {
    if (p === 'openai') {
      const port = (server as Child).port;
      chatFns.openai = (user, label, side) => openaiChat(port, user, `openai chat ${label} ${user}`, side);
      continue;
    }
    const relay = p === 'ws' ? server : p === 'floor-inline' ? floorInline : floorWorker;
    const sockets = await openSockets((relay as Child).port);
    allSockets.push(...sockets);
    chatFns[p] = wsChat(sockets);
  }
  const cpuNow = (): Partial<Record<Proc, number>> => {
    const own = process.cpuUsage();
    return { clients: (own.user + own.system) / 1000, ...Object.fromEntries(running.map(([proc, child]) => [proc, processCpuMs(child.child.pid as number)])) };
  };
  const measured = async (arrivals: Arrivals, chat: ChatFn, side: Side, label: string) => {
    await hops.take();
    const before = cpuNow();
    await round(arrivals, chat, side, label);
    const after = cpuNow();
    for (const [proc, ms] of Object.entries(after) as Array<[Proc, number]>) side.cpuMs[proc] = (side.cpuMs[proc] ?? 0) + ms - (before[proc] as number);
    const hopped = await hops.take();
    side.socketRttMs.push(...hopped.socketRttMs);
    side.threadRttMs.push(...hopped.threadRttMs);
  };
  try {
    // Warm up every path (JIT, worker threads, keep-alive connections on both sides) outside the measurement.
    for (let w = 0; w < 2; w++) for (const k of keys) await measured('burst', chatFns[k], newSide(), `warm${w}`);
    for (const arrivals of patterns) {
      const order: [ChatFn, Side][] = keys.map((k) => [chatFns[k], sides[arrivals][k]]);
      for (let r = 0; r < rounds; r++) {
        const label = `${arrivals}${r}`;
        // direct, /ws, openai, floor inline, floor worker, then the reverse, ...: a drift in the machine's load falls
        // on every path alike.
        for (const [chat, side] of r % 2 === 0 ? order : [...order].reverse()) await measured(arrivals, chat, side, label);
      }
    }
  } finally {
    for (const s of allSockets) s.close();
    directAgent.destroy();
    openaiAgent.destroy();
    await hops.stop();
    await Promise.all([server?.stop(), floorInline?.stop(), floorWorker?.stop()]);
    await upstream.stop();
    await hopEcho.stop();
  }
  const pick = (values: number[]) => {
    const s = summarize(values);
    return { p50: round2(s.p50), p99: round2(s.p99) };
  };
  const summary = (side: Side) => {
    const wall = side.wallMs.reduce((a, b) => a + b, 0);
    return {
      firstTokenMs: pick(side.firstTokenMs),
      tokenLatencyMs: pick(side.tokenMs),
      startTokenLatencyMs: pick(side.startTokenMs),
      restTokenLatencyMs: pick(side.restTokenMs),
      endMs: pick(side.endMs),
      totalMs: pick(side.totalMs),
      tokensPerSecond: Math.round((side.tokens / wall) * 1000),
      chats: side.totalMs.length,
      tokens: side.tokens,
      errors: side.errors,
      corrupted: side.corrupted,
      cpuUsPerToken: Object.fromEntries(Object.entries(side.cpuMs).map(([proc, ms]) => [proc, round1((ms * 1000) / side.tokens)])) as Partial<
        Record<Proc, number>
      >,
      hops: { socketRttMs: pick(side.socketRttMs), threadRttMs: pick(side.threadRttMs) },
    };
  };
  type Summary = ReturnType<typeof summary> & { ackMs?: { p50: number; p99: number } };
  const compare = (bySide: Record<Key, Side>) => {
    const d = summary(bySide.direct);
    const minus = (a: { p50: number; p99: number }, b: { p50: number; p99: number }) => ({ p50: round2(a.p50 - b.p50), p99: round2(a.p99 - b.p99) });
    const added = (x: Summary) => ({
      firstTokenMs: minus(x.firstTokenMs, d.firstTokenMs),
      tokenLatencyMs: minus(x.tokenLatencyMs, d.tokenLatencyMs),
      startTokenLatencyMs: minus(x.startTokenLatencyMs, d.startTokenLatencyMs),
      restTokenLatencyMs: minus(x.restTokenLatencyMs, d.restTokenLatencyMs),
      endMs: minus(x.endMs, d.endMs),
      totalMs: minus(x.totalMs, d.totalMs),
    });
    const through: Partial<Record<Relayed, Summary>> = {};
    const addedBy: Partial<Record<Relayed, ReturnType<typeof added>>> = {};
    for (const p of relayed) {
      const side = bySide[p];
      const s: Summary = RELAYED_SPECS[p].ws ? { ...summary(side), ackMs: pick(side.ackMs) } : summary(side);
      through[p] = s;
      addedBy[p] = added(s);
    }
    // A first token through chatwire crosses two socket hops and two thread hops more than the direct path.
    const hopped = (through.ws ?? d).hops;
    return { direct: d, through, addedBy, hopFloorP50Ms: round2(hopped.socketRttMs.p50 + hopped.threadRttMs.p50) };
  };
  return {
    setup: {
      chats,
      tokensPerReply: tokens,
      intervalMs,
      rounds,
      steadyRepliesPerUser: steadyReplies,
      workerThreads: config.workerThreads,
      tasksPerWorker: config.tasksPerWorker,
      paths: relayed,
    },
    burst: compare(sides.burst),
    steady: compare(sides.steady),
  };
}

/** One pattern's figures as the JSON line gives them: each relayed path under its own keys (RELAYED_SPECS). */
function comparisonJson(c: Awaited<ReturnType<typeof benchUpstream>>['steady']): Record<string, unknown> {
  const out: Record<string, unknown> = { direct: c.direct };
  for (const p of relayed) {
    out[RELAYED_SPECS[p].throughKey] = c.through[p];
    out[RELAYED_SPECS[p].addedKey] = c.addedBy[p];
  }
  return { ...out, hopFloorP50Ms: c.hopFloorP50Ms };
}

/**
 * node-llama-cpp run directly in this process, without chatwire (no pool, no worker, no provider): the same GGUF,
 * threads, context size and number of sequences as the local provider is given, the same prompt, token budget and
 * temperature. What the local provider's tokens per second are measured against.
 */
async function localDirect(modelPath: string, threads: number, streams: number, maxTokens: number, budgetMs: number) {
  const { getLlama, LlamaChat } = await import('node-llama-cpp');
  const { llamaCpuOptions } = await import('../src/llm/local.js');
  const config = loadConfig({}, { llm: 'local', modelPath, localThreads: threads, localContextSize: 1024 });
  const llama = await getLlama(llamaCpuOptions(threads > 0 ? threads : undefined));
  const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
  const context = await model.createContext({ contextSize: config.localContextSize, sequences: config.localSequences, ...(threads > 0 ? { threads } : {}) });
  const runOnce = async (i: number, n: number, limitMs = Infinity) => {
    const sequence = context.getSequence();
    const chat = new LlamaChat({ contextSequence: sequence });
    const abort = new AbortController();
    const timer = Number.isFinite(limitMs) ? setTimeout(() => abort.abort(), limitMs) : undefined;
    let tokens = 0;
    try {
      await chat.generateResponse(
        [
          { type: 'user', text: `Quote ${i} for painting a fence tomorrow?` },
          { type: 'model', response: [] },
        ],
        {
          signal: abort.signal,
          stopOnAbortSignal: true,
          maxTokens: n,
          temperature: 0.8,
          onResponseChunk: (chunk) => {
            tokens += chunk.tokens.length;
          },
        },
      );
    } finally {
      clearTimeout(timer);
      chat.dispose({ disposeSequence: true });
    }
    return tokens;
  };
  try {
    await runOnce(0, 2);
    const single0 = performance.now();
    const singleTokens = await runOnce(0, maxTokens, budgetMs);
    const singleMs = performance.now() - single0;
    const t0 = performance.now();
    const counts = await Promise.all(Array.from({ length: streams }, (_, i) => runOnce(i, maxTokens, budgetMs)));
    const ms = performance.now() - t0;
    return {
      oneStreamTokensPerSecond: round1((singleTokens / singleMs) * 1000),
      concurrentStreams: streams,
      tokensPerSecond: round1((counts.reduce((a, b) => a + b, 0) / ms) * 1000),
    };
  } finally {
    await context.dispose();
    await model.dispose();
    await llama.dispose();
  }
}

async function benchLocal() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-bench-local-'));
  const embd = Number(args['local-embd']);
  const model = writeTinyLlamaGguf(path.join(dir, 'bench.gguf'), {
    embeddingLength: embd,
    blockCount: Number(args['local-layers']),
    feedForwardLength: embd * 3,
    headCount: Math.max(1, embd / 64),
  });
  const streams = Number(args['local-streams']);
  const maxTokens = Number(args['local-tokens']);
  const budgetMs = Number(args['local-seconds']) * 1000;
  const configs: Array<{ workers: number; threadsPerWorker: number }> = [
    { workers: 1, threadsPerWorker: 1 },
    { workers: 1, threadsPerWorker: 2 },
    { workers: 2, threadsPerWorker: 1 },
    { workers: 2, threadsPerWorker: 2 },
    { workers: 1, threadsPerWorker: 0 },
    { workers: 2, threadsPerWorker: 0 },
  ];
  const results: Array<{ workers: number; threadsPerWorker: number; oneStreamTokensPerSecond: number; concurrentStreams: number; tokensPerSecond: number }> =
    [];
  const direct: Array<{ threads: number; oneStreamTokensPerSecond: number; concurrentStreams: number; tokensPerSecond: number }> = [];
  try {
    // One worker and the same threads as each direct run, measured next to it (direct first, then through chatwire).
    for (const threads of [1, 0]) direct.push({ threads, ...(await localDirect(model.path, threads, streams, maxTokens, budgetMs)) });
    for (const c of configs) {
      const config = loadConfig({}, { llm: 'local', modelPath: model.path, localThreads: c.threadsPerWorker, localContextSize: 1024 });
      const pool = createModelPool({
        settings: providerSettingsFrom(config),
        threads: c.workers,
        tasksPerWorker: streams,
        maxQueue: streams * 2,
        taskTimeoutMs: 600_000,
      });
      // A generation stops at n tokens or, on a slow configuration, when the time budget is spent (cancel: the
      // provider still reports the tokens it made).
      const runOnce = (i: number, n: number, limitMs = Infinity) =>
        new Promise<number>((resolve, reject) => {
          // A refusal (the pool full) throws here, which rejects this promise.
          const slot = pool.reserve('bench');
          const request: ModelRequest = {
            model: 'bench',
            messages: [{ role: 'user', content: `Quote ${i} for painting a fence tomorrow?` }],
            maxTokens: n,
            temperature: 0.8,
          };
          let timer: NodeJS.Timeout | undefined;
          const handle = slot.run(request, {
            onChunk() {},
            onEnd: (result) => {
              clearTimeout(timer);
              resolve(result?.usage.completionTokens ?? 0);
            },
            onError: (e) => {
              clearTimeout(timer);
              reject(e);
            },
          });
          if (Number.isFinite(limitMs)) timer = setTimeout(() => handle.cancel(), limitMs);
        });
      try {
        // Every worker loads the model and runs one generation before the clock starts.
        await Promise.all(Array.from({ length: c.workers * 2 }, (_, i) => runOnce(i, 2)));
        const single0 = performance.now();
        const singleTokens = await runOnce(0, maxTokens, budgetMs);
        const singleMs = performance.now() - single0;
        const t0 = performance.now();
        const counts = await Promise.all(Array.from({ length: streams }, (_, i) => runOnce(i, maxTokens, budgetMs)));
        const ms = performance.now() - t0;
        results.push({
          ...c,
          oneStreamTokensPerSecond: round1((singleTokens / singleMs) * 1000),
          concurrentStreams: streams,
          tokensPerSecond: round1((counts.reduce((a, b) => a + b, 0) / ms) * 1000),
        });
      } finally {
        await pool.close();
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return {
    model: { parameters: model.parameters, bytes: model.bytes, embd, layers: Number(args['local-layers']) },
    tokensPerReply: maxTokens,
    secondsBudget: budgetMs / 1000,
    results,
    direct: direct.map((d) => {
      const through = results.find((r) => r.workers === 1 && r.threadsPerWorker === d.threads);
      return {
        ...d,
        oneStreamThroughChatwirePct: through ? round1((through.oneStreamTokensPerSecond / d.oneStreamTokensPerSecond) * 100) : NaN,
        concurrentThroughChatwirePct: through ? round1((through.tokensPerSecond / d.tokensPerSecond) * 100) : NaN,
      };
    }),
  };
}

// The machine may be shared: the load it had is part of the result.
const out: Record<string, unknown> = { cores: os.availableParallelism(), loadAverage: os.loadavg().map(round1) };
console.log(`cores: ${os.availableParallelism()}, load average: ${os.loadavg().map(round1).join(' ')}`);
if (part === 'upstream' || part === 'all') {
  const u = await benchUpstream();
  out.upstream = { setup: u.setup, burst: comparisonJson(u.burst), steady: comparisonJson(u.steady) };
  type Pair = { p50: number; p99: number };
  type Latencies = { firstTokenMs: Pair; tokenLatencyMs: Pair; startTokenLatencyMs: Pair; restTokenLatencyMs: Pair; endMs: Pair; totalMs: Pair };
  const row = (name: string, x: Latencies) => [
    name,
    ...[x.firstTokenMs, x.tokenLatencyMs, x.startTokenLatencyMs, x.restTokenLatencyMs, x.endMs, x.totalMs].flatMap((v) => [v.p50, v.p99]),
  ];
  const described = {
    burst: `burst: ${u.setup.chats} chats sent at the same moment, ${u.setup.rounds} rounds per path`,
    steady: `steady: ${u.setup.chats} users in a closed loop (${u.setup.steadyRepliesPerUser} replies each, first chats spread over one reply), ${u.setup.rounds} rounds per path`,
  };
  console.log(
    `upstream: ${u.setup.tokensPerReply} tokens per reply at ${u.setup.intervalMs} ms; chatwire with ${u.setup.workerThreads} workers x ${u.setup.tasksPerWorker} tasks. ` +
      'Milliseconds, p50 / p99; added = through the relay (chatwire or the floor) minus direct',
  );
  for (const arrivals of ['burst', 'steady'] as const) {
    const c = u[arrivals];
    printTable(
      described[arrivals],
      [
        'path',
        'first token',
        'p99',
        'token latency',
        'p99',
        `tokens 0-${START_TOKENS - 1}`,
        'p99',
        `tokens ${START_TOKENS}+`,
        'p99',
        'end',
        'p99',
        'total',
        'p99',
      ],
      [
        row('direct to upstream', c.direct),
        ...relayed.flatMap((p) => [row(RELAYED_SPECS[p].name, c.through[p] as Latencies), row(RELAYED_SPECS[p].addedName, c.addedBy[p] as Latencies)]),
      ],
    );
  }
  console.log(
    [
      "first token: the request sent (POST / chat.send) to the first token in the client's hands. token latency: the upstream writing",
      `a token to the client holding it (the token's stamp against the client's clock), every token; tokens 0-${START_TOKENS - 1}: the first ${START_TOKENS} of each`,
      "reply (in a burst they arrive while the round's other chats are being set up), the rest apart. end: the upstream writing the last token to the",
      "reply complete in the client's hands ([DONE] / chat.done: through chatwire, after the reply is stored). total: the request sent to [DONE] /",
      "chat.done; it also holds the upstream's own pacing, which drifts with its load (50 timers of 10 ms per reply), so a difference in total",
      'is first token + per-token + end differences plus that drift.',
      'added: through the relay minus direct, percentile by percentile (p50 - p50, p99 - p99), over the same alternating rounds.',
      "the floor (scripts/bench-relay-floor.ts): the same upstream request on chatwire's HTTP client and SSE parser and the same /ws frames,",
      'and nothing else; inline: all on its main thread; worker: the upstream read and parsed in one worker thread, one message per turn to the main thread.',
    ].join('\n'),
  );
  type Summary = NonNullable<(typeof u)['steady']['through'][Relayed]>;
  const rows = (['burst', 'steady'] as const).flatMap((arrivals) => [
    { name: `${arrivals}, direct to upstream`, x: u[arrivals].direct as Summary, relay: null as Proc | null },
    ...relayed.map((p) => ({ name: `${arrivals}, ${RELAYED_SPECS[p].name}`, x: u[arrivals].through[p] as Summary, relay: RELAYED_SPECS[p].proc })),
  ]);
  printTable(
    'throughput',
    ['path', 'tokens/s', 'chats', 'errors', 'corrupted replies', 'chat.ack p50', 'p99'],
    rows.map(({ name, x }) => [name, x.tokensPerSecond, String(x.chats), String(x.errors), String(x.corrupted), x.ackMs?.p50 ?? '-', x.ackMs?.p99 ?? '-']),
  );
  printTable(
    'CPU time per token over the measured rounds (µs; user + system, per process; relay: the process the path goes through, chatwire or the floor)',
    ['path', 'fake upstream', 'clients', 'relay', 'all'],
    rows.map(({ name, x, relay }) => {
      const cpu = x.cpuUsPerToken;
      const own = round1((cpu.upstream ?? NaN) + (cpu.clients ?? NaN));
      return relay === null
        ? [name, cpu.upstream ?? NaN, cpu.clients ?? NaN, '-', own]
        : [name, cpu.upstream ?? NaN, cpu.clients ?? NaN, cpu[relay] ?? NaN, round1(own + (cpu[relay] ?? NaN))];
    }),
  );
  printTable(
    `one hop and back, pinged every ${u.setup.intervalMs} ms during the rounds (ms): socket = loopback TCP to an echo process, thread = MessagePort to a worker thread`,
    ['path', 'socket round trip', 'p99', 'thread round trip', 'p99'],
    rows.map(({ name, x }) => [name, x.hops.socketRttMs.p50, x.hops.socketRttMs.p99, x.hops.threadRttMs.p50, x.hops.threadRttMs.p99]),
  );
  if (relayed.includes('ws'))
    console.log(
      [
        'Through chatwire a first token crosses two socket hops and two thread hops more than the direct path (client -> main thread -> worker',
        '-> upstream against client -> upstream; upstream -> worker -> main thread -> client against upstream -> client): one socket round trip',
        `plus one thread round trip, p50 during the rounds through chatwire, is the floor under "added" before any of its work: burst ${u.burst.hopFloorP50Ms}, steady ${u.steady.hopFloorP50Ms} ms.`,
      ].join('\n'),
    );
}
if (part === 'local' || part === 'all') {
  const l = await benchLocal();
  out.local = l;
  console.log(
    `\nlocal: generated model, ${l.model.parameters} parameters (${Math.round(l.model.bytes / 1e6)} MB F32), up to ${l.tokensPerReply} tokens or ${l.secondsBudget} s per reply`,
  );
  console.log('| workers | threads/worker | 1 stream tokens/s | concurrent streams | tokens/s |');
  console.log('| --- | --- | --- | --- | --- |');
  for (const r of l.results) {
    console.log(
      `| ${r.workers} | ${r.threadsPerWorker === 0 ? 'library default' : r.threadsPerWorker} | ${r.oneStreamTokensPerSecond} | ${r.concurrentStreams} | ${r.tokensPerSecond} |`,
    );
  }
  console.log(
    '\nlocal provider (1 worker) next to node-llama-cpp run directly in one process (same GGUF, threads, context, sequences); target >= 90% of direct',
  );
  console.log('| threads | direct, 1 stream tokens/s | through chatwire | % of direct | direct, concurrent tokens/s | through chatwire | % of direct |');
  console.log('| --- | --- | --- | --- | --- | --- | --- |');
  for (const d of l.direct) {
    const through = l.results.find((r) => r.workers === 1 && r.threadsPerWorker === d.threads);
    console.log(
      `| ${d.threads === 0 ? 'library default' : d.threads} | ${d.oneStreamTokensPerSecond} | ${through?.oneStreamTokensPerSecond ?? '-'} | ${d.oneStreamThroughChatwirePct} | ${d.tokensPerSecond} (${d.concurrentStreams} streams) | ${through?.tokensPerSecond ?? '-'} | ${d.concurrentThroughChatwirePct} |`,
    );
  }
}
console.log(JSON.stringify({ bench: 'upstream', ...out }));
