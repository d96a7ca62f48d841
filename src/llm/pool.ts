import { randomUUID } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { BroadcastChannel } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { AppError, type ErrorCode } from '../protocol/index.js';
import { SlotLedger } from './slot-ledger.js';
import type { ModelRequest, ModelResult, ProviderSettings } from './provider.js';
import { startingMark, type PoolCommand, type WorkerBatch, type WorkerEvent, type WorkerHello, type WorkerTask, type WorkerWarm } from './worker-protocol.js';

export interface ModelPoolOptions {
  settings: ProviderSettings;
  threads: number;
  tasksPerWorker: number;
  /** Model calls allowed to wait for a worker slot; past it, reserve() refuses with `overloaded`. */
  maxQueue: number;
  /**
   * Calls of one owner (a user) allowed to wait for a worker slot; past it, reserve() refuses that owner with
   * `rate_limited` (default: no bound beyond maxQueue). Waiting owners are served round-robin either way.
   */
  maxQueuedPerOwner?: number;
  /** Hard deadline of one model call; past it the worker is terminated and replaced. */
  taskTimeoutMs: number;
  /**
   * How calls are spread over the workers (see WorkerBalance). Default `spread`.
   */
  balance?: WorkerBalance;
  /** Compiled worker entry; defaults to dist/workers/llm-entry.cjs (which imports llm.worker.js) next to this build. */
  workerFile?: string | URL;
  hooks?: {
    onModelCall?: () => void;
    onWorkerFailure?: () => void;
    /** reserve() refused an owner whose share of the queue is full. */
    onOwnerQueueFull?: () => void;
  };
}

/**
 * `spread`: each call goes to the worker running the fewest (Piscina's own balancer): the calls of a CPU-bound
 * provider (llama.cpp) share the cores. `pack`: each call goes to the busiest worker that still has room for it
 * (tasksPerWorker), the next worker taking calls only once the first is full: the streams of an I/O-bound provider
 * (a relay) share one worker's wake-ups and one message per turn to the main thread, instead of each worker waking
 * for its own few (docs/relay.md).
 */
export type WorkerBalance = 'spread' | 'pack';

/**
 * CHATWIRE_WORKER_BALANCE: `auto` packs the calls of the `openai` provider (a relay: waiting on the upstream, a few
 * µs of work per token) and spreads the others': `local` computes its tokens, `dev` without a delay makes them as
 * fast as a worker can, and a custom provider may do either.
 */
export function workerBalance(setting: WorkerBalance | 'auto', llm: string): WorkerBalance {
  if (setting !== 'auto') return setting;
  return llm === 'openai' ? 'pack' : 'spread';
}

type LoadBalancer = NonNullable<NonNullable<ConstructorParameters<typeof Piscina>[0]>['loadBalancer']>;

/**
 * The `pack` balancer: the busiest worker with room left (ties: the first in Piscina's order). But a worker starts
 * one call per turn of its event loop (workers/llm.worker.ts), so calls that arrive together (a burst, handed over
 * in one turn of the main thread's loop) are spread instead: a worker already handed a call in this turn takes
 * another only when every worker has been, and then the least busy one does.
 */
export function packingBalancer(maximumUsage: number): LoadBalancer {
  const handedThisTurn = new Set<number>();
  let clearing = false;
  return (_task, workers) => {
    let packed: (typeof workers)[number] | null = null;
    let spread: (typeof workers)[number] | null = null;
    for (const worker of workers) {
      if (worker.terminating || worker.destroyed || worker.isRunningAbortableTask || worker.currentUsage >= maximumUsage) continue;
      if (!handedThisTurn.has(worker.id) && (packed === null || worker.currentUsage > packed.currentUsage)) packed = worker;
      if (spread === null || worker.currentUsage < spread.currentUsage) spread = worker;
    }
    const chosen = packed ?? spread;
    if (chosen !== null) {
      handedThisTurn.add(chosen.id);
      if (!clearing) {
        clearing = true;
        setImmediate(() => {
          handedThisTurn.clear();
          clearing = false;
        });
      }
    }
    return chosen;
  };
}

/**
 * On the pool's BroadcastChannel (its name is workerData.controlChannel): a worker whose provider holds resources
 * announces `opened`; the pool's close() broadcasts `close`, and each such worker answers `closed` once its provider
 * has released them.
 */
export type ControlMessage = { t: 'opened'; threadId: number } | { t: 'close' } | { t: 'closed'; threadId: number };

export interface ModelRunHandlers {
  /** A worker picked the call up (the end of its queue time). */
  onStart?(): void;
  onChunk(text: string): void;
  /** The call ended: normally, or cancelled (result null if the provider gave none). */
  onEnd(result: ModelResult | null, cancelled: boolean): void;
  onError(error: AppError): void;
}

export interface ModelRun {
  /**
   * Asks the worker to stop generating; onEnd follows with cancelled = true. A call no worker has started yet ends
   * at once (onEnd(null, true) before cancel returns) and gives its place in the pool back.
   */
  cancel(): void;
}

/** A place in the pool, taken before the user's message is stored so overload is refused up front. */
export interface PoolSlot {
  run(request: ModelRequest, handlers: ModelRunHandlers): ModelRun;
  release(): void;
}

export interface ModelPool {
  /**
   * A place for a call of `owner` (the user it is for). Throws AppError `rate_limited` (with retryAfterMs) when the
   * owner already has maxQueuedPerOwner calls waiting, `overloaded` when the pool is full or closed.
   */
  reserve(owner: string): PoolSlot;
  stats(): { threads: number; running: number; queued: number; inFlight: number; capacity: number };
  /**
   * Resolves when every worker has started and warmed its provider (once, after the start: a worker replaced later
   * does not make the pool unready), a worker answers, and the provider says it is ready; rejects with the reason.
   */
  check(timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}

// If a worker finished its task but its `end` marker has not arrived on the port by then, the stream is broken.
const END_MARKER_GRACE_MS = 2000;
// A call past its deadline is asked to stop; a worker that has not stopped this much later is terminated.
const DEADLINE_STOP_GRACE_MS = 2000;
// close() waits this long for the workers to close their providers (free a loaded model) before terminating them.
const PROVIDER_CLOSE_GRACE_MS = 2000;

export function createModelPool(options: ModelPoolOptions): ModelPool {
  const filename = options.workerFile ?? new URL('../../workers/llm-entry.cjs', import.meta.url);
  // Calls running at once: each worker runs tasksPerWorker streams. The pool keeps its own queue in front of Piscina
  // (FIFO, so one user's hundred calls would run before another's one): a call goes to Piscina only when one of
  // these slots is free, picked round-robin over the users waiting (FairQueue). A call that ends while it waits
  // (cancelled, past its deadline) just leaves that queue and never reaches a worker.
  const slots = options.threads * options.tasksPerWorker;
  // Piscina has no per-worker teardown: workers whose provider holds resources (a llama.cpp model) say so on this
  // channel, and close() asks them to close it before the threads are terminated.
  const controlChannel = `chatwire-llm-${randomUUID()}`;
  const control = new BroadcastChannel(controlChannel);
  control.unref();
  const providersOpen = new Set<number>();
  let onProviderClosed: (() => void) | undefined;
  control.onmessage = (event) => {
    const msg = (event as { data: ControlMessage }).data;
    if (msg.t === 'opened') providersOpen.add(msg.threadId);
    if (msg.t === 'closed') {
      providersOpen.delete(msg.threadId);
      onProviderClosed?.();
    }
  };
  const piscina = new Piscina<WorkerTask, string | null>({
    // A path, not a file: URL: Piscina turns a URL into a path again on every run().
    filename: filename instanceof URL || filename.startsWith('file:') ? fileURLToPath(filename) : filename,
    minThreads: options.threads,
    maxThreads: options.threads,
    concurrentTasksPerWorker: options.tasksPerWorker,
    ...(options.balance === 'pack' ? { loadBalancer: packingBalancer(options.tasksPerWorker) } : {}),
    // Admission and queueing are ours: Piscina gets a stream task only for a free slot (see dispatch), so its queue
    // holds at most `slots` of them (while a worker starts or is replaced) plus one health check (check() never has
    // two waiting). It refuses a task only once it holds maxQueue, which it never does.
    maxQueue: slots + 1,
    idleTimeout: 60_000,
    // 'sync' parks an idle worker in Atomics.wait, which stops its event loop: it could not hear the close request.
    atomics: 'async',
    // The pool's own numbers are enough (stats()); Piscina's histograms would cost every task a record.
    recordTiming: false,
    workerData: { settings: options.settings, controlChannel },
  });
  // A worker that dies is replaced by Piscina; its tasks are failed through their run() promises.
  piscina.on('error', () => {});
  /** Stream tasks handed to Piscina whose promise has not settled: each holds one of the slots. */
  let active = 0;
  /** Calls waiting for a slot, by owner; and the places reserve() gave that run() has not queued yet. */
  const ledger = new SlotLedger<{ submit(): void; abandon(): void }>({
    slots,
    maxQueue: options.maxQueue,
    maxQueuedPerOwner: options.maxQueuedPerOwner,
    taskTimeoutMs: options.taskTimeoutMs,
    onOwnerQueueFull: options.hooks?.onOwnerQueueFull,
  });
  const waiting = ledger.waiting;
  let closed = false;
  let nextCallId = 0;
  /** The calls started and not finished, by id: where a worker's events and chunks go. */
  const calls = new Map<number, { event(event: WorkerEvent): void; chunk(text: string): void }>();
  /**
   * The calls that ended before a worker started them and whose Piscina task is still queued, by id: told when a
   * worker starts the task after all (with that worker's thread id).
   */
  const retired = new Map<number, (threadId: number) => void>();
  /** The health check waiting for a worker, if any: the checks asked for meanwhile wait for its answer. */
  let pendingCheck: Promise<string | null> | null = null;
  /** Each live worker's hello (its event port and `starting` slot), by thread id. */
  const workers = new Map<number, WorkerHello>();
  /**
   * The thread of call `id`: `threadId`, from the call's `start`, or else the one whose `starting` slot holds the call
   * (its provider has not returned yet: hung, if that lasts); undefined when no thread has it.
   */
  function threadOf(id: number, threadId: number | null) {
    let found = threadId;
    if (found === null) {
      const mark = startingMark(id);
      for (const worker of workers.values()) {
        if (Atomics.load(worker.starting, 0) !== mark) continue;
        found = worker.threadId;
        break;
      }
    }
    return found === null ? undefined : piscina.threads.find((w) => w.threadId === found);
  }
  /** Workers that have warmed their provider (WorkerWarm); and whether all the pool's threads had, once. */
  const warmThreads = new Set<number>();
  let warmedUp = false;
  let onWarmedUp: () => void = () => {};
  const warmed = new Promise<void>((resolve) => (onWarmedUp = resolve));
  piscina.on('message', (msg: WorkerHello | WorkerWarm) => {
    if (msg?.t === 'warm') {
      warmThreads.add(msg.threadId);
      if (warmThreads.size >= options.threads && !warmedUp) {
        warmedUp = true;
        onWarmedUp();
      }
      return;
    }
    if (msg?.t !== 'events') return;
    const { threadId, port } = msg;
    workers.set(threadId, msg);
    port.on('message', (batch: WorkerBatch) => {
      for (let i = 0; i < batch.length; i++) {
        const entry = batch[i] as number | string | WorkerEvent;
        if (typeof entry === 'number') {
          // A chunk of a call that ended here already (its deadline) is dropped, as its end will be.
          calls.get(entry)?.chunk(batch[++i] as string);
          continue;
        }
        const event = entry as WorkerEvent;
        const call = calls.get(event.id);
        if (call) call.event(event);
        // A call that ended here while still queued (cancelled, or past its deadline) is started by a worker later:
        // stop it at once rather than let it run for nobody. Its chunks and end are dropped here, as above.
        else if (event.t === 'start') {
          port.postMessage({ t: 'cancel', id: event.id } satisfies PoolCommand);
          retired.get(event.id)?.(event.threadId);
        }
      }
    });
    port.once('close', () => {
      if (workers.get(threadId) === msg) workers.delete(threadId);
      warmThreads.delete(threadId);
    });
  });

  /** Hands waiting calls to Piscina while slots are free, round-robin over their owners. */
  function dispatch(): void {
    while (!closed && active < slots && waiting.size > 0) waiting.shift()?.submit();
  }

  function startRun(owner: string, request: ModelRequest, handlers: ModelRunHandlers, release: () => void): ModelRun {
    const id = nextCallId++;
    const deadlineAt = performance.now() + options.taskTimeoutMs;
    let finished = false;
    // In the pool's queue, waiting for a slot: no Piscina task exists for it yet.
    let queued: { submit(): void; abandon(): void } | null = null;
    let submitted = false;
    // Piscina's task for this call ended (it resolved or rejected): no worker runs it, and it is out of Piscina's queue.
    let settled = false;
    let graceTimer: NodeJS.Timeout | undefined;
    let deadlineTimer: NodeJS.Timeout | undefined;
    let stopTimer: NodeJS.Timeout | undefined;
    let retiredStopTimer: NodeJS.Timeout | undefined;
    let deadlineHit = false;
    let terminated = false;
    let cancelRequested = false;
    // The worker running this call, from its `start` event: the one to ask to stop, or to terminate if it hangs (one
    // that hangs before its `start` is found by threadOf()).
    let workerThreadId: number | null = null;
    // A stop asked for before the worker started the call is sent with its `start`.
    const askToStop = () => {
      if (workerThreadId !== null) workers.get(workerThreadId)?.port.postMessage({ t: 'cancel', id } satisfies PoolCommand);
    };
    // A worker that starts this call after it ended here is told to stop at once (see the port handler). A worker
    // that does not stop it is hung, as at a deadline: it is terminated once the call's deadline and the stop grace
    // have passed (also one that hangs starting it, before its `start`), so a stopped call never holds a worker for good.
    const stopRetired = (threadId: number | null) => {
      clearTimeout(retiredStopTimer);
      retiredStopTimer = setTimeout(
        () => {
          if (!settled) void threadOf(id, threadId)?.terminate();
        },
        Math.max(0, deadlineAt - performance.now()) + DEADLINE_STOP_GRACE_MS,
      );
    };
    const onRetiredStart = (threadId: number) => {
      retired.delete(id);
      stopRetired(threadId);
    };
    const finish = () => {
      finished = true;
      clearTimeout(graceTimer);
      clearTimeout(deadlineTimer);
      clearTimeout(stopTimer);
      calls.delete(id);
      if (queued !== null) waiting.remove(owner, queued);
      queued = null;
      if (submitted && workerThreadId === null && !settled) {
        retired.set(id, onRetiredStart);
        stopRetired(null);
      }
      release();
    };
    // When it was handed to Piscina: how long it held its slot feeds serviceMs.
    let submittedAt = 0;
    const onSettled = () => {
      settled = true;
      retired.delete(id);
      clearTimeout(retiredStopTimer);
      active--;
      ledger.timed(performance.now() - submittedAt);
      dispatch();
    };
    const fail = (code: ErrorCode, message: string, retryAfterMs?: number) => {
      if (finished) return;
      finish();
      handlers.onError(new AppError(code, message, retryAfterMs === undefined ? {} : { retryAfterMs }));
    };
    calls.set(id, {
      chunk: (text) => handlers.onChunk(text),
      event: (event) => {
        switch (event.t) {
          case 'start':
            workerThreadId = event.threadId;
            if (cancelRequested || deadlineHit) askToStop();
            handlers.onStart?.();
            break;
          case 'end':
            if (deadlineHit && !cancelRequested) {
              fail('upstream_timeout', `the model call exceeded its ${options.taskTimeoutMs} ms deadline`);
              break;
            }
            finish();
            handlers.onEnd(event.result, event.cancelled);
            break;
          case 'error':
            fail(event.code, event.message, event.retryAfterMs);
            break;
        }
      },
    });
    const submit = () => {
      queued = null;
      submitted = true;
      active++;
      submittedAt = performance.now();
      piscina.run({ kind: 'stream', id, request }).then(
        () => {
          onSettled();
          if (!finished) {
            graceTimer = setTimeout(() => fail('worker_failed', 'the model stream ended without its end marker'), END_MARKER_GRACE_MS);
            graceTimer.unref();
          }
        },
        (err: unknown) => {
          onSettled();
          if (finished) return;
          options.hooks?.onWorkerFailure?.();
          if (terminated) fail('worker_failed', `the model call exceeded its ${options.taskTimeoutMs} ms deadline; the worker was replaced`);
          else if (closed) fail('worker_failed', 'the server is shutting down');
          else fail('worker_failed', `the worker running this task died (${err instanceof Error ? err.message.slice(0, 200) : 'unknown'})`);
        },
      );
    };
    queued = { submit, abandon: () => fail('worker_failed', 'the server is shutting down') };
    waiting.push(owner, queued);
    dispatch();
    options.hooks?.onModelCall?.();
    // At the deadline the worker is first asked to stop, as a cancel does: terminating a thread while a native
    // provider (llama.cpp) is inside a call can abort the whole process. Only a worker that does not stop in time
    // (a hung one) is terminated and replaced.
    // No AbortSignal goes to Piscina: it runs an abortable task alone on its worker (no sharing with the other
    // streams), and aborting it terminates the worker. The hung worker is terminated here instead, by thread id.
    // Armed once the call is handed over (or queued), as the metric is counted: neither is needed to start it. A
    // call that ended in the hand-over (the pool closing) has nothing to time.
    if (!finished)
      deadlineTimer = setTimeout(() => {
        // Still waiting for a slot: it leaves the queue and never reaches a worker.
        if (queued !== null) {
          fail('upstream_timeout', `the model call exceeded its ${options.taskTimeoutMs} ms deadline waiting for a worker`);
          return;
        }
        deadlineHit = true;
        askToStop();
        stopTimer = setTimeout(() => {
          if (finished) return;
          const thread = threadOf(id, workerThreadId);
          if (!thread) {
            fail('upstream_timeout', `the model call exceeded its ${options.taskTimeoutMs} ms deadline`);
            return;
          }
          terminated = true;
          void thread.terminate();
        }, DEADLINE_STOP_GRACE_MS);
      }, options.taskTimeoutMs);
    return {
      cancel() {
        if (finished) return;
        if (workerThreadId === null) {
          // No worker has started it: it ends now and its place goes to the next chat. Still waiting, it leaves the
          // queue; handed to Piscina already, the worker that picks it up is told to stop at once, and what it sends
          // for it is dropped.
          finish();
          handlers.onEnd(null, true);
          return;
        }
        cancelRequested = true;
        askToStop();
      },
    };
  }

  async function closeProviders(): Promise<void> {
    const live = new Set(piscina.threads.map((t) => t.threadId));
    const pending = () => [...providersOpen].filter((id) => live.has(id)).length;
    if (pending() === 0) return;
    await new Promise<void>((resolve) => {
      const timer = setTimeout(resolve, PROVIDER_CLOSE_GRACE_MS);
      onProviderClosed = () => {
        if (pending() > 0) return;
        clearTimeout(timer);
        resolve();
      };
      control.postMessage({ t: 'close' } satisfies ControlMessage);
    });
    onProviderClosed = undefined;
  }

  return {
    reserve(owner) {
      return ledger.slot(owner, closed, (request, handlers, release) => startRun(owner, request, handlers, release));
    },
    stats() {
      // Waiting are the calls in the pool's queue, and any Piscina holds while a worker starts; Piscina's queue may
      // also hold the tasks of calls that ended before a worker started them: they wait for no one.
      const queued = waiting.size + Math.max(0, piscina.queueSize - retired.size);
      return {
        threads: piscina.threads.length,
        running: Math.max(0, ledger.inFlight - queued),
        queued,
        inFlight: ledger.inFlight,
        capacity: ledger.capacity,
      };
    },
    async check(timeoutMs = 2000) {
      if (closed) throw new Error('the worker pool is closed');
      // No AbortSignal: an abortable task would wait for an idle worker instead of sharing a busy one.
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          reject(
            new Error(
              warmedUp
                ? `no worker answered within ${timeoutMs} ms`
                : `${warmThreads.size} of ${options.threads} workers started and warmed within ${timeoutMs} ms`,
            ),
          );
        }, timeoutMs);
      });
      // Not ready before every worker is up with its provider warm: the first chats would pay for starting them.
      if (!warmedUp) {
        try {
          await Promise.race([warmed, timeout]);
        } catch (err) {
          clearTimeout(timer);
          throw err;
        }
      }
      // One check waits in Piscina's queue at a time (its maxQueue counts on it): a probe that comes while one waits
      // takes that one's answer, which is as fresh, since no worker has answered yet.
      pendingCheck ??= piscina.run({ kind: 'check' }).finally(() => {
        pendingCheck = null;
      });
      try {
        const result = await Promise.race([pendingCheck, timeout]);
        if (result !== 'ok') throw new Error('the worker pool answered unexpectedly');
      } finally {
        clearTimeout(timer);
      }
    },
    async close() {
      if (closed) return;
      closed = true;
      for (const call of waiting.drain()) call.abandon();
      await closeProviders();
      control.close();
      await piscina.destroy();
    },
  };
}
