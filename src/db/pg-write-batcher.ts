import postgres from 'postgres';
import { AppError } from '../protocol/index.js';
import type { Pg, PgTx } from './pg.js';

export interface PgWriteBatcher {
  /** Runs `op` inside the next group commit; resolves after that commit. `op` issues its statements on `tx` without awaiting each, so they pipeline. */
  enqueue<T>(op: (tx: PgTx) => Promise<T>): Promise<T>;
  /** Starts the commit of what is queued now, or, while a commit is under way, as soon as it ends. */
  flush(): void;
  /** Writes not committed yet: queued, and in the commit under way. */
  readonly pending: number;
  /** Commits what is queued and resolves once no write is left uncommitted. */
  drain(): Promise<void>;
}

interface Pending {
  op: (tx: PgTx) => Promise<unknown>;
  resolve: (value: unknown) => void;
  reject: (err: unknown) => void;
}

/** Runs every op of a batch on the transaction, in order (their statements pipeline); throws the first failure. */
async function runAll(tx: PgTx, batch: Pending[]): Promise<unknown[]> {
  const settled = await Promise.allSettled(batch.map((p) => p.op(tx)));
  const failed = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (failed) throw failed.reason;
  return settled.map((r) => (r as PromiseFulfilledResult<unknown>).value);
}

/**
 * Group commit on PostgreSQL, as createWriteBatcher does on SQLite: the writes
 * queued during one turn of the event loop go into one transaction, their
 * statements pipelined on one connection, committed once.
 *
 * One commit at a time: writes queued while a commit is under way go into the
 * next one, started as soon as it ends. So under load the batches grow instead
 * of the commits piling up on the pool, and this node's transactions never
 * take the same rows' locks in opposite orders (no deadlock among them).
 *
 * A batch the server refused (a statement failed, so the whole transaction
 * rolled back) is retried one write per transaction, so one bad write fails
 * only its own caller. A batch that failed otherwise (the connection was lost,
 * maybe during COMMIT, so whether it committed is unknown) is not retried:
 * every write of it rejects.
 */
export function createPgWriteBatcher(sql: Pg, onCommit?: (seconds: number, size: number) => void): PgWriteBatcher {
  let queue: Pending[] = [];
  let scheduled = false;
  let committing: Promise<void> | null = null;
  let inCommit = 0;

  async function commit(batch: Pending[]): Promise<void> {
    const started = process.hrtime.bigint();
    // Each write stops counting as pending as its caller is told, before its caller's continuation runs.
    try {
      const results = await sql.begin((tx) => runAll(tx, batch));
      inCommit = 0;
      for (const [i, p] of batch.entries()) p.resolve(results[i]);
    } catch (err) {
      // A refusal of one write (the server's, or chatwire's own AppError, e.g. forbidden) rolled the batch back.
      if (batch.length > 1 && (err instanceof postgres.PostgresError || err instanceof AppError)) {
        const alone = (p: Pending) =>
          sql
            .begin((tx) => p.op(tx))
            .then(
              (value) => {
                inCommit--;
                p.resolve(value);
              },
              (failure: unknown) => {
                inCommit--;
                p.reject(failure);
              },
            );
        await Promise.all(batch.map(alone));
      } else {
        inCommit = 0;
        for (const p of batch) p.reject(err);
      }
    }
    onCommit?.(Number(process.hrtime.bigint() - started) / 1e9, batch.length);
  }

  function flush(): void {
    scheduled = false;
    if (committing !== null || queue.length === 0) return;
    const batch = queue;
    queue = [];
    inCommit = batch.length;
    committing = commit(batch).finally(() => {
      committing = null;
      flush();
    });
  }

  return {
    enqueue<T>(op: (tx: PgTx) => Promise<T>): Promise<T> {
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
      return queue.length + inCommit;
    },
    async drain() {
      flush();
      while (committing !== null) await committing;
    },
  };
}
