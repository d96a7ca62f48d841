import postgres from 'postgres';
import { AppError } from '../protocol/index.js';
import type { Pg } from './pg.js';
import { isConnectionLoss } from './storage-health.js';

export interface PgWriteBatcher<W> {
  /** Queues `write` for the next group commit; resolves after that commit. */
  enqueue(write: W): Promise<void>;
  /** Starts the commit of what is queued now, or, while a commit is under way, as soon as it ends. */
  flush(): void;
  /** Writes not committed yet: queued, and in the commit under way. */
  readonly pending: number;
  /** Commits what is queued and resolves once no write is left uncommitted. */
  drain(): Promise<void>;
}

/**
 * Writes a batch inside its transaction, set-based (a few statements for the whole batch, not a few per write);
 * throws when any write of it is refused, once every statement it sent has settled.
 */
export type WriteAll<W> = (tx: Pg, writes: readonly W[]) => Promise<void>;

/**
 * One transaction on a connection of its own, its BEGIN pipelined with `writeAll`'s statements: one round trip
 * fewer than sql.begin, which waits for BEGIN's answer before it sends the first statement. COMMIT follows once
 * every statement succeeded and writeAll's own checks passed; otherwise ROLLBACK, unless the connection was lost
 * (the server has rolled back, and a ROLLBACK sent there would wait for good, and every later commit behind it).
 */
async function transaction<W>(sql: Pg, writeAll: WriteAll<W>, writes: readonly W[]): Promise<void> {
  const tx = await sql.reserve();
  try {
    // Sent now: its statements, queued after it on the connection, run inside the transaction.
    const begun = tx.unsafe('begin').execute();
    const [began, wrote] = await Promise.allSettled([begun, writeAll(tx, writes)]);
    if (began.status === 'fulfilled' && wrote.status === 'fulfilled') {
      await tx.unsafe('commit');
      return;
    }
    const failures = [began, wrote].flatMap((r) => (r.status === 'rejected' ? [r.reason as unknown] : []));
    if (!failures.some(isConnectionLoss)) await tx.unsafe('rollback').catch(() => {});
    throw failures[0];
  } finally {
    tx.release();
  }
}

interface Pending<W> {
  write: W;
  resolve: () => void;
  reject: (err: unknown) => void;
}

/**
 * Group commit on PostgreSQL, as createWriteBatcher does on SQLite: the writes
 * queued during one turn of the event loop go into one transaction, written by
 * `writeAll` in a few set-based statements (the cost of a statement, on this
 * node's main thread and on the server, is paid per batch, not per write),
 * committed once.
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
export function createPgWriteBatcher<W>(sql: Pg, writeAll: WriteAll<W>, onCommit?: (seconds: number, size: number) => void): PgWriteBatcher<W> {
  let queue: Pending<W>[] = [];
  let scheduled = false;
  let committing: Promise<void> | null = null;
  let inCommit = 0;

  async function commit(batch: Pending<W>[]): Promise<void> {
    const started = process.hrtime.bigint();
    // Each write stops counting as pending as its caller is told, before its caller's continuation runs.
    try {
      await transaction(
        sql,
        writeAll,
        batch.map((p) => p.write),
      );
      inCommit = 0;
      for (const p of batch) p.resolve();
    } catch (err) {
      // A refusal of one write (the server's, or chatwire's own AppError, e.g. forbidden) rolled the batch back.
      if (batch.length > 1 && (err instanceof postgres.PostgresError || err instanceof AppError)) {
        const alone = (p: Pending<W>) =>
          transaction(sql, writeAll, [p.write]).then(
            () => {
              inCommit--;
              p.resolve();
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
    enqueue(write: W): Promise<void> {
      return new Promise<void>((resolve, reject) => {
        queue.push({ write, resolve, reject });
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
