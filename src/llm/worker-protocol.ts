import type { MessagePort } from 'node:worker_threads';
import type { ErrorCode } from '../protocol/index.js';
import type { ModelRequest, ModelResult } from './provider.js';

/** What the main thread hands a worker. */
export type WorkerTask = { kind: 'stream'; request: ModelRequest; port: MessagePort } | { kind: 'check' };

/** What a worker posts on the task's port: chunks, then exactly one `end` or `error`. */
export type WorkerEvent =
  | { t: 'start'; threadId: number }
  | { t: 'chunk'; text: string }
  | { t: 'end'; result: ModelResult | null; cancelled: boolean }
  | { t: 'error'; code: ErrorCode; message: string; retryAfterMs?: number | undefined };
