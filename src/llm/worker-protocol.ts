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
}

/** What a worker posts on its event port for call `id`, in order: `start`, chunks, then exactly one `end` or `error`. */
export type WorkerEvent = { id: number } & (
  | { t: 'start'; threadId: number }
  | { t: 'chunk'; text: string }
  | { t: 'end'; result: ModelResult | null; cancelled: boolean }
  | { t: 'error'; code: ErrorCode; message: string; retryAfterMs?: number | undefined }
);

/** What the pool posts on a worker's event port. */
export type PoolCommand = { t: 'cancel'; id: number };
