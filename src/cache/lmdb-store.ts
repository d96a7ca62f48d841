import fs from 'node:fs';
import { open, type Database, type RootDatabase } from 'lmdb';

/**
 * The LMDB environment of the response cache: two named databases, both
 * holding raw bytes so that the cache decides the encoding and counts bytes
 * exactly.
 * - `entries`: key → JSON `{ storedAt, reply }` (see response-cache.ts).
 * - `meta`: key → 24 bytes: storedAt, accessedAt, bytes (three float64 LE),
 *   so that opening the store rebuilds its index without reading the replies.
 */
export interface LmdbStore {
  root: RootDatabase;
  entries: Database<Buffer, string>;
  meta: Database<Buffer, string>;
}

export const storeNames = { entries: 'entries', meta: 'meta' } as const;

export function openLmdbStore(dir: string): LmdbStore {
  fs.mkdirSync(dir, { recursive: true });
  // noSubdir: false always: lmdb would otherwise take a dir name with a dot
  // in it for a file name.
  const root = open({ path: dir, noSubdir: false, maxDbs: 4 });
  try {
    const entries = root.openDB<Buffer, string>({ name: storeNames.entries, encoding: 'binary' });
    const meta = root.openDB<Buffer, string>({ name: storeNames.meta, encoding: 'binary' });
    return { root, entries, meta };
  } catch (err) {
    void root.close();
    throw err;
  }
}
