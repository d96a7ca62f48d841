/**
 * What one hop costs on this machine, measured alongside a benchmark's rounds:
 * the floor under any latency a server adds by passing work between processes
 * and threads.
 *
 * - socket: a round trip over a loopback TCP connection to an echo in another
 *   process (one byte each way, Nagle off): two socket hops.
 * - thread: a round trip over a MessagePort to a worker thread that posts the
 *   message back: two thread hops.
 *
 * The probe runs in a worker thread of its own, so the benchmark's client work
 * on the main thread does not delay it, and pings every `intervalMs` (one
 * outstanding at a time): between pings every party goes idle, as chatwire's
 * threads do between the tokens of a paced stream. Samples are taken per round.
 *
 * This file is three things: the library (startHopProbe), the echo process
 * (run with BENCH_HOPS_ROLE=echo: prints `port=N`), and the worker threads.
 */
import net from 'node:net';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';

export interface HopSamples {
  /** Socket round trips, ms. */
  socketRttMs: number[];
  /** Thread round trips, ms. */
  threadRttMs: number[];
}

export interface HopProbe {
  /** The samples since the last take (or the start), and a fresh start. */
  take(): Promise<HopSamples>;
  stop(): Promise<void>;
}

type ProbeData = { role: 'probe'; echoPort: number; intervalMs: number } | { role: 'thread-echo' };
type ProbeCommand = { t: 'take' } | { t: 'stop' };

const FILE = fileURLToPath(import.meta.url);

/** Starts the probe against an echo process started with BENCH_HOPS_ROLE=echo on `echoPort`. */
export function startHopProbe(echoPort: number, intervalMs: number): Promise<HopProbe> {
  const worker = new Worker(FILE, { workerData: { role: 'probe', echoPort, intervalMs } satisfies ProbeData });
  return new Promise((resolve, reject) => {
    worker.once('error', reject);
    worker.once('message', (ready: unknown) => {
      if (ready !== 'ready') return reject(new Error(`hop probe: unexpected ${String(ready)}`));
      worker.off('error', reject);
      resolve({
        take: () =>
          new Promise<HopSamples>((done) => {
            worker.once('message', (samples: HopSamples) => done(samples));
            worker.postMessage({ t: 'take' } satisfies ProbeCommand);
          }),
        stop: async () => {
          worker.postMessage({ t: 'stop' } satisfies ProbeCommand);
          await new Promise((done) => worker.once('exit', done));
        },
      });
    });
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function runProbe(echoPort: number, intervalMs: number): Promise<void> {
  const port = parentPort as NonNullable<typeof parentPort>;
  const socket = net.connect(echoPort, '127.0.0.1');
  socket.setNoDelay(true);
  await new Promise<void>((resolve, reject) => {
    socket.once('connect', resolve);
    socket.once('error', reject);
  });
  const echo = new Worker(FILE, { workerData: { role: 'thread-echo' } satisfies ProbeData });
  let samples: HopSamples = { socketRttMs: [], threadRttMs: [] };
  let stopped = false;
  port.on('message', (command: ProbeCommand) => {
    if (command.t === 'take') {
      port.postMessage(samples);
      samples = { socketRttMs: [], threadRttMs: [] };
    } else {
      stopped = true;
    }
  });
  /** One round trip: `send` goes out, `listen` hears the reply; the time lands in samples[kind]. */
  const ping = (kind: keyof HopSamples, listen: (done: () => void) => void, send: () => void) =>
    new Promise<void>((resolve) => {
      const sent = performance.now();
      listen(() => {
        samples[kind].push(performance.now() - sent);
        resolve();
      });
      send();
    });
  const socketPing = () =>
    ping(
      'socketRttMs',
      (done) => socket.once('data', done),
      () => socket.write('x'),
    );
  const threadPing = () =>
    ping(
      'threadRttMs',
      (done) => echo.once('message', done),
      () => echo.postMessage(0),
    );
  port.postMessage('ready');
  // The two pings take turns, half an interval apart: neither waits on the other's wake-ups.
  while (!stopped) {
    await sleep(intervalMs / 2);
    await socketPing();
    await sleep(intervalMs / 2);
    await threadPing();
  }
  socket.destroy();
  await echo.terminate();
  port.close();
}

if (!isMainThread) {
  const data = workerData as ProbeData;
  if (data.role === 'thread-echo') {
    parentPort?.on('message', (m: unknown) => parentPort?.postMessage(m));
  } else {
    await runProbe(data.echoPort, data.intervalMs);
  }
} else if (process.env.BENCH_HOPS_ROLE === 'echo' && path.resolve(process.argv[1] ?? '') === FILE) {
  const server = net.createServer((connection) => {
    connection.setNoDelay(true);
    connection.on('data', (data) => connection.write(data));
    connection.on('error', () => connection.destroy());
  });
  server.listen(0, '127.0.0.1', () => console.log(`port=${(server.address() as net.AddressInfo).port}`));
  process.on('SIGTERM', () => process.exit(0));
}
