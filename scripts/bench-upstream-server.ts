/**
 * The upstream of `npm run bench:upstream`, in its own process: the fake
 * OpenAI-compatible server of the tests (test/fixtures/fake-openai.ts) streaming
 * `max_tokens` deltas at a fixed pace (BENCH_INTERVAL_MS, default 10 ms). Each
 * delta carries the moment it was written, ` w<i>@<µs>`, on the monotonic clock
 * that every process of the machine shares (process.hrtime), so a client can
 * tell how long each token took to reach it. Prints `port=N` when listening.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { startFakeOpenAI } from '../test/fixtures/fake-openai.js';

const intervalMs = Number(process.env.BENCH_INTERVAL_MS ?? '10');
const PROMPT_TOKENS = 10;

const fake = await startFakeOpenAI({
  handler: async (ex) => {
    const n = typeof ex.req.body?.max_tokens === 'number' ? ex.req.body.max_tokens : 50;
    ex.sse.role();
    for (let i = 0; i < n; i++) {
      await sleep(intervalMs);
      if (ex.gone) return;
      ex.sse.content(`${i === 0 ? '' : ' '}w${i}@${process.hrtime.bigint() / 1000n}`);
    }
    ex.sse.finish('stop');
    ex.sse.usage(PROMPT_TOKENS, n);
    ex.sse.done();
  },
});
console.log(`port=${fake.port}`);
process.on('SIGTERM', () => {
  void fake.close().finally(() => process.exit(0));
});
