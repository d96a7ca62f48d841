import type { Database } from './database.js';

export interface WriteBatcher {
  /** Runs `op` inside the next group commit; resolves after that commit is durable. */
  enqueue<T>(op: () => T): Promise<T>;
  /** Commits whatever is queued now. */
  flush(): void;
  readonly pending: number;
}

interface Pending {
  op: () => unknown;
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
}

/**
 * Group commit: every write queued during one turn of the event loop goes into
 * one SQLite transaction, committed on setImmediate. One fsync-bound commit
 * per tick instead of one per message is what keeps the ack fast under load.
 * If the batch fails, each write is retried alone, so one bad write fails only
 * its own caller.
 */
export function createWriteBatcher(db: Database, onCommit?: (seconds: number, size: number) => void): WriteBatcher {
  let queue: Pending[] = [];
  let scheduled = false;

  const runAll = (batch: Pending[]) => {
    const results = db.transaction(() => batch.map((p) => p.op()));
    for (const [i, p] of batch.entries()) p.resolve(results[i]);
  };

  const flush = () => {
    scheduled = false;
    if (queue.length === 0) return;
    const batch = queue;
    queue = [];
    const started = process.hrtime.bigint();
    try {
      runAll(batch);
    } catch {
      for (const p of batch) {
        try {
          p.resolve(db.transaction(p.op));
        } catch (err) {
          p.reject(err);
        }
      }
    }
    onCommit?.(Number(process.hrtime.bigint() - started) / 1e9, batch.length);
  };

  return {
    enqueue<T>(op: () => T): Promise<T> {
      return new Promise<T>((resolve, reject) => {
        queue.push({ op, resolve: resolve as (v: unknown) => void, reject });
        if (!scheduled) {
          scheduled = true;
          setImmediate(flush);
        }
      });
    },
    flush,
    get pending() {
      return queue.length;
    },
  };
}
