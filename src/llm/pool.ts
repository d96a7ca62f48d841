import { MessageChannel } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { AppError, type ErrorCode } from '../protocol/index.js';
import type { ModelRequest, ModelResult, ProviderSettings } from './provider.js';
import type { WorkerEvent, WorkerTask } from './worker-protocol.js';

export interface ModelPoolOptions {
  settings: ProviderSettings;
  threads: number;
  tasksPerWorker: number;
  /** Model calls allowed to wait for a worker slot; past it, reserve() refuses. */
  maxQueue: number;
  /** Hard deadline of one model call; past it the worker is terminated and replaced. */
  taskTimeoutMs: number;
  /** Compiled worker file; defaults to dist/workers/llm.worker.js next to this build. */
  workerFile?: string | URL;
  hooks?: {
    onModelCall?: () => void;
    onWorkerFailure?: () => void;
  };
}

export interface ModelRunHandlers {
  /** A worker picked the call up (the end of its queue time). */
  onStart?(): void;
  onChunk(text: string): void;
  /** The call ended: normally, or cancelled (result null if the provider gave none). */
  onEnd(result: ModelResult | null, cancelled: boolean): void;
  onError(error: AppError): void;
}

export interface ModelRun {
  /** Asks the worker to stop generating; onEnd follows with cancelled = true. */
  cancel(): void;
}

/** A place in the pool, taken before the user's message is stored so overload is refused up front. */
export interface PoolSlot {
  run(request: ModelRequest, handlers: ModelRunHandlers): ModelRun;
  release(): void;
}

export interface ModelPool {
  reserve(): PoolSlot | null;
  stats(): { threads: number; running: number; queued: number; inFlight: number; capacity: number };
  /** Resolves when a worker answers and the provider says it is ready; rejects with the reason. */
  check(timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

// If a worker finished its task but its `end` marker has not arrived on the port by then, the stream is broken.
const END_MARKER_GRACE_MS = 2000;

export function createModelPool(options: ModelPoolOptions): ModelPool {
  const filename = options.workerFile ?? new URL('../../workers/llm.worker.js', import.meta.url);
  const running = options.threads * options.tasksPerWorker;
  const capacity = running + options.maxQueue;
  const piscina = new Piscina<WorkerTask, string | null>({
    filename: filename instanceof URL ? filename.href : filename,
    minThreads: options.threads,
    maxThreads: options.threads,
    concurrentTasksPerWorker: options.tasksPerWorker,
    // Admission is ours (reserve()); Piscina's queue only has to hold what we admitted.
    maxQueue: capacity + options.threads,
    idleTimeout: 60_000,
    workerData: { settings: options.settings },
  });
  // A worker that dies is replaced by Piscina; its tasks are failed through their run() promises.
  piscina.on('error', () => {});
  let inFlight = 0;
  let closed = false;

  function startRun(request: ModelRequest, handlers: ModelRunHandlers, release: () => void): ModelRun {
    const channel = new MessageChannel();
    const port = channel.port1;
    let finished = false;
    let graceTimer: NodeJS.Timeout | undefined;
    const finish = () => {
      finished = true;
      if (graceTimer) clearTimeout(graceTimer);
      port.close();
      release();
    };
    const fail = (code: ErrorCode, message: string, retryAfterMs?: number) => {
      if (finished) return;
      finish();
      handlers.onError(new AppError(code, message, retryAfterMs === undefined ? {} : { retryAfterMs }));
    };
    port.on('message', (event: WorkerEvent) => {
      if (finished) return;
      switch (event.t) {
        case 'start':
          handlers.onStart?.();
          break;
        case 'chunk':
          handlers.onChunk(event.text);
          break;
        case 'end':
          finish();
          handlers.onEnd(event.result, event.cancelled);
          break;
        case 'error':
          fail(event.code, event.message, event.retryAfterMs);
          break;
      }
    });
    options.hooks?.onModelCall?.();
    const deadline = AbortSignal.timeout(options.taskTimeoutMs);
    piscina
      .run({ kind: 'stream', request, port: channel.port2 }, { transferList: [channel.port2], signal: deadline })
      .then(
        () => {
          if (!finished) {
            graceTimer = setTimeout(() => fail('worker_failed', 'the model stream ended without its end marker'), END_MARKER_GRACE_MS);
            graceTimer.unref();
          }
        },
        (err: unknown) => {
          if (finished) return;
          options.hooks?.onWorkerFailure?.();
          if (deadline.aborted) fail('worker_failed', `the model call exceeded its ${options.taskTimeoutMs} ms deadline; the worker was replaced`);
          else if (closed) fail('worker_failed', 'the server is shutting down');
          else fail('worker_failed', `the worker running this task died (${err instanceof Error ? err.message.slice(0, 200) : 'unknown'})`);
        },
      );
    return {
      cancel() {
        if (!finished) port.postMessage({ t: 'cancel' });
      },
    };
  }

  return {
    reserve(): PoolSlot | null {
      if (closed || inFlight >= capacity) return null;
      inFlight++;
      let state: 'reserved' | 'running' | 'released' = 'reserved';
      const release = () => {
        if (state === 'released') return;
        state = 'released';
        inFlight--;
      };
      return {
        run: (request, handlers) => {
          if (state !== 'reserved') throw new Error(`pool slot is ${state}`);
          state = 'running';
          return startRun(request, handlers, release);
        },
        release,
      };
    },
    stats() {
      return {
        threads: piscina.threads.length,
        running: Math.max(0, inFlight - piscina.queueSize),
        queued: piscina.queueSize,
        inFlight,
        capacity,
      };
    },
    async check(timeoutMs = 2000) {
      if (closed) throw new Error('the worker pool is closed');
      const result = await piscina.run({ kind: 'check' }, { signal: AbortSignal.timeout(timeoutMs) });
      if (result !== 'ok') throw new Error('the worker pool answered unexpectedly');
    },
    async close() {
      if (closed) return;
      closed = true;
      await piscina.destroy();
    },
  };
}
