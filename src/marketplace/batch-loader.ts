/**
 * A DataLoader-style batcher: keys asked for during one turn of the event loop
 * are collected, deduplicated, and handed to one call of the batch function.
 *
 * The flush runs on setImmediate, not on a microtask: Node drains microtasks
 * after every I/O callback, so a microtask flush would fire once per socket
 * message, while setImmediate runs after the whole poll phase and so merges
 * the lookups of every connection whose frame arrived in the same turn.
 */

/** One result per key, in the order of `keys`; an Error fails only its own key. */
export type BatchFunction<K, V> = (keys: readonly K[]) => ReadonlyArray<V | Error> | Promise<ReadonlyArray<V | Error>>;

export interface BatchLoaderOptions<K, V> {
  batch: BatchFunction<K, V>;
  /** Identity of a key for deduplication (compared with SameValueZero); default the key itself. */
  keyOf?: (key: K) => unknown;
  /** false: every load/loadMany call runs the batch function at once with its own keys only. Default true. */
  batching?: boolean;
  /** Most keys in one batch call; a bigger batch is split into several calls. Default unbounded. */
  maxBatchSize?: number;
}

export interface BatchLoader<K, V> {
  load(key: K): Promise<V>;
  /** All the values, in key order; rejects with the first failing key's error. */
  loadMany(keys: readonly K[]): Promise<V[]>;
  /** Rejects what is still queued and refuses new loads. */
  close(): void;
}

interface Waiter<V> {
  resolve(value: V): void;
  reject(err: unknown): void;
}

interface Entry<K, V> {
  key: K;
  waiters: Waiter<V>[];
}

export class BatchLoaderClosedError extends Error {
  override name = 'BatchLoaderClosedError';
}

export function createBatchLoader<K, V>(options: BatchLoaderOptions<K, V>): BatchLoader<K, V> {
  const keyOf = options.keyOf ?? ((key: K) => key);
  const batching = options.batching ?? true;
  const maxBatchSize = options.maxBatchSize ?? Infinity;
  if (!(maxBatchSize >= 1)) throw new RangeError(`maxBatchSize must be at least 1, got ${maxBatchSize}`);

  let queue = new Map<unknown, Entry<K, V>>();
  let scheduled: NodeJS.Immediate | null = null;
  let closed = false;

  function enqueue(key: K): Promise<V> {
    return new Promise<V>((resolve, reject) => {
      const id = keyOf(key);
      const entry = queue.get(id);
      if (entry) entry.waiters.push({ resolve, reject });
      else queue.set(id, { key, waiters: [{ resolve, reject }] });
      scheduled ??= setImmediate(flush);
    });
  }

  function flush(): void {
    scheduled = null;
    const entries = [...queue.values()];
    queue = new Map();
    dispatch(entries);
  }

  function dispatch(entries: Entry<K, V>[]): void {
    for (let start = 0; start < entries.length; start += maxBatchSize) {
      void run(entries.slice(start, start + maxBatchSize));
    }
  }

  async function run(entries: Entry<K, V>[]): Promise<void> {
    let results: ReadonlyArray<V | Error>;
    try {
      results = await options.batch(entries.map((e) => e.key));
      if (!Array.isArray(results) || results.length !== entries.length) {
        throw new TypeError(`batch function returned ${Array.isArray(results) ? results.length : typeof results} results for ${entries.length} keys`);
      }
    } catch (err) {
      for (const entry of entries) for (const w of entry.waiters) w.reject(err);
      return;
    }
    entries.forEach((entry, i) => {
      const result = results[i] as V | Error;
      for (const w of entry.waiters) {
        if (result instanceof Error) w.reject(result);
        else w.resolve(result);
      }
    });
  }

  /** Batching off: the caller's own keys, deduplicated, in one direct batch call. */
  function direct(keys: readonly K[]): Promise<V>[] {
    const entries = new Map<unknown, Entry<K, V>>();
    const promises = keys.map(
      (key) =>
        new Promise<V>((resolve, reject) => {
          const id = keyOf(key);
          const entry = entries.get(id);
          if (entry) entry.waiters.push({ resolve, reject });
          else entries.set(id, { key, waiters: [{ resolve, reject }] });
        }),
    );
    dispatch([...entries.values()]);
    return promises;
  }

  function loadAll(keys: readonly K[]): Promise<V>[] {
    if (closed) return keys.map(() => Promise.reject(new BatchLoaderClosedError('batch loader is closed')));
    return batching ? keys.map(enqueue) : direct(keys);
  }

  return {
    load(key) {
      return loadAll([key])[0] as Promise<V>;
    },
    loadMany(keys) {
      return Promise.all(loadAll(keys));
    },
    close() {
      closed = true;
      if (scheduled) clearImmediate(scheduled);
      scheduled = null;
      const pending = [...queue.values()];
      queue = new Map();
      const err = new BatchLoaderClosedError('batch loader closed before the batch ran');
      for (const entry of pending) for (const w of entry.waiters) w.reject(err);
    },
  };
}
