/**
 * The stages of one relayed token, each measured alone on this machine, as CPU time per token (process user +
 * system, so a stage's cost on both sides of a thread boundary counts):
 * - parse: the worker turning one SSE event of an upstream chunk into its text (SseParser on the bytes, JSON.parse,
 *   the choice picked), as the openai provider does;
 * - hop: one batch of one chunk posted on a MessagePort from a worker thread to this thread and read here, as a worker
 *   hands chunks to the pool (one message per turn of its event loop; under a steady load a turn holds one chunk);
 * - frame: the chat.delta frame's JSON text built on the main thread (its socket write is the transport's, measured by
 *   bench:upstream's whole-path figure and bench:hops).
 *
 *   npm run build && node dist/scripts/bench-upstream-stages.js [--tokens 200000]
 */
import os from 'node:os';
import { parseArgs } from 'node:util';
import { MessageChannel, Worker } from 'node:worker_threads';
import { SseParser } from '../src/llm/upstream-http.js';

const { values: args } = parseArgs({ options: { tokens: { type: 'string', default: '200000' } } });
const tokens = Number(args.tokens);

const cpuUs = () => {
  const u = process.cpuUsage();
  return u.user + u.system;
};
const round2 = (n: number) => Math.round(n * 100) / 100;

/** One upstream chunk as OpenAI sends it, with a token like the bench upstream's. */
const event = (i: number) =>
  Buffer.from(
    `data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1700000000,"model":"fake-1","system_fingerprint":"fp_fake","choices":[{"index":0,"delta":{"content":" w${i}@1234567890"},"logprobs":null,"finish_reason":null}]}\n\n`,
  );

function parseStage(): number {
  const chunks = Array.from({ length: 1000 }, (_, i) => event(i));
  let chars = 0;
  const parser = new SseParser((_event, data) => {
    const chunk = JSON.parse(data) as { choices: Array<{ index: number; delta: { content?: string } }> };
    const choice = chunk.choices[0];
    chars += choice?.delta.content?.length ?? 0;
  });
  const t0 = cpuUs();
  for (let i = 0; i < tokens; i++) parser.write(chunks[i % chunks.length] as Buffer);
  const us = cpuUs() - t0;
  if (chars === 0) throw new Error('nothing parsed');
  return us / tokens;
}

/** A worker posts `tokens` one-chunk batches, paced so that each is its own message (as under a steady load). */
async function hopStage(): Promise<number> {
  const { port1, port2 } = new MessageChannel();
  const worker = new Worker(
    `const { workerData } = require('node:worker_threads');
     const { port, n } = workerData;
     let i = 0;
     // One message per turn of the event loop, as the worker's batching posts them.
     const next = () => {
       if (i >= n) return;
       port.postMessage([i % 64, ' w' + i + '@1234567890']);
       i++;
       setImmediate(next);
     };
     port.on('message', () => next());
     `,
    { eval: true, workerData: { port: port2, n: tokens }, transferList: [port2] },
  );
  await new Promise((resolve) => worker.once('online', resolve));
  let received = 0;
  const t0 = cpuUs();
  await new Promise<void>((resolve) => {
    port1.on('message', (batch: Array<number | string>) => {
      received += (batch[1] as string).length > 0 ? 1 : 0;
      if (received === tokens) resolve();
    });
    port1.postMessage('go');
  });
  const us = cpuUs() - t0;
  port1.close();
  await worker.terminate();
  // The worker's setImmediate per message is counted too: it is how the worker's batching sends them.
  return us / tokens;
}

function frameStage(): number {
  let bytes = 0;
  const t0 = cpuUs();
  for (let i = 0; i < tokens; i++) {
    bytes += JSON.stringify({ type: 'chat.delta', taskId: 'task_0123456789abcdefghijkl', seq: i, text: ` w${i}@1234567890` }).length;
  }
  const us = cpuUs() - t0;
  if (bytes === 0) throw new Error('nothing built');
  return us / tokens;
}

const parse = parseStage();
const hop = await hopStage();
const frame = frameStage();
const out = {
  bench: 'upstream-stages',
  cores: os.availableParallelism(),
  loadAverage: os.loadavg().map((x) => Math.round(x * 10) / 10),
  tokens,
  cpuUsPerToken: { parse: round2(parse), hop: round2(hop), frame: round2(frame) },
};
console.log(`load average ${out.loadAverage.join(' ')}; CPU µs per token, ${tokens} tokens each`);
console.log('| stage | µs |');
console.log('| --- | --- |');
console.log(`| parse: SSE event to text in the worker (SseParser + JSON.parse) | ${out.cpuUsPerToken.parse} |`);
console.log(`| hop: one-chunk batch, worker MessagePort to main thread (both threads) | ${out.cpuUsPerToken.hop} |`);
console.log(`| frame: chat.delta JSON text on the main thread | ${out.cpuUsPerToken.frame} |`);
console.log(JSON.stringify(out));
