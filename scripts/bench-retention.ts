/**
 * The retained-task flood: one open-mode client asks the same cached 4,096-token reply over and over at full
 * speed (POST /v1/chat, nothing read back; every hit leaves a finished task behind for resume), and the server's
 * heap is sampled from /metrics. Without a budget on finished tasks this grew the heap by about 27 KB per chat
 * until the process died; with CHATWIRE_TASK_RETENTION_MAX_BYTES the growth stays within the budget plus a fixed
 * overhead.
 *
 *   npm run bench:retention -- [--seconds 60] [--budget-mib 32] [--concurrency 16] [--max-tokens 4096] [--heap-limit-mib N]
 *
 * The heap is sampled every 2 s; V8 lets garbage pile up between major collections, so the figure that says what
 * is retained is the heap at its low points (after a major GC), and --heap-limit-mib (V8's --max-old-space-size
 * for the server) shows whether the server lives within a given heap at all.
 *
 * The server runs in its own process with the per-user limits raised (bench-support), so that the budget, not a
 * rate limit, is what holds memory: the bound must hold for any number of clients each at its allowed rate.
 */
import { parseArgs, printTable, scrape, sleep, startChatwire } from './bench-support.js';

const args = parseArgs({ seconds: '60', 'budget-mib': '32', concurrency: '16', 'max-tokens': '4096', 'heap-limit-mib': '' });
const seconds = Number(args.seconds);
const budgetBytes = Math.round(Number(args['budget-mib']) * 1024 * 1024);
const concurrency = Number(args.concurrency);
const maxTokens = Number(args['max-tokens']);
const MiB = 1024 * 1024;
const TEXT = 'the reply every flooder asks for';

interface Sample {
  t: number;
  heapUsed: number;
  /** Off the V8 heap: ArrayBuffers (a finished task's chunk boundaries), buffers. */
  external: number;
  rss: number;
  retained: number;
}

const heapLimit: Record<string, string> = args['heap-limit-mib'] === '' ? {} : { NODE_OPTIONS: `--max-old-space-size=${Number(args['heap-limit-mib'])}` };
const server = await startChatwire({ CHATWIRE_TASK_RETENTION_MAX_BYTES: String(budgetBytes), ...heapLimit });
let diedAt: number | null = null;
let death = '';
// What the server says as it dies (V8 prints "JavaScript heap out of memory" on stderr).
let stderrTail = '';
server.child.stderr?.on('data', (c: Buffer) => (stderrTail = (stderrTail + c.toString()).slice(-4000)));
const base = `http://127.0.0.1:${server.port}`;
// No ?user=: in open mode each request is an anonymous user of its own, as the flood that found this came.
const post = (query = '') =>
  fetch(`${base}/v1/chat${query}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ text: TEXT, params: { maxTokens } }),
  });

async function sample(started: number): Promise<Sample> {
  const [heapUsed, external, rss, retained] = await Promise.all([
    scrape(server.port, 'chatwire_process_nodejs_heap_size_used_bytes'),
    scrape(server.port, 'chatwire_process_nodejs_external_memory_bytes'),
    scrape(server.port, 'chatwire_process_process_resident_memory_bytes'),
    scrape(server.port, 'chatwire_retained_task_bytes'),
  ]);
  return { t: (performance.now() - started) / 1000, heapUsed, external, rss, retained };
}

try {
  // The first chat runs the model and fills the cache; every later one is a hit.
  const first = (await (await post('?user=warm-up')).json()) as { taskId: string };
  while (((await (await fetch(`${base}/v1/tasks/${first.taskId}?user=warm-up`)).json()) as { status: string }).status !== 'done') await sleep(100);
  const started = performance.now();
  const baseline = await sample(started);
  let accepted = 0;
  let refused = 0;
  let stop = false;
  server.child.once('exit', (code, signal) => {
    diedAt = (performance.now() - started) / 1000;
    const fatal = /FATAL ERROR: [^\n]*|JavaScript heap out of memory/.exec(stderrTail)?.[0];
    death = `exit ${code ?? signal}${fatal === undefined ? '' : `: ${fatal}`}`;
    stop = true;
  });
  const loops = Array.from({ length: concurrency }, async () => {
    while (!stop) {
      try {
        const res = await post();
        await res.arrayBuffer();
        if (res.status === 202) accepted++;
        else refused++;
      } catch {
        if (!stop) await sleep(10);
      }
    }
  });
  const samples: Sample[] = [baseline];
  while (performance.now() - started < seconds * 1000) {
    await sleep(2000);
    if (diedAt !== null) break;
    const s = await sample(started).catch(() => null);
    if (s === null) break;
    samples.push(s);
    process.stderr.write(
      `\r${s.t.toFixed(0)} s: ${accepted} chats, heap ${(s.heapUsed / MiB).toFixed(1)} MiB, rss ${(s.rss / MiB).toFixed(1)} MiB, retained ${(s.retained / MiB).toFixed(1)} MiB   `,
    );
  }
  stop = true;
  await Promise.all(loops);
  process.stderr.write('\n');
  const last = samples.at(-1) as Sample;
  // The low points of the sawtooth over the second half: what a major collection leaves, i.e. what is retained.
  const secondHalf = samples.filter((s) => s.t >= last.t / 2);
  const floorHeap = Math.min(...secondHalf.map((s) => s.heapUsed));
  const floorMemory = Math.min(...secondHalf.map((s) => s.heapUsed + s.external));
  const maxHeap = Math.max(...samples.map((s) => s.heapUsed));
  const maxMemory = Math.max(...samples.map((s) => s.heapUsed + s.external));
  const baselineMemory = baseline.heapUsed + baseline.external;
  const maxRetained = Math.max(...samples.map((s) => s.retained));
  const result = {
    bench: 'retention',
    seconds,
    budgetMiB: budgetBytes / MiB,
    maxTokens,
    concurrency,
    heapLimitMiB: args['heap-limit-mib'] === '' ? null : Number(args['heap-limit-mib']),
    serverDiedAtS: diedAt === null ? null : +(diedAt as number).toFixed(1),
    serverDeath: death || null,
    chatsAccepted: accepted,
    chatsPerSecond: Math.round(accepted / seconds),
    refused,
    heapBaselineMiB: +(baseline.heapUsed / MiB).toFixed(1),
    heapMaxMiB: +(maxHeap / MiB).toFixed(1),
    heapGrowthMaxMiB: +((maxHeap - baseline.heapUsed) / MiB).toFixed(1),
    heapGrowthEndMiB: +((last.heapUsed - baseline.heapUsed) / MiB).toFixed(1),
    heapPlusExternalGrowthMaxMiB: +((maxMemory - baselineMemory) / MiB).toFixed(1),
    heapGrowthAfterGcMiB: +((floorHeap - baseline.heapUsed) / MiB).toFixed(1),
    heapPlusExternalGrowthAfterGcMiB: +((floorMemory - baselineMemory) / MiB).toFixed(1),
    rssGrowthEndMiB: +((last.rss - baseline.rss) / MiB).toFixed(1),
    retainedMaxMiB: +(maxRetained / MiB).toFixed(1),
  };
  printTable(
    `Retained-task flood: ${seconds} s of cached ${maxTokens}-token replies, budget ${budgetBytes / MiB} MiB`,
    ['t (s)', 'heap used (MiB)', 'external (MiB)', 'rss (MiB)', 'retained (MiB)'],
    samples.map((s) => [Math.round(s.t), s.heapUsed / MiB, s.external / MiB, s.rss / MiB, s.retained / MiB]),
  );
  console.log(JSON.stringify(result));
} finally {
  await server.stop();
}
