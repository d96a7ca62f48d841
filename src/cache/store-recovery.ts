import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Why this file exists: lmdb's native code does not fail cleanly on a damaged
 * data file. A data.mdb of garbage, a torn meta page or a truncated file makes
 * `open` or the first read die with SIGSEGV or SIGBUS (checked with lmdb 3.5),
 * which no try/catch can turn into an error. So the store is checked before
 * this process maps it: always the cheap header check below, and after an
 * unclean shutdown a full read in a child process, whose crash costs nothing.
 */

const DATA_FILE = 'data.mdb';
/** Present while a process has the store open; left behind by a crash. */
const OPEN_MARKER = 'chatwire-open';
const LMDB_MAGIC = 0xbeefc0de;
const META_FLAG = 0x08;

export type StoreCheck = { ok: true } | { ok: false; reason: string };

/**
 * Checks that data.mdb, if present and not empty, starts with two LMDB meta
 * pages (magic number and meta flag in each). No file or an empty one is a
 * fresh store.
 */
export function checkDataFileHeader(dir: string): StoreCheck {
  const file = path.join(dir, DATA_FILE);
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { ok: true };
    return { ok: false, reason: `cannot read ${DATA_FILE}: ${(err as Error).message}` };
  }
  try {
    const size = fs.fstatSync(fd).size;
    if (size === 0) return { ok: true };
    const first = readAt(fd, 0, 64);
    const layout = metaLayout(first);
    if (!layout) return { ok: false, reason: `${DATA_FILE} has no LMDB meta page at offset 0` };
    const pageSize = first.readUInt32LE(layout.pageSizeOffset);
    if (pageSize < 512 || pageSize > 65536 || (pageSize & (pageSize - 1)) !== 0) {
      return { ok: false, reason: `${DATA_FILE} names an impossible page size ${pageSize}` };
    }
    if (size < 2 * pageSize) return { ok: false, reason: `${DATA_FILE} is shorter than its two meta pages` };
    if (!metaLayout(readAt(fd, pageSize, 64))) return { ok: false, reason: `${DATA_FILE} has no LMDB meta page at offset ${pageSize}` };
    return { ok: true };
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Where the meta record starts. Upstream LMDB's page header is 16 bytes,
 * lmdb-js's fork adds a txnid and uses 24; the meta record starts with the
 * magic, and the free-list DB record 24 bytes in holds the page size.
 */
function metaLayout(page: Buffer): { pageSizeOffset: number } | undefined {
  for (const header of [24, 16]) {
    const flags = page.readUInt16LE(header - 6);
    if (page.readUInt32LE(header) === LMDB_MAGIC && (flags & META_FLAG) !== 0) return { pageSizeOffset: header + 24 };
  }
  return undefined;
}

function readAt(fd: number, position: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  fs.readSync(fd, buf, 0, length, position);
  return buf;
}

/** True when the last process that opened the store did not close it. */
export function wasLeftOpen(dir: string): boolean {
  return fs.existsSync(path.join(dir, OPEN_MARKER));
}

/** Written durably (file and directory entry synced): a power loss must not lose it. */
export function markOpen(dir: string): void {
  const fd = fs.openSync(path.join(dir, OPEN_MARKER), 'w');
  try {
    fs.writeSync(fd, `${process.pid}\n`);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  if (process.platform === 'win32') return; // directories cannot be opened for fsync there
  const dirFd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(dirFd);
  } finally {
    fs.closeSync(dirFd);
  }
}

export function markClosed(dir: string): void {
  fs.rmSync(path.join(dir, OPEN_MARKER), { force: true });
}

/**
 * Opens the store and reads every record in a child process
 * (verify-store.ts). A crash or error there means this process must not map
 * the files. The timeout is generous: a 217 MB store (50,000 entries) took
 * 0.5 s here.
 */
export function verifyInChild(dir: string, timeoutMs = 60_000): StoreCheck {
  const script = fileURLToPath(new URL('./verify-store.js', import.meta.url));
  // A missing verifier is a broken install, not a broken store: failing here
  // keeps it from being read as damage and wiping the cache on every start.
  if (!fs.existsSync(script)) throw new Error(`cache store verifier missing: ${script}`);
  const result = spawnSync(process.execPath, [script, dir], { encoding: 'utf8', timeout: timeoutMs, stdio: ['ignore', 'ignore', 'pipe'] });
  if (result.error) return { ok: false, reason: `verification did not run: ${result.error.message}` };
  if (result.signal) return { ok: false, reason: `reading the store crashed the verifier (${result.signal})` };
  if (result.status !== 0) {
    const lastLine = result.stderr.trim().split('\n').pop() ?? '';
    return { ok: false, reason: `reading the store failed (exit ${result.status}): ${lastLine}` };
  }
  return { ok: true };
}

/**
 * Moves a damaged store to `<dir>.corrupt` (replacing an older one, so at most
 * one copy is kept for inspection) and leaves `dir` absent.
 */
export function moveAside(dir: string): string {
  const aside = `${dir}.corrupt`;
  fs.rmSync(aside, { recursive: true, force: true });
  fs.renameSync(dir, aside);
  return aside;
}
