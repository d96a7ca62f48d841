/**
 * What chatwire's model path costs, measured side by side in one run.
 *
 * upstream: a fake OpenAI-compatible upstream (test/fixtures/fake-openai.ts)
 *   streams every reply at a fixed pace. N concurrent chats read it directly
 *   with the openai SDK, and N concurrent chats go through a real chatwire
 *   server (createApp, CHATWIRE_LLM=openai) over /ws. The difference is what
 *   chatwire adds to the time to first token and to the total time.
 * local: the local provider on a generated GGUF model (random weights), run
 *   through the worker pool with 1 and 2 workers and 1, 2 or the library's
 *   default threads per worker: tokens per second.
 *
 *   npm run bench:upstream -- [--part upstream|local|all] [--chats 100] [--tokens 50] [--interval-ms 10] [--rounds 2]
 *                             [--local-embd 256] [--local-layers 4] [--local-streams 4] [--local-tokens 64] [--local-seconds 8]
 *
 * Prints a table and, last, one JSON line with every figure.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import OpenAI from 'openai';
import { pino } from 'pino';
import WebSocket from 'ws';
import { createApp } from '../src/app.js';
import { loadConfig } from '../src/config.js';
import { writeTinyLlamaGguf } from '../src/llm/gguf-tiny-llama.js';
import { createModelPool } from '../src/llm/pool.js';
import { providerSettingsFrom, type ModelRequest } from '../src/llm/provider.js';
import { numberedTokens, startFakeOpenAI, streamReply, type FakeOpenAI } from '../test/fixtures/fake-openai.js';

const { values: args } = parseArgs({
  options: {
    part: { type: 'string', default: 'all' },
    chats: { type: 'string', default: '100' },
    tokens: { type: 'string', default: '50' },
    'interval-ms': { type: 'string', default: '10' },
    rounds: { type: 'string', default: '2' },
    'local-embd': { type: 'string', default: '256' },
    'local-layers': { type: 'string', default: '4' },
    'local-streams': { type: 'string', default: '4' },
    'local-tokens': { type: 'string', default: '64' },
    'local-seconds': { type: 'string', default: '8' },
  },
});
const part = args.part;
const chats = Number(args.chats);
const tokens = Number(args.tokens);
const intervalMs = Number(args['interval-ms']);
const rounds = Number(args.rounds);

interface Sample {
  firstTokenMs: number;
  totalMs: number;
  tokens: number;
}

interface Side {
  samples: Sample[];
  /** Wall time of each round: first request sent to last reply finished. */
  wallMs: number[];
  errors: number;
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] as number;
}

function stats(values: number[]): { p50: number; p99: number } {
  const sorted = [...values].sort((a, b) => a - b);
  return { p50: round1(percentile(sorted, 50)), p99: round1(percentile(sorted, 99)) };
}

const round1 = (n: number) => Math.round(n * 10) / 10;

/** N chats read the fake upstream directly with the openai SDK, all at once. */
async function directRound(fake: FakeOpenAI, side: Side): Promise<void> {
  const client = new OpenAI({ baseURL: fake.baseUrl, apiKey: 'bench', maxRetries: 0 });
  const start = performance.now();
  await Promise.all(
    Array.from({ length: chats }, async (_, i) => {
      const t0 = performance.now();
      let first = NaN;
      let n = 0;
      try {
        const stream = await client.chat.completions.create({
          model: 'fake-1',
          messages: [{ role: 'user', content: `direct chat ${i} ${Math.random()}` }],
          max_tokens: tokens,
          stream: true,
        });
        for await (const chunk of stream) {
          const content = chunk.choices[0]?.delta?.content;
          if (!content) continue;
          if (n === 0) first = performance.now() - t0;
          n++;
        }
        side.samples.push({ firstTokenMs: first, totalMs: performance.now() - t0, tokens: n });
      } catch {
        side.errors++;
      }
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

/** N chats through chatwire over /ws, one connection (and user) each, sent at once after all are connected. */
async function serverRound(wsUrl: string, side: Side, roundIndex: number): Promise<void> {
  const sockets = await Promise.all(Array.from({ length: chats }, (_, i) => openSocket(`${wsUrl}?user=bench-${roundIndex}-${i}`)));
  const start = performance.now();
  await Promise.all(
    sockets.map(
      (socket, i) =>
        new Promise<void>((resolve) => {
          let t0 = 0;
          let first = NaN;
          let n = 0;
          socket.on('message', (data) => {
            const msg = JSON.parse(data.toString()) as { type: string; text?: string; usage?: { completionTokens: number } };
            if (msg.type === 'chat.delta') {
              if (Number.isNaN(first)) first = performance.now() - t0;
              n++;
            } else if (msg.type === 'chat.done') {
              side.samples.push({ firstTokenMs: first, totalMs: performance.now() - t0, tokens: msg.usage?.completionTokens ?? n });
              resolve();
            } else if (msg.type === 'chat.error' || msg.type === 'error') {
              side.errors++;
              resolve();
            }
          });
          t0 = performance.now();
          socket.send(
            JSON.stringify({ type: 'chat.send', id: `c${i}`, text: `server chat ${roundIndex} ${i} ${Math.random()}`, params: { maxTokens: tokens }, cache: 'bypass' }),
          );
        }),
    ),
  );
  side.wallMs.push(performance.now() - start);
  await Promise.all(
    sockets.map(
      (s) =>
        new Promise<void>((resolve) => {
          s.once('close', () => resolve());
          s.close();
        }),
    ),
  );
}

async function benchUpstream() {
  const fake = await startFakeOpenAI({
    handler: (ex) => streamReply(ex, { tokens: numberedTokens(tokens), intervalMs, usage: { promptTokens: 10, completionTokens: tokens } }),
  });
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-bench-upstream-'));
  const config = loadConfig({}, {
    port: 0,
    host: '127.0.0.1',
    dataDir,
    llm: 'openai',
    model: 'fake-1',
    openaiBaseUrl: fake.baseUrl,
    upstreamMaxRetries: 0,
    logLevel: 'silent',
    chatsPerMinute: 1_000_000,
    modelTokensPerMinute: 1_000_000_000,
    messagesPerSecond: 1_000_000,
  });
  const app = await createApp(config, { log: pino({ level: 'silent' }) });
  const wsUrl = `ws://127.0.0.1:${app.port}/ws`;
  const direct: Side = { samples: [], wallMs: [], errors: 0 };
  const server: Side = { samples: [], wallMs: [], errors: 0 };
  try {
    // Warm up both paths (JIT, worker threads, connection pools) outside the measurement.
    await directRound(fake, { samples: [], wallMs: [], errors: 0 });
    await serverRound(wsUrl, { samples: [], wallMs: [], errors: 0 }, -1);
    for (let r = 0; r < rounds; r++) {
      await directRound(fake, direct);
      await serverRound(wsUrl, server, r);
    }
  } finally {
    await app.close();
    await fake.close();
    fs.rmSync(dataDir, { recursive: true, force: true });
  }
  const summary = (side: Side) => {
    const totalTokens = side.samples.reduce((s, x) => s + x.tokens, 0);
    const wall = side.wallMs.reduce((a, b) => a + b, 0);
    return {
      firstTokenMs: stats(side.samples.map((s) => s.firstTokenMs)),
      totalMs: stats(side.samples.map((s) => s.totalMs)),
      tokensPerSecond: Math.round((totalTokens / wall) * 1000),
      chats: side.samples.length,
      errors: side.errors,
    };
  };
  const d = summary(direct);
  const s = summary(server);
  return {
    setup: { chats, tokensPerReply: tokens, intervalMs, rounds, workerThreads: config.workerThreads },
    direct: d,
    throughChatwire: s,
    added: {
      firstTokenMs: { p50: round1(s.firstTokenMs.p50 - d.firstTokenMs.p50), p99: round1(s.firstTokenMs.p99 - d.firstTokenMs.p99) },
      totalMs: { p50: round1(s.totalMs.p50 - d.totalMs.p50), p99: round1(s.totalMs.p99 - d.totalMs.p99) },
    },
  };
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
  const results = [];
  try {
    for (const c of configs) {
      const config = loadConfig({}, { llm: 'local', modelPath: model.path, localThreads: c.threadsPerWorker, localContextSize: 1024 });
      const pool = createModelPool({ settings: providerSettingsFrom(config), threads: c.workers, tasksPerWorker: streams, maxQueue: streams * 2, taskTimeoutMs: 600_000 });
      // A generation stops at n tokens or, on a slow configuration, when the time budget is spent (cancel: the
      // provider still reports the tokens it made).
      const runOnce = (i: number, n: number, limitMs = Infinity) =>
        new Promise<number>((resolve, reject) => {
          const slot = pool.reserve();
          if (!slot) return reject(new Error('pool refused'));
          const request: ModelRequest = { model: 'bench', messages: [{ role: 'user', content: `Quote ${i} for painting a fence tomorrow?` }], maxTokens: n, temperature: 0.8 };
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
  };
}

// The machine may be shared: the load it had is part of the result.
const out: Record<string, unknown> = { cores: os.availableParallelism(), loadAverage: os.loadavg().map(round1) };
console.log(`cores: ${os.availableParallelism()}, load average: ${os.loadavg().map(round1).join(' ')}`);
if (part === 'upstream' || part === 'all') {
  const u = await benchUpstream();
  out.upstream = u;
  console.log(`\nupstream: ${u.setup.chats} concurrent chats, ${u.setup.tokensPerReply} tokens each at ${u.setup.intervalMs} ms, ${u.setup.rounds} rounds`);
  console.log('| path | first token p50 | p99 | total p50 | p99 | tokens/s | errors |');
  console.log('| --- | --- | --- | --- | --- | --- | --- |');
  for (const [name, s] of [['direct to upstream', u.direct], ['through chatwire /ws', u.throughChatwire]] as const) {
    console.log(`| ${name} | ${s.firstTokenMs.p50} | ${s.firstTokenMs.p99} | ${s.totalMs.p50} | ${s.totalMs.p99} | ${s.tokensPerSecond} | ${s.errors} |`);
  }
  console.log(`| chatwire adds | ${u.added.firstTokenMs.p50} | ${u.added.firstTokenMs.p99} | ${u.added.totalMs.p50} | ${u.added.totalMs.p99} | | |`);
}
if (part === 'local' || part === 'all') {
  const l = await benchLocal();
  out.local = l;
  console.log(`\nlocal: generated model, ${l.model.parameters} parameters (${Math.round(l.model.bytes / 1e6)} MB F32), up to ${l.tokensPerReply} tokens or ${l.secondsBudget} s per reply`);
  console.log('| workers | threads/worker | 1 stream tokens/s | concurrent streams | tokens/s |');
  console.log('| --- | --- | --- | --- | --- |');
  for (const r of l.results) {
    console.log(`| ${r.workers} | ${r.threadsPerWorker === 0 ? 'library default' : r.threadsPerWorker} | ${r.oneStreamTokensPerSecond} | ${r.concurrentStreams} | ${r.tokensPerSecond} |`);
  }
}
console.log(JSON.stringify({ bench: 'upstream', ...out }));
