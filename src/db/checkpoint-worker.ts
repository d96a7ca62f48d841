/**
 * The WAL checkpointer's thread (see checkpointer.ts): its own connection to
 * the database, copying committed WAL frames into the database file with
 * PASSIVE checkpoints, which never block the writer or readers.
 */
import { parentPort, workerData } from 'node:worker_threads';
import BetterSqlite3 from 'better-sqlite3';
import type { CheckpointReport, CheckpointWorkerData } from './checkpointer.js';

const { file, intervalMs } = workerData as CheckpointWorkerData;
const port = parentPort;
if (!port) throw new Error('checkpoint-worker runs as a worker thread');

const db = new BetterSqlite3(file, { fileMustExist: true });
db.pragma('busy_timeout = 1000');

let failing = false;
function checkpoint(): void {
  try {
    // [busy, WAL frames, frames copied]; nothing to copy costs a read of the WAL index, no sync.
    const row = db.pragma('wal_checkpoint(PASSIVE)', { simple: false }) as { busy: number; log: number; checkpointed: number }[];
    const result = row[0];
    if (failing) port?.postMessage({ t: 'recovered' } satisfies CheckpointReport);
    failing = false;
    if (result && result.checkpointed > 0) port?.postMessage({ t: 'checkpointed', frames: result.checkpointed } satisfies CheckpointReport);
  } catch (err) {
    // A full or read-only disk: say it once, keep trying; the writer's own commits report the trouble to clients.
    if (!failing) port?.postMessage({ t: 'failed', message: err instanceof Error ? err.message : String(err) } satisfies CheckpointReport);
    failing = true;
  }
}

const timer = setInterval(checkpoint, intervalMs);
port.on('message', (message: unknown) => {
  if (message !== 'close') return;
  clearInterval(timer);
  checkpoint();
  db.close();
  port.postMessage({ t: 'closed' } satisfies CheckpointReport);
  port.close();
});
