/**
 * The model pool of a provider given as an object: a host's object holds functions and closures over the host's
 * own state, which cannot be copied into worker threads, so its calls run here, on the main thread, under the same
 * admission as the worker pool (so many running, so many waiting, then `overloaded`), the same deadline and the
 * same cancel. What it cannot do that the worker pool does: keep CPU-bound work off the event loop, and stop a call
 * that ignores its abort signal (past the deadline the call is failed and its promise abandoned; nothing can
 * terminate it). Providers that compute, or that may hang, belong in a module the workers load.
 */
import { AppError } from '../protocol/index.js';
import type { ModelPool, ModelPoolOptions, ModelRun, ModelRunHandlers } from './pool.js';
import type { ModelRequest, ModelResult } from './provider.js';
import { SlotLedger } from './slot-ledger.js';

/** A provider as this pool runs it: calls that hand over each chunk (custom-provider.ts's asProvider builds one). */
export interface InlineProvider {
  streamTo(request: ModelRequest, signal: AbortSignal, onChunk: (text: string) => void): Promise<ModelResult>;
  check?(): Promise<void>;
  close?(): Promise<void>;
}

export type InlinePoolOptions = Pick<ModelPoolOptions, 'threads' | 'tasksPerWorker' | 'maxQueue' | 'maxQueuedPerOwner' | 'taskTimeoutMs' | 'hooks'>;

// As the worker pool: past the deadline a call is asked to stop, and failed this much later if it has not.
const DEADLINE_STOP_GRACE_MS = 2000;

interface Call {
  owner: string;
  request: ModelRequest;
  handlers: ModelRunHandlers;
  controller: AbortController;
  started: boolean;
  startedAt: number;
  finished: boolean;
  cancelRequested: boolean;
  deadlineHit: boolean;
  timers: NodeJS.Timeout[];
  release(): void;
}

function isAbortError(err: unknown): boolean {
  return err instanceof Error && (err.name === 'AbortError' || err.name === 'APIUserAbortError');
}

export function createInlinePool(provider: InlineProvider, options: InlinePoolOptions): ModelPool {
  const running = options.threads * options.tasksPerWorker;
  // The same admission as the worker pool: a per-owner share of the waiting calls, served round-robin.
  const ledger = new SlotLedger<Call>({
    slots: running,
    maxQueue: options.maxQueue,
    maxQueuedPerOwner: options.maxQueuedPerOwner,
    taskTimeoutMs: options.taskTimeoutMs,
    onOwnerQueueFull: options.hooks?.onOwnerQueueFull,
  });
  const waiting = ledger.waiting;
  const active = new Set<Call>();
  let closed = false;

  const timeoutError = () => new AppError('upstream_timeout', `the model call exceeded its ${options.taskTimeoutMs} ms deadline`);

  function finish(call: Call): boolean {
    if (call.finished) return false;
    call.finished = true;
    for (const t of call.timers) clearTimeout(t);
    if (active.delete(call)) ledger.timed(performance.now() - call.startedAt);
    else waiting.remove(call.owner, call);
    call.release();
    startWaiting();
    return true;
  }

  function startWaiting(): void {
    while (active.size < running && waiting.size > 0) start(waiting.shift() as Call);
  }

  function settle(call: Call, result: ModelResult | null, err: unknown): void {
    const timedOut = call.deadlineHit && !call.cancelRequested;
    if (!finish(call)) return;
    if (err === undefined && !timedOut) call.handlers.onEnd(result, call.controller.signal.aborted);
    else if (timedOut) call.handlers.onError(timeoutError());
    else if (call.controller.signal.aborted && (isAbortError(err) || !(err instanceof AppError))) call.handlers.onEnd(null, true);
    else call.handlers.onError(err instanceof AppError ? err : new AppError('internal', err instanceof Error ? err.message : String(err)));
  }

  function start(call: Call): void {
    call.started = true;
    call.startedAt = performance.now();
    active.add(call);
    call.handlers.onStart?.();
    const { signal } = call.controller;
    const onChunk = (text: string) => {
      if (!call.finished && text.length > 0) call.handlers.onChunk(text);
    };
    let work: Promise<ModelResult>;
    try {
      work = provider.streamTo(call.request, signal, onChunk);
    } catch (err) {
      work = Promise.reject(err);
    }
    work.then(
      (result) => settle(call, result, undefined),
      (err: unknown) => settle(call, null, err ?? new Error('the provider failed')),
    );
  }

  function run(owner: string, request: ModelRequest, handlers: ModelRunHandlers, release: () => void): ModelRun {
    const call: Call = {
      owner,
      request,
      handlers,
      controller: new AbortController(),
      started: false,
      startedAt: 0,
      finished: false,
      cancelRequested: false,
      deadlineHit: false,
      timers: [],
      release,
    };
    options.hooks?.onModelCall?.();
    call.timers.push(
      setTimeout(() => {
        call.deadlineHit = true;
        if (!call.started) {
          if (finish(call)) handlers.onError(timeoutError());
          return;
        }
        call.controller.abort();
        // A provider that ignores its signal is abandoned: the call fails, and its promise is no longer awaited.
        call.timers.push(setTimeout(() => finish(call) && handlers.onError(timeoutError()), DEADLINE_STOP_GRACE_MS));
      }, options.taskTimeoutMs),
    );
    if (active.size < running) start(call);
    else waiting.push(owner, call);
    return {
      cancel() {
        if (call.finished) return;
        if (!call.started) {
          finish(call);
          handlers.onEnd(null, true);
          return;
        }
        call.cancelRequested = true;
        call.controller.abort();
      },
    };
  }

  return {
    reserve(owner) {
      return ledger.slot(owner, closed, (request, handlers, release) => run(owner, request, handlers, release));
    },
    stats() {
      return { threads: 0, running: active.size, queued: waiting.size, inFlight: ledger.inFlight, capacity: ledger.capacity };
    },
    async check() {
      if (closed) throw new Error('the model pool is closed');
      await provider.check?.();
    },
    async close() {
      if (closed) return;
      closed = true;
      // Every call is failed now, its deadline timers cleared: a provider that ignores its signal would otherwise
      // keep the host process alive until the deadline.
      for (const call of [...waiting.drain(), ...active]) {
        call.cancelRequested = true;
        call.controller.abort();
        if (finish(call)) call.handlers.onError(new AppError('worker_failed', 'the server is shutting down'));
      }
      await provider.close?.();
    },
  };
}
