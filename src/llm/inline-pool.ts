/**
 * The model pool of a provider given as an object: a host's object holds functions and closures over the host's
 * own state, which cannot be copied into worker threads, so its calls run here, on the main thread, under the same
 * admission as the worker pool (so many running, so many waiting, then `overloaded`), the same deadline and the
 * same cancel. What it cannot do that the worker pool does: keep CPU-bound work off the event loop, and stop a call
 * that ignores its abort signal (past the deadline the call is failed and its promise abandoned; nothing can
 * terminate it). Providers that compute, or that may hang, belong in a module the workers load.
 */
import { AppError } from '../protocol/index.js';
import type { ModelPool, ModelPoolOptions, ModelRun, ModelRunHandlers, PoolSlot } from './pool.js';
import type { ModelRequest, ModelResult } from './provider.js';

/** A provider as this pool runs it: calls that hand over each chunk (custom-provider.ts's asProvider builds one). */
export interface InlineProvider {
  streamTo(request: ModelRequest, signal: AbortSignal, onChunk: (text: string) => void): Promise<ModelResult>;
  check?(): Promise<void>;
  close?(): Promise<void>;
}

export type InlinePoolOptions = Pick<ModelPoolOptions, 'threads' | 'tasksPerWorker' | 'maxQueue' | 'taskTimeoutMs' | 'hooks'>;

// As the worker pool: past the deadline a call is asked to stop, and failed this much later if it has not.
const DEADLINE_STOP_GRACE_MS = 2000;

interface Call {
  request: ModelRequest;
  handlers: ModelRunHandlers;
  controller: AbortController;
  started: boolean;
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
  const capacity = running + options.maxQueue;
  const waiting: Call[] = [];
  const active = new Set<Call>();
  let inFlight = 0;
  let closed = false;

  const timeoutError = () => new AppError('upstream_timeout', `the model call exceeded its ${options.taskTimeoutMs} ms deadline`);

  function finish(call: Call): boolean {
    if (call.finished) return false;
    call.finished = true;
    for (const t of call.timers) clearTimeout(t);
    active.delete(call);
    const at = waiting.indexOf(call);
    if (at >= 0) waiting.splice(at, 1);
    call.release();
    startWaiting();
    return true;
  }

  function startWaiting(): void {
    while (active.size < running && waiting.length > 0) start(waiting.shift() as Call);
  }

  function settle(call: Call, result: ModelResult | null, err: unknown): void {
    const timedOut = call.deadlineHit && !call.cancelRequested;
    if (!finish(call)) return;
    if (err === undefined && !timedOut) return call.handlers.onEnd(result, call.controller.signal.aborted);
    if (timedOut) return call.handlers.onError(timeoutError());
    if (call.controller.signal.aborted && (isAbortError(err) || !(err instanceof AppError))) return call.handlers.onEnd(null, true);
    call.handlers.onError(err instanceof AppError ? err : new AppError('internal', err instanceof Error ? err.message : String(err)));
  }

  function start(call: Call): void {
    call.started = true;
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

  function run(request: ModelRequest, handlers: ModelRunHandlers, release: () => void): ModelRun {
    const call: Call = { request, handlers, controller: new AbortController(), started: false, finished: false, cancelRequested: false, deadlineHit: false, timers: [], release };
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
    else waiting.push(call);
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
          return run(request, handlers, release);
        },
        release,
      };
    },
    stats() {
      return { threads: 0, running: active.size, queued: waiting.length, inFlight, capacity };
    },
    async check() {
      if (closed) throw new Error('the model pool is closed');
      await provider.check?.();
    },
    async close() {
      if (closed) return;
      closed = true;
      for (const call of [...waiting, ...active]) {
        call.cancelRequested = true;
        if (!call.started && finish(call)) call.handlers.onError(new AppError('worker_failed', 'the server is shutting down'));
        else call.controller.abort();
      }
      await provider.close?.();
    },
  };
}
