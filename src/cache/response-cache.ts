import fs from 'node:fs';
import { z } from 'zod';
import { FinishReasonSchema, UsageSchema } from '../protocol/index.js';
import { openLmdbStore, type LmdbStore } from './lmdb-store.js';
import { checkDataFileHeader, markClosed, markOpen, moveAside, verifyInChild, wasLeftOpen } from './store-recovery.js';

/** A stored reply. `chunks` keeps the chunk boundaries so that a hit streams as deltas like a miss. */
export const CachedReplySchema = z.object({
  chunks: z.array(z.string()),
  finishReason: FinishReasonSchema.exclude(['cancelled']),
  usage: UsageSchema,
  model: z.string(),
  createdAt: z.number(),
});
export type CachedReply = z.infer<typeof CachedReplySchema>;

/** The stored value: `storedAt` (the cache's clock at put) starts the TTL. */
const StoredEntrySchema = z.object({ storedAt: z.number(), reply: CachedReplySchema });

export interface CacheStats {
  entries: number;
  /** Logical bytes: key + stored value of every entry. LMDB's file adds page overhead on top. */
  bytes: number;
  hits: number;
  misses: number;
  /** Entries removed to keep under maxBytes (least recently used first). */
  evictions: number;
  /** Entries removed because their TTL ran out. */
  expired: number;
  /** Entries that could not be read or had the wrong shape, removed. */
  corrupt: number;
}

export interface ResponseCacheHooks {
  onEvict?(count: number, reason: 'size' | 'ttl'): void;
  /** The new byte total, after every change. */
  onBytes?(bytes: number): void;
}

export type CacheLog = (level: 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>) => void;

export interface ResponseCacheOptions {
  /** Directory of the LMDB environment, e.g. `<dataDir>/cache`. Created if missing. */
  path: string;
  ttlMs: number;
  maxBytes: number;
  now?: () => number;
  hooks?: ResponseCacheHooks;
  log?: CacheLog;
  /** How often access times of hit entries are written (batched). Default 1000. */
  accessFlushMs?: number;
  /** How often expired entries are swept out. Default 60000. */
  sweepIntervalMs?: number;
}

/**
 * The response cache. A Redis-backed one would implement the same shape.
 * Keys are cacheKey()/rawCacheKey() outputs.
 */
export interface ResponseCache {
  /** The reply, or undefined on a miss (absent, expired, or unreadable: the last two are removed). Never throws. */
  get(key: string): CachedReply | undefined;
  /** Stores (or replaces) a reply, evicting least recently used entries to stay under maxBytes. */
  put(key: string, reply: CachedReply): Promise<void>;
  delete(key: string): Promise<void>;
  /** Removes every expired entry now; returns how many. Also runs on a timer. */
  sweepExpired(): number;
  stats(): CacheStats;
  /** Writes pending access times, waits for every write, closes the store. Idempotent. */
  close(): Promise<void>;
}

interface IndexEntry {
  storedAt: number;
  accessedAt: number;
  bytes: number;
}

const META_BYTES = 24;
/** LMDB's key limit is 511 bytes in lmdb-js builds; our keys are 64 hex chars. */
const MAX_KEY_BYTES = 256;

/**
 * Opens (or creates) the cache at `options.path`. A store that cannot be
 * opened or read is moved aside to `<path>.corrupt` and the cache starts
 * empty; the reason goes to `log`.
 *
 * Recency: the LRU order lives in memory (a Map in access order: a hit moves
 * its key to the end, eviction takes from the front), rebuilt at open from the
 * access times in the `meta` database. A hit only marks its key dirty; dirty
 * access times are written in one batched async write every `accessFlushMs`
 * and at close. So a hit costs no disk write on its path, and a crash loses at
 * most that interval of recency, never an entry or the byte count (which is
 * written with the entry in one transaction).
 */
export function openResponseCache(options: ResponseCacheOptions): ResponseCache {
  const { path: dir, ttlMs, maxBytes } = options;
  if (!(ttlMs > 0)) throw new RangeError('ttlMs must be > 0');
  if (!(maxBytes > 0)) throw new RangeError('maxBytes must be > 0');
  const now = options.now ?? Date.now;
  const hooks = options.hooks ?? {};
  const log: CacheLog = options.log ?? (() => {});

  const { store, scan } = openCheckedStore(dir, log);
  const { root, entries, meta } = store;

  const index = new Map<string, IndexEntry>();
  /** Replies whose write is not committed yet: LMDB reads see only committed data. */
  const pending = new Map<string, CachedReply>();
  const dirty = new Set<string>();
  /** Keys that a batch not yet settled removes from the store, with how many such batches. */
  const removing = new Map<string, number>();
  let totalBytes = 0;
  let hits = 0;
  let misses = 0;
  let evictions = 0;
  let expired = 0;
  let corrupt = 0;
  let closed = false;
  let flushTimer: NodeJS.Timeout | undefined;
  /** Writes started outside put/delete (open repairs, sweeps, flushes): close waits for them. */
  const background = new Set<Promise<unknown>>();

  function track(p: Promise<unknown>): void {
    const tracked = p.then(
      () => {},
      (err: unknown) => {
        claimCommitError(root, err);
        log('error', 'response cache write failed', { err });
      },
    );
    background.add(tracked);
    void tracked.finally(() => background.delete(tracked));
  }

  function forget(key: string): IndexEntry | undefined {
    const entry = index.get(key);
    if (entry) {
      index.delete(key);
      totalBytes -= entry.bytes;
    }
    pending.delete(key);
    dirty.delete(key);
    return entry;
  }

  function removeOnDisk(keys: string[]): Promise<boolean> {
    return writing(
      keys,
      root.batch(() => {
        for (const key of keys) {
          inBatch(entries.remove(key));
          inBatch(meta.remove(key));
        }
      }),
      keys,
    );
  }

  /**
   * Follows a batch that removes `removed` and replaces or removes `touched`. Until it settles the removed keys
   * are counted in `removing`. If it fails, LMDB aborted its whole transaction: the store still holds what the
   * batch would have removed or replaced, so those entries are indexed again (see reindex).
   */
  function writing<T>(removed: readonly string[], batch: Promise<T>, touched: readonly string[]): Promise<T> {
    for (const key of removed) removing.set(key, (removing.get(key) ?? 0) + 1);
    const settled = () => {
      for (const key of removed) {
        const n = (removing.get(key) ?? 1) - 1;
        if (n > 0) removing.set(key, n);
        else removing.delete(key);
      }
    };
    return batch.then(
      (result) => {
        settled();
        return result;
      },
      (err: unknown) => {
        settled();
        claimCommitError(root, err);
        reindex(touched);
        throw err;
      },
    );
  }

  /**
   * Indexes again the entries of `keys` that the store holds and the index lacks, after a write that was to
   * remove or replace them failed: the index and byte count then match the store, and the entries are served
   * again. A key indexed since (a later put) or with another removal on its way is left to that write. They go
   * back at the least recently used end, where eviction took them from; the total may pass the bound until
   * the next put evicts (the store holds that much: the removal failed).
   */
  function reindex(keys: readonly string[]): void {
    if (closed) return;
    const back: [string, IndexEntry][] = [];
    for (const key of new Set(keys)) {
      if (index.has(key) || removing.has(key)) continue;
      const entry = storedIndexEntry(key);
      if (entry) back.push([key, entry]);
    }
    if (back.length === 0) return;
    back.sort((a, b) => a[1].accessedAt - b[1].accessedAt);
    const rest = [...index];
    index.clear();
    for (const [key, entry] of back) {
      index.set(key, entry);
      totalBytes += entry.bytes;
    }
    for (const [key, entry] of rest) index.set(key, entry);
    log('warn', 'response cache: a write failed; its entries are still in the store and indexed again', { count: back.length });
    bytesChanged();
  }

  /** The index entry of `key` as the store has it committed, or undefined when it holds no readable entry. */
  function storedIndexEntry(key: string): IndexEntry | undefined {
    try {
      const raw = entries.getBinary(key);
      if (raw === undefined) return undefined;
      const recorded = meta.getBinary(key);
      const entry = recorded === undefined ? undefined : decodeMeta(recorded);
      if (entry) return entry;
      const stored = decode(raw);
      return stored && { storedAt: stored.storedAt, accessedAt: stored.storedAt, bytes: keyBytes(key) + raw.length };
    } catch {
      // Unreadable now: the scan at the next open deals with it.
      return undefined;
    }
  }

  function isExpired(entry: IndexEntry, at: number): boolean {
    return at - entry.storedAt >= ttlMs;
  }

  function bytesChanged(): void {
    hooks.onBytes?.(totalBytes);
  }

  function miss(): undefined {
    misses += 1;
    return undefined;
  }

  function scheduleFlush(): void {
    if (flushTimer !== undefined || closed) return;
    flushTimer = setTimeout(flushAccessTimes, options.accessFlushMs ?? 1000);
    flushTimer.unref();
  }

  function flushAccessTimes(): void {
    flushTimer = undefined;
    if (dirty.size === 0) return;
    const keys = [...dirty];
    dirty.clear();
    track(
      root.batch(() => {
        for (const key of keys) {
          const entry = index.get(key);
          if (entry) inBatch(meta.put(key, encodeMeta(entry)));
        }
      }),
    );
  }

  function sweepExpired(): number {
    if (closed) return 0;
    const at = now();
    const gone: string[] = [];
    for (const [key, entry] of index) if (isExpired(entry, at)) gone.push(key);
    if (gone.length === 0) return 0;
    for (const key of gone) forget(key);
    expired += gone.length;
    track(removeOnDisk(gone));
    hooks.onEvict?.(gone.length, 'ttl');
    bytesChanged();
    return gone.length;
  }

  /** Evicts from the LRU end until `incoming` more bytes fit. Returns the evicted keys. */
  function evictFor(incoming: number): string[] {
    const gone: string[] = [];
    for (const key of index.keys()) {
      if (totalBytes + incoming <= maxBytes) break;
      // Deleting the current key while iterating a Map is safe.
      forget(key);
      gone.push(key);
    }
    if (gone.length > 0) {
      evictions += gone.length;
      hooks.onEvict?.(gone.length, 'size');
    }
    return gone;
  }

  // Apply the scan of the store made at open: index in recency order, and
  // repairs (see scanStore) written in one batch.
  {
    for (const [key, entry] of scan.found) {
      index.set(key, entry);
      totalBytes += entry.bytes;
    }
    if (scan.unreadable.length > 0) {
      corrupt += scan.unreadable.length;
      log('warn', 'response cache: removed unreadable entries at open', { count: scan.unreadable.length });
    }
    if (scan.staleMeta.length > 0 || scan.unreadable.length > 0 || scan.repaired.length > 0) {
      track(
        root.batch(() => {
          for (const key of scan.staleMeta) inBatch(meta.remove(key));
          for (const key of scan.unreadable) {
            inBatch(entries.remove(key));
            inBatch(meta.remove(key));
          }
          for (const [key, entry] of scan.repaired) inBatch(meta.put(key, encodeMeta(entry)));
        }),
      );
    }
    sweepExpired();
    // maxBytes may have been lowered since the last run.
    const over = evictFor(0);
    if (over.length > 0) track(removeOnDisk(over));
    bytesChanged();
  }

  const sweepTimer = setInterval(sweepExpired, options.sweepIntervalMs ?? 60_000);
  sweepTimer.unref();

  return {
    get(key) {
      if (closed) return miss();
      const entry = index.get(key);
      if (!entry) return miss();
      const at = now();
      if (isExpired(entry, at)) {
        forget(key);
        expired += 1;
        track(removeOnDisk([key]));
        hooks.onEvict?.(1, 'ttl');
        bytesChanged();
        return miss();
      }
      let reply = pending.get(key);
      if (!reply) {
        let raw: Buffer | undefined;
        let failure: unknown;
        try {
          raw = entries.getBinary(key);
        } catch (err) {
          failure = err;
        }
        const stored = raw ? decode(raw) : undefined;
        if (!stored) {
          // Absent on disk (the index was ahead of it) or unreadable: either
          // way not servable. Remove it so the next request recomputes it.
          forget(key);
          if (raw !== undefined || failure !== undefined) {
            corrupt += 1;
            log('warn', 'response cache: removed an unreadable entry', { key, err: failure });
          }
          track(removeOnDisk([key]));
          bytesChanged();
          return miss();
        }
        reply = stored.reply;
      }
      entry.accessedAt = at;
      index.delete(key);
      index.set(key, entry);
      dirty.add(key);
      scheduleFlush();
      hits += 1;
      return reply;
    },

    async put(key, reply) {
      if (closed) throw new Error('response cache is closed');
      if (keyBytes(key) === 0 || keyBytes(key) > MAX_KEY_BYTES) throw new RangeError(`cache key must be 1..${MAX_KEY_BYTES} bytes`);
      const valid = CachedReplySchema.parse(reply);
      const storedAt = now();
      const value = Buffer.from(JSON.stringify({ storedAt, reply: valid }), 'utf8');
      const bytes = keyBytes(key) + value.length;
      if (bytes > maxBytes) {
        log('warn', 'response cache: reply larger than the whole cache, not stored', { key, bytes, maxBytes });
        // The reply it was to replace (a refresh) is out of date: it goes too.
        if (forget(key)) bytesChanged();
        await removeOnDisk([key]);
        return;
      }
      forget(key);
      // Evict before inserting, so the total never passes maxBytes.
      const evicted = evictFor(bytes);
      const entry: IndexEntry = { storedAt, accessedAt: storedAt, bytes };
      index.set(key, entry);
      totalBytes += bytes;
      pending.set(key, valid);
      bytesChanged();
      const batch = root.batch(() => {
        for (const gone of evicted) {
          inBatch(entries.remove(gone));
          inBatch(meta.remove(gone));
        }
        inBatch(entries.put(key, value));
        inBatch(meta.put(key, encodeMeta(entry)));
      });
      try {
        await writing(
          evicted,
          batch.catch((err: unknown) => {
            // Not on disk: drop it from the index too (unless a later put replaced it), before the reply it
            // replaced and the evicted entries, all still in the store, are indexed again.
            if (index.get(key) === entry) {
              forget(key);
              bytesChanged();
            }
            throw err;
          }),
          [key, ...evicted],
        );
      } finally {
        if (pending.get(key) === valid) pending.delete(key);
      }
    },

    async delete(key) {
      if (closed) throw new Error('response cache is closed');
      if (forget(key)) bytesChanged();
      await removeOnDisk([key]);
    },

    sweepExpired,

    stats() {
      return { entries: index.size, bytes: totalBytes, hits, misses, evictions, expired, corrupt };
    },

    async close() {
      if (closed) return;
      clearInterval(sweepTimer);
      if (flushTimer !== undefined) clearTimeout(flushTimer);
      flushAccessTimes();
      closed = true;
      await Promise.all(background);
      try {
        await root.committed;
      } catch {
        // The last write failed (disk full, an I/O error; logged then). LMDB rolled it back, but its environment
        // never finishes closing after a failed commit (close() does not settle), and a shutdown must not hang:
        // it is left to the process's exit, and the open marker stays, so the next open checks the store first.
        log('warn', 'response cache: closed after a failed write; the store is checked at the next open');
        return;
      }
      await root.close();
      markClosed(dir);
    },
  };
}

interface StoreScan {
  /** Every readable entry, least recently used first. */
  found: [string, IndexEntry][];
  /** Entries whose meta record was missing or damaged, recomputed from the entry. */
  repaired: [string, IndexEntry][];
  /** Entries that are not JSON of the right shape. */
  unreadable: string[];
  /** Meta records without an entry, or that are not meta records. */
  staleMeta: string[];
}

/**
 * Reads the index from `meta`; an entry without a usable meta record is read
 * once to recompute it. Reads only: the caller writes the repairs.
 */
function scanStore({ entries, meta }: LmdbStore): StoreScan {
  const recorded = new Map<string, IndexEntry>();
  const staleMeta: string[] = [];
  for (const { key, value } of meta.getRange({})) {
    const entry = typeof key === 'string' ? decodeMeta(value) : undefined;
    if (entry) recorded.set(key, entry);
    else staleMeta.push(key);
  }
  const found: [string, IndexEntry][] = [];
  const repaired: [string, IndexEntry][] = [];
  const unreadable: string[] = [];
  for (const key of entries.getKeys({})) {
    const known = typeof key === 'string' ? recorded.get(key) : undefined;
    if (known) {
      recorded.delete(key);
      found.push([key, known]);
      continue;
    }
    const raw = typeof key === 'string' ? entries.getBinary(key) : undefined;
    const stored = raw ? decode(raw) : undefined;
    if (!raw || !stored) {
      unreadable.push(key);
      continue;
    }
    const entry = { storedAt: stored.storedAt, accessedAt: stored.storedAt, bytes: keyBytes(key) + raw.length };
    found.push([key, entry]);
    repaired.push([key, entry]);
  }
  staleMeta.push(...recorded.keys());
  found.sort((a, b) => a[1].accessedAt - b[1].accessedAt);
  return { found, repaired, unreadable, staleMeta };
}

/**
 * Opens and scans the store after checking it is safe to map (see
 * store-recovery.ts). A damaged one, or one LMDB refuses to open or read, is
 * moved aside and a fresh one created.
 */
function openCheckedStore(dir: string, log: CacheLog): { store: LmdbStore; scan: StoreScan } {
  const reason = unsafeReason(dir, log) ?? tryOpen(dir);
  if (typeof reason !== 'string') {
    markOpen(dir);
    return reason;
  }
  const aside = fs.existsSync(dir) ? moveAside(dir) : undefined;
  log('error', 'response cache store unreadable; starting empty', { path: dir, reason, movedTo: aside });
  const store = openLmdbStore(dir);
  markOpen(dir);
  return { store, scan: { found: [], repaired: [], unreadable: [], staleMeta: [] } };
}

/** Why the store must not be mapped in this process, or undefined when it is safe. */
function unsafeReason(dir: string, log: CacheLog): string | undefined {
  const header = checkDataFileHeader(dir);
  if (!header.ok) return header.reason;
  if (!wasLeftOpen(dir)) return undefined;
  log('info', 'response cache was not closed cleanly; verifying it', { path: dir });
  const verified = verifyInChild(dir);
  return verified.ok ? undefined : verified.reason;
}

/** The opened and scanned store, or why LMDB refused it. */
function tryOpen(dir: string): { store: LmdbStore; scan: StoreScan } | string {
  let store: LmdbStore | undefined;
  try {
    store = openLmdbStore(dir);
    return { store, scan: scanStore(store) };
  } catch (err) {
    // Only reads happened, so close() completes at once.
    void store?.root.close();
    return (err as Error).message;
  }
}

/**
 * A write inside root.batch(): lmdb-js gives it a promise of its own, rejected like the batch's when the
 * transaction fails. The batch's promise is the one that reports it; unhandled, this one would end the process.
 */
function inBatch(write: Promise<unknown>): void {
  write.catch(() => {});
}

/**
 * lmdb-js rejects every write of a failed transaction with `Commit failed`, and also two promises that nobody
 * else awaits: `commitError` (the cause: ENOSPC, EFBIG, ...) and the transaction's own commit promise, which
 * `root.committed` forwards to while it is current. Unhandled, either would end the process. The failure is
 * the caller's to report; this only marks them as seen. Called where the failure is handled, in the same
 * turn as the rejection, before Node looks for unhandled ones.
 */
function claimCommitError(root: LmdbStore['root'], err: unknown): void {
  const cause = (err as { commitError?: unknown } | null)?.commitError;
  if (cause instanceof Promise) cause.catch(() => {});
  root.committed.then(undefined, () => {});
}

function decode(raw: Buffer): z.infer<typeof StoredEntrySchema> | undefined {
  let json: unknown;
  try {
    json = JSON.parse(raw.toString('utf8'));
  } catch {
    return undefined;
  }
  const parsed = StoredEntrySchema.safeParse(json);
  return parsed.success ? parsed.data : undefined;
}

function keyBytes(key: string): number {
  return Buffer.byteLength(key, 'utf8');
}

function encodeMeta(entry: IndexEntry): Buffer {
  const buf = Buffer.alloc(META_BYTES);
  buf.writeDoubleLE(entry.storedAt, 0);
  buf.writeDoubleLE(entry.accessedAt, 8);
  buf.writeDoubleLE(entry.bytes, 16);
  return buf;
}

function decodeMeta(buf: Buffer): IndexEntry | undefined {
  if (buf.length !== META_BYTES) return undefined;
  const entry = { storedAt: buf.readDoubleLE(0), accessedAt: buf.readDoubleLE(8), bytes: buf.readDoubleLE(16) };
  if (!Number.isFinite(entry.storedAt) || !Number.isFinite(entry.accessedAt)) return undefined;
  if (!Number.isInteger(entry.bytes) || entry.bytes <= 0) return undefined;
  return entry;
}
