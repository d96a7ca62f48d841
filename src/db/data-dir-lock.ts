import fs from 'node:fs';
import path from 'node:path';
import BetterSqlite3 from 'better-sqlite3';

/** The file in CHATWIRE_DATA_DIR whose exclusive lock says a process serves from the dir. */
export const LOCK_FILE_NAME = 'chatwire.lock';

export class DataDirInUseError extends Error {
  override name = 'DataDirInUseError';
}

export interface DataDirLock {
  /** Gives the dir up (closing the lock's connection drops the lock). Idempotent. */
  release(): void;
}

/**
 * Takes the data dir for this process, before anything in it is opened: a second server started on the same dir
 * (SQLite and LMDB would both let it in) would otherwise mark the first one's running tasks failed as "left
 * unfinished" and remove its cache's open marker before it noticed anything.
 *
 * The lock is the operating system's: a SQLite file held in EXCLUSIVE locking mode after one write, so its POSIX
 * lock stays until the connection closes or the process dies (SIGKILL, a crash, a power cut: nothing is left
 * behind to be judged stale). The kernel checks it for every process on the host, whatever its pid namespace
 * (two containers on one volume), and SQLite refuses a second connection within the same process too.
 * Creates the dir if it does not exist yet.
 */
export function lockDataDir(dataPath: string): DataDirLock {
  const file = path.join(dataPath, LOCK_FILE_NAME);
  const cannot = (err: unknown) => new Error(`cannot take the lock on ${file}: ${(err as Error).message} (is the data dir writable?)`, { cause: err });
  let db: BetterSqlite3.Database;
  try {
    fs.mkdirSync(dataPath, { recursive: true });
    // timeout 0: a lock held by another process is an answer now, not something to wait for.
    db = new BetterSqlite3(file, { timeout: 0 });
  } catch (err) {
    throw cannot(err);
  }
  try {
    db.pragma('locking_mode = EXCLUSIVE');
    db.exec('BEGIN EXCLUSIVE');
    // The write makes the connection keep its exclusive lock after COMMIT; the row is for a person looking.
    db.exec('CREATE TABLE IF NOT EXISTS holder (pid INTEGER NOT NULL, since TEXT NOT NULL)');
    db.exec('DELETE FROM holder');
    db.prepare('INSERT INTO holder (pid, since) VALUES (?, ?)').run(process.pid, new Date().toISOString());
    db.exec('COMMIT');
  } catch (err) {
    db.close();
    if ((err as { code?: string }).code === 'SQLITE_BUSY') {
      // SQLite reports a file system that refuses POSIX locks (some network mounts) as busy too.
      throw new DataDirInUseError(
        `the data dir ${dataPath} is in use by another chatwire process (it holds the lock on ${file}); stop it first, or give this one its own CHATWIRE_DATA_DIR (if no chatwire runs there, the file system does not support POSIX locks: use a local one)`,
      );
    }
    throw cannot(err);
  }
  // Held here as well as by the caller: better-sqlite3 closes a connection that is garbage-collected, and with it
  // the lock.
  held.add(db);
  return {
    release() {
      held.delete(db);
      if (db.open) db.close();
    },
  };
}

const held = new Set<BetterSqlite3.Database>();
