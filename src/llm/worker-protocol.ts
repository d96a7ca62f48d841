import type { MessagePort } from 'node:worker_threads';
import type { ErrorCode } from '../protocol/index.js';
import type { ModelRequest, ModelResult } from './provider.js';

/** What the main thread hands a worker. `id` names the call on the worker's event port. */
export type WorkerTask = { kind: 'stream'; id: number; request: ModelRequest } | { kind: 'check' };

/**
 * Posted once by each worker on its parentPort (the pool sees it as Piscina's `message` event): the port that
 * carries the events of every call the worker runs, and the pool's cancels back. One port per worker, not one
 * per call: a MessageChannel and its transfer cost more than the rest of a call's dispatch.
 */
export interface WorkerHello {
  t: 'events';
  threadId: number;
  port: MessagePort;
  /**
   * The call the worker is starting (startingMark of its id; 0: none), in memory both threads see: a worker posts a
   * call's `start` once the provider has sent its request, so a provider that hangs before that never posts it, and
   * the pool finds the thread to terminate here instead.
   */
  starting: Int32Array;
}

/** What a worker's `starting` slot holds while it starts call `id`: never 0, and within an Int32Array's range. */
export function startingMark(id: number): number {
  return (id % 0x7fffffff) + 1;
}

/**
 * Posted once by each worker on its parentPort once its provider is created and warmed (a check run: the upstream's
 * connection opened, the local model loaded), whether or not that check passed: the worker is up. The readiness
 * check says ready only once every worker has sent it, so the first chat after a start finds them all warm.
 */
export interface WorkerWarm {
  t: 'warm';
  threadId: number;
}

/**
 * What a worker tells the pool about call `id`, in order: `start` (once the provider has started the call: its request
 * sent), chunks (see WorkerBatch), then exactly one `end` or `error`.
 */
export type WorkerEvent = { id: number } & (
  | { t: 'start'; threadId: number }
  | { t: 'end'; result: ModelResult | null; cancelled: boolean }
  | { t: 'error'; code: ErrorCode; message: string; retryAfterMs?: number | undefined }
);

/**
 * What a worker posts on its event port: the chunks and events of all its calls, in order. A chunk is two entries,
 * the call id then the text; an event is one. The chunks of a turn of the worker's event loop leave together when
 * it ends (an event at once, with the chunks before it): one message per turn, not one per chunk, because under
 * load a worker reads several streams' chunks in one turn, and each message wakes the main thread.
 */
export type WorkerBatch = Array<number | string | WorkerEvent>;

/** What the pool posts on a worker's event port. */
export type PoolCommand = { t: 'cancel'; id: number };
