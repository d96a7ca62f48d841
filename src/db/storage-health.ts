import fs from 'node:fs';
import path from 'node:path';
import type { Database } from './database.js';

/** The probe file /readyz writes in the data dir; never read, removed at once. */
export const PROBE_FILE = '.chatwire-ready-probe';

// One page: a full file system refuses it even when the last partial page of some file still has room.
const PROBE = Buffer.alloc(4096, 0x2e);

/**
 * Readiness of the data dir for writes: creates, writes, fsyncs and removes a
 * small file in it, as every commit needs to. Throws an Error naming the cause
 * (ENOSPC: disk full; EROFS/EACCES/EPERM: not writable; EIO) when it cannot.
 * SQLite can still fail later (the probe is not the commit); what it cannot do
 * is report ready while the disk refuses every write.
 */
export function probeDataDir(dir: string): void {
  const file = path.join(dir, PROBE_FILE);
  let fd: number | undefined;
  try {
    fd = fs.openSync(file, 'w');
    fs.writeSync(fd, PROBE);
    fs.fsyncSync(fd);
  } catch (err) {
    throw new Error(`the data dir cannot take writes: ${describeStorageError(err) ?? (err as Error).message}`);
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
    try {
      fs.rmSync(file, { force: true });
    } catch {
      // A dir that refused the write may refuse the unlink too; the next probe overwrites the file.
    }
  }
}

// A database across the network (PostgreSQL in cluster mode) that cannot be reached, or whose connection failed:
// the system's errors and the `postgres` package's own.
const CONNECTION_CAUSES: Record<string, string> = {
  ECONNREFUSED: 'database unreachable (ECONNREFUSED)',
  ECONNRESET: 'database connection reset (ECONNRESET)',
  ECONNABORTED: 'database connection aborted (ECONNABORTED)',
  ETIMEDOUT: 'database unreachable (ETIMEDOUT)',
  EHOSTUNREACH: 'database unreachable (EHOSTUNREACH)',
  ENETUNREACH: 'database unreachable (ENETUNREACH)',
  ENOTFOUND: 'database host not found (ENOTFOUND)',
  EPIPE: 'database connection broken (EPIPE)',
  CONNECTION_CLOSED: 'database connection closed',
  CONNECTION_DESTROYED: 'database connection destroyed',
  CONNECTION_ENDED: 'database connection ended',
  CONNECT_TIMEOUT: 'database unreachable (connect timeout)',
};

const ERRNO_CAUSES: Record<string, string> = {
  ENOSPC: 'disk full (ENOSPC)',
  EDQUOT: 'disk quota exceeded (EDQUOT)',
  EROFS: 'read-only file system (EROFS)',
  EACCES: 'permission denied (EACCES)',
  EPERM: 'operation not permitted (EPERM)',
  EIO: 'I/O error (EIO)',
  ...CONNECTION_CAUSES,
};

// PostgreSQL SQLSTATEs whose cause is the server's state, not the statement: connection exceptions (class 08),
// insufficient resources (53), the server shutting down or starting (57P01-57P03), a read-only replica (25006).
const PG_CAUSES: [prefix: string, cause: string][] = [
  ['08', 'database connection failed'],
  ['53', 'database out of resources'],
  ['57P0', 'database shutting down or starting'],
  ['25006', 'database read-only'],
];

// SQLite result codes (better-sqlite3's SqliteError.code) whose cause is the storage, not the statement.
const SQLITE_CAUSES: [prefix: string, cause: string][] = [
  ['SQLITE_FULL', 'disk full (SQLITE_FULL)'],
  ['SQLITE_READONLY', 'database not writable (SQLITE_READONLY)'],
  ['SQLITE_IOERR', 'I/O error'],
  ['SQLITE_CANTOPEN', 'database file cannot be opened (SQLITE_CANTOPEN)'],
  ['SQLITE_BUSY', 'database busy (SQLITE_BUSY)'],
];

/**
 * When `err` says the storage cannot take writes now (full, read-only, I/O
 * error), a short description of why; undefined for any other error (a bug or
 * a constraint), which must not be reported as a storage problem.
 */
export function describeStorageError(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code !== 'string') return undefined;
  if (code in ERRNO_CAUSES) return ERRNO_CAUSES[code];
  if (/^[0-9A-Z]{5}$/.test(code)) {
    for (const [prefix, cause] of PG_CAUSES) if (code.startsWith(prefix)) return `${cause} (${code})`;
    return undefined;
  }
  for (const [prefix, cause] of SQLITE_CAUSES) {
    if (code === prefix || code.startsWith(`${prefix}_`)) return cause === 'I/O error' ? `I/O error (${code})` : cause;
  }
  return undefined;
}

/**
 * True when `err` says a database connection itself failed (reset, closed, unreachable, or PostgreSQL's connection
 * exceptions, class 08, and shutdown, 57P0x), not a statement on it.
 */
export function isConnectionLoss(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code !== 'string') return false;
  return code in CONNECTION_CAUSES || code.startsWith('08') || code.startsWith('57P0');
}

/**
 * /readyz for storage: the database answers a query, and the data dir takes a write (SELECT 1 answers on a full or
 * read-only disk; the probe fails then, so /readyz says 503 before chats fail).
 */
export function storageReadiness(db: Database, dataDir: string): { name: string; check(): void }[] {
  return [
    { name: 'sqlite', check: () => void db.raw.prepare('SELECT 1').get() },
    { name: 'disk', check: () => probeDataDir(dataDir) },
  ];
}
