import { Worker } from 'node:worker_threads';
import type { Database } from './database.js';

/**
 * WAL checkpoints off the event loop.
 *
 * SQLite's automatic checkpoint runs inside whichever commit pushes the WAL
 * past 1000 pages: that commit then copies every frame into the database file
 * and syncs it, a stall of milliseconds on the thread that serves every
 * socket (it was the whole p99 of a cache hit's reply in `npm run bench:cache`).
 * Here the main connection's automatic checkpoint is turned off and a worker
 * thread with its own connection runs PASSIVE checkpoints on a timer, which
 * never block the writer (WAL lets a checkpoint run alongside it).
 *
 * If that thread cannot run or dies, the main connection's automatic
 * checkpoint comes back on, so the WAL never grows without bound.
 */
export interface CheckpointWorkerData {
  file: string;
  intervalMs: number;
}

export type CheckpointReport = { t: 'checkpointed'; frames: number } | { t: 'failed'; message: string } | { t: 'recovered' } | { t: 'closed' };

export interface Checkpointer {
  /** Runs a last checkpoint and stops the thread. */
  close(): Promise<void>;
}

export interface CheckpointerOptions {
  /** How often the thread checkpoints; default 200 ms. */
  intervalMs?: number;
  /** A WAL file bigger than this is truncated back to it once its frames are copied; default 64 MiB. */
  walSizeLimitBytes?: number;
  onCheckpoint?: (frames: number) => void;
  log: (level: 'warn' | 'info', msg: string, fields?: Record<string, unknown>) => void;
}

const SQLITE_DEFAULT_AUTOCHECKPOINT = 1000;

export function startCheckpointer(db: Database, options: CheckpointerOptions): Checkpointer {
  const { log } = options;
  db.raw.pragma(`journal_size_limit = ${options.walSizeLimitBytes ?? 64 * 1024 * 1024}`);
  const workerData: CheckpointWorkerData = { file: db.file, intervalMs: options.intervalMs ?? 200 };
  const worker = new Worker(new URL('./checkpoint-worker.js', import.meta.url), { workerData });
  worker.unref();
  db.raw.pragma('wal_autocheckpoint = 0');

  let closing = false;
  let fellBack = false;
  const fallBack = (why: string, fields: Record<string, unknown> = {}) => {
    if (fellBack || !db.raw.open) return;
    fellBack = true;
    db.raw.pragma(`wal_autocheckpoint = ${SQLITE_DEFAULT_AUTOCHECKPOINT}`);
    log('warn', `background WAL checkpoints stopped (${why}); commits checkpoint the WAL themselves again`, fields);
  };

  const closed = new Promise<void>((resolve) => {
    worker.on('message', (report: CheckpointReport) => {
      switch (report.t) {
        case 'checkpointed':
          options.onCheckpoint?.(report.frames);
          break;
        case 'failed':
          log('warn', 'WAL checkpoint failed; retrying', { error: report.message });
          break;
        case 'recovered':
          log('info', 'WAL checkpoints work again');
          break;
        case 'closed':
          resolve();
          break;
      }
    });
    worker.on('error', (err) => fallBack('the checkpoint thread failed', { err }));
    worker.on('exit', (code) => {
      if (!closing) fallBack(`the checkpoint thread exited with ${code}`);
      resolve();
    });
  });

  return {
    async close() {
      if (closing) return closed;
      closing = true;
      worker.postMessage('close');
      const timer = setTimeout(() => void worker.terminate(), 5000);
      await closed;
      clearTimeout(timer);
    },
  };
}
