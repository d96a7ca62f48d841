import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { openLmdbStore } from '../../src/cache/lmdb-store.js';
import { openResponseCache, type CachedReply, type CacheLog, type ResponseCacheOptions } from '../../src/cache/response-cache.js';

const HOUR = 3_600_000;

const tempDirs: string[] = [];
after(() => {
  for (const dir of tempDirs) fs.rmSync(dir, { recursive: true, force: true });
});

function tempDir(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'chatwire-cache-'));
  tempDirs.push(dir);
  return dir;
}

function reply(text: string, createdAt = 1_000_000): CachedReply {
  return {
    chunks: [text.slice(0, 3), text.slice(3)],
    finishReason: 'stop',
    usage: { promptTokens: 7, completionTokens: 2 },
    model: 'dev-1',
    createdAt,
  };
}

/** A settable clock and a cache on it. */
function openWithClock(dir: string, extra: Partial<ResponseCacheOptions> = {}) {
  const clock = { t: 1_000_000 };
  const cache = openResponseCache({ path: path.join(dir, 'cache'), ttlMs: HOUR, maxBytes: 1024 * 1024, now: () => clock.t, ...extra });
  return { clock, cache };
}

/** Reads every key stored on disk, through a raw handle, sorted. The cache must be closed. */
async function keysOnDisk(dir: string): Promise<{ entries: string[]; meta: string[] }> {
  const store = openLmdbStore(path.join(dir, 'cache'));
  try {
    return { entries: [...store.entries.getKeys({})].sort(), meta: [...store.meta.getKeys({})].sort() };
  } finally {
    await store.root.close();
  }
}

function collectLog(): { log: CacheLog; lines: { level: string; msg: string }[] } {
  const lines: { level: string; msg: string }[] = [];
  return { lines, log: (level, msg) => lines.push({ level, msg }) };
}

test('a stored reply is served back with byte-identical chunks; an unknown key is a miss', async () => {
  const dir = tempDir();
  const { cache } = openWithClock(dir);
  try {
    const stored: CachedReply = {
      chunks: ['Hel', 'lo, ', 'wörld \u{1F44B}\u{1F3FD}', '\r\n\t', '', 'caf\u0065\u0301 "quoted" \\ \u0000 end'],
      finishReason: 'length',
      usage: { promptTokens: 12, completionTokens: 6 },
      model: 'dev-1',
      createdAt: 123_456,
    };
    assert.equal(cache.get('k1'), undefined);
    await cache.put('k1', stored);
    assert.deepEqual(cache.get('k1'), stored);
    assert.deepEqual(cache.stats(), { entries: 1, bytes: cache.stats().bytes, hits: 1, misses: 1, evictions: 0, expired: 0, corrupt: 0 });
  } finally {
    await cache.close();
  }
});

test('a reply is served while its write is still being committed', async () => {
  const dir = tempDir();
  const { cache } = openWithClock(dir);
  try {
    const write = cache.put('k1', reply('hello'));
    assert.deepEqual(cache.get('k1'), reply('hello'));
    await write;
    assert.deepEqual(cache.get('k1'), reply('hello'));
    assert.equal(cache.stats().hits, 2);
  } finally {
    await cache.close();
  }
});

test('an entry past its TTL is a miss and is removed, also from disk', async () => {
  const dir = tempDir();
  const { clock, cache } = openWithClock(dir);
  await cache.put('k1', reply('hello'));
  clock.t += HOUR - 1;
  assert.deepEqual(cache.get('k1'), reply('hello'));
  clock.t += 1;
  assert.equal(cache.get('k1'), undefined);
  assert.deepEqual(cache.stats(), { entries: 0, bytes: 0, hits: 1, misses: 1, evictions: 0, expired: 1, corrupt: 0 });
  await cache.close();
  assert.deepEqual(await keysOnDisk(dir), { entries: [], meta: [] });
});

test('the TTL runs from when the reply was stored, and a hit does not extend it', async () => {
  const dir = tempDir();
  const { clock, cache } = openWithClock(dir);
  try {
    await cache.put('k1', reply('hello', 0));
    clock.t += HOUR / 2;
    assert.ok(cache.get('k1'));
    clock.t += HOUR / 2;
    assert.equal(cache.get('k1'), undefined);
  } finally {
    await cache.close();
  }
});

test('the sweep removes expired entries that nobody asks for', async () => {
  const dir = tempDir();
  const evicted: [number, string][] = [];
  const { clock, cache } = openWithClock(dir, { hooks: { onEvict: (count, reason) => evicted.push([count, reason]) } });
  await cache.put('old1', reply('one'));
  await cache.put('old2', reply('two'));
  clock.t += HOUR / 2;
  await cache.put('new', reply('three'));
  clock.t += HOUR / 2;
  assert.equal(cache.sweepExpired(), 2);
  assert.equal(cache.stats().entries, 1);
  assert.deepEqual(evicted, [[2, 'ttl']]);
  await cache.close();
  assert.deepEqual(await keysOnDisk(dir), { entries: ['new'], meta: ['new'] });
});

test('past the byte bound the least recently used entries are evicted, honouring gets', async () => {
  const dir = tempDir();
  // Measure one entry: every reply below has the same size (same clock, same text length).
  const probe = openWithClock(tempDir());
  await probe.cache.put('a', reply('reply-a'));
  const size = probe.cache.stats().bytes;
  await probe.cache.close();

  const totals: number[] = [];
  const maxBytes = 3 * size + size - 1; // room for three entries, not four
  const { clock, cache } = openWithClock(dir, { maxBytes, hooks: { onBytes: (b) => totals.push(b) } });
  await cache.put('a', reply('reply-a'));
  clock.t += 1;
  await cache.put('b', reply('reply-b'));
  clock.t += 1;
  await cache.put('c', reply('reply-c'));
  clock.t += 1;
  assert.ok(cache.get('a')); // a is now the most recently used; b is the least
  clock.t += 1;
  await cache.put('d', reply('reply-d'));
  assert.equal(cache.get('b'), undefined);
  assert.deepEqual(cache.stats(), { entries: 3, bytes: 3 * size, hits: 1, misses: 1, evictions: 1, expired: 0, corrupt: 0 });
  clock.t += 1;
  assert.ok(cache.get('c')); // order now, least recent first: a, d, c
  clock.t += 1;
  await cache.put('e', reply('reply-e'));
  await cache.put('f', reply('reply-f'));
  assert.equal(cache.stats().evictions, 3);
  assert.ok(
    totals.every((b) => b <= maxBytes),
    `a total passed the bound: ${totals.join(',')}`,
  );
  await cache.close();
  assert.deepEqual(await keysOnDisk(dir), { entries: ['c', 'e', 'f'], meta: ['c', 'e', 'f'] });
});

test('the recency order survives a restart', async () => {
  const dir = tempDir();
  const probe = openWithClock(tempDir());
  await probe.cache.put('a', reply('reply-a'));
  const size = probe.cache.stats().bytes;
  await probe.cache.close();

  const maxBytes = 3 * size;
  const first = openWithClock(dir, { maxBytes });
  await first.cache.put('a', reply('reply-a'));
  first.clock.t += 1;
  await first.cache.put('b', reply('reply-b'));
  first.clock.t += 1;
  await first.cache.put('c', reply('reply-c'));
  first.clock.t += 1;
  assert.ok(first.cache.get('a')); // least recent first: b, c, a
  first.clock.t += 1;
  assert.ok(first.cache.get('b')); // c, a, b
  await first.cache.close();

  const second = openWithClock(dir, { maxBytes });
  second.clock.t = first.clock.t + 1;
  await second.cache.put('d', reply('reply-d'));
  assert.equal(second.cache.stats().evictions, 1);
  await second.cache.close();
  assert.deepEqual((await keysOnDisk(dir)).entries, ['a', 'b', 'd']);
});

test('a reply larger than the whole bound is not stored', async () => {
  const dir = tempDir();
  const { log, lines } = collectLog();
  const { cache } = openWithClock(dir, { maxBytes: 400, log });
  try {
    await cache.put('small', reply('ok'));
    await cache.put('huge', reply('x'.repeat(1000)));
    assert.equal(cache.get('huge'), undefined);
    assert.ok(cache.get('small'));
    assert.equal(cache.stats().entries, 1);
    assert.deepEqual(
      lines.map((l) => l.level),
      ['warn'],
    );
  } finally {
    await cache.close();
  }
});

test('a reply larger than the whole bound removes the older reply of its key, in memory and on disk', async () => {
  const dir = tempDir();
  const { log, lines } = collectLog();
  const { cache } = openWithClock(dir, { maxBytes: 400, log });
  await cache.put('other', reply('kept'));
  const otherBytes = cache.stats().bytes;
  await cache.put('k', reply('stale'));
  // A refresh whose new reply cannot be stored: the stale one must not be served for the rest of its TTL.
  await cache.put('k', reply('x'.repeat(1000)));
  assert.equal(cache.get('k'), undefined);
  assert.deepEqual(cache.get('other'), reply('kept'));
  assert.equal(cache.stats().entries, 1);
  assert.equal(cache.stats().bytes, otherBytes);
  assert.deepEqual(
    lines.map((l) => l.level),
    ['warn'],
  );
  await cache.close();
  assert.deepEqual(await keysOnDisk(dir), { entries: ['other'], meta: ['other'] });
});

test('putting a key again replaces its reply and its bytes', async () => {
  const dir = tempDir();
  const { cache } = openWithClock(dir);
  try {
    await cache.put('k', reply('short'));
    const before = cache.stats().bytes;
    await cache.put('k', reply('a much longer reply'));
    assert.deepEqual(cache.get('k'), reply('a much longer reply'));
    assert.equal(cache.stats().entries, 1);
    assert.equal(cache.stats().bytes, before + 'a much longer reply'.length - 'short'.length);
  } finally {
    await cache.close();
  }
});

test('delete removes an entry', async () => {
  const dir = tempDir();
  const { cache } = openWithClock(dir);
  await cache.put('other', reply('world'));
  const otherBytes = cache.stats().bytes;
  await cache.put('k', reply('hello'));
  await cache.delete('k');
  assert.equal(cache.get('k'), undefined);
  assert.equal(cache.stats().entries, 1);
  assert.equal(cache.stats().bytes, otherBytes);
  await cache.close();
  assert.deepEqual(await keysOnDisk(dir), { entries: ['other'], meta: ['other'] });
});

test('a restart on the same directory keeps entries and the byte count', async () => {
  const dir = tempDir();
  const first = openWithClock(dir);
  await first.cache.put('a', reply('reply-a'));
  await first.cache.put('b', reply('a longer reply b'));
  await first.cache.put('c', reply('c'));
  const bytes = first.cache.stats().bytes;
  await first.cache.close();

  const second = openWithClock(dir);
  try {
    assert.deepEqual(second.cache.stats(), { entries: 3, bytes, hits: 0, misses: 0, evictions: 0, expired: 0, corrupt: 0 });
    assert.deepEqual(second.cache.get('a'), reply('reply-a'));
    assert.deepEqual(second.cache.get('b'), reply('a longer reply b'));
    assert.deepEqual(second.cache.get('c'), reply('c'));
  } finally {
    await second.cache.close();
  }
});

test('the byte count is recomputed at open when the index records are lost or damaged', async () => {
  const dir = tempDir();
  const first = openWithClock(dir);
  await first.cache.put('a', reply('reply-a'));
  await first.cache.put('b', reply('a longer reply b'));
  const bytes = first.cache.stats().bytes;
  await first.cache.close();

  const raw = openLmdbStore(path.join(dir, 'cache'));
  await raw.meta.remove('a');
  await raw.meta.put('b', Buffer.from('not 24 bytes'));
  await raw.meta.put('ghost', Buffer.alloc(24, 1)); // an index record with no entry
  await raw.root.close();

  const second = openWithClock(dir);
  assert.deepEqual(second.cache.stats(), { entries: 2, bytes, hits: 0, misses: 0, evictions: 0, expired: 0, corrupt: 0 });
  assert.deepEqual(second.cache.get('b'), reply('a longer reply b'));
  await second.cache.close();
  assert.deepEqual(await keysOnDisk(dir), { entries: ['a', 'b'], meta: ['a', 'b'] });
});

test('an entry of garbage bytes is a miss and is removed, never served or thrown', async () => {
  const dir = tempDir();
  const first = openWithClock(dir);
  await first.cache.put('bad', reply('hello'));
  await first.cache.put('good', reply('world'));
  await first.cache.close();

  const raw = openLmdbStore(path.join(dir, 'cache'));
  await raw.entries.put('bad', Buffer.from([0xff, 0x00, 0x13, 0x37, 0x80]));
  await raw.root.close();

  const { log, lines } = collectLog();
  const second = openWithClock(dir, { log });
  assert.equal(second.cache.get('bad'), undefined);
  assert.deepEqual(second.cache.get('good'), reply('world'));
  const stats = second.cache.stats();
  assert.deepEqual([stats.entries, stats.hits, stats.misses, stats.corrupt], [1, 1, 1, 1]);
  assert.deepEqual(
    lines.map((l) => l.level),
    ['warn'],
  );
  await second.cache.close();
  assert.deepEqual(await keysOnDisk(dir), { entries: ['good'], meta: ['good'] });
});

test('an entry of the wrong shape is a miss and is removed', async () => {
  const dir = tempDir();
  const first = openWithClock(dir);
  await first.cache.put('bad', reply('hello'));
  await first.cache.close();

  const raw = openLmdbStore(path.join(dir, 'cache'));
  const wrong = { storedAt: 1_000_000, reply: { chunks: 'hello', finishReason: 'cancelled', usage: {}, model: 'dev-1', createdAt: 1 } };
  await raw.entries.put('bad', Buffer.from(JSON.stringify(wrong)));
  await raw.root.close();

  const second = openWithClock(dir);
  assert.equal(second.cache.get('bad'), undefined);
  assert.deepEqual(second.cache.stats(), { entries: 0, bytes: 0, hits: 0, misses: 1, evictions: 0, expired: 0, corrupt: 1 });
  await second.cache.close();
  assert.deepEqual(await keysOnDisk(dir), { entries: [], meta: [] });
});

test('a garbage entry with no index record is dropped at open', async () => {
  const dir = tempDir();
  const first = openWithClock(dir);
  await first.cache.put('good', reply('world'));
  await first.cache.close();

  const raw = openLmdbStore(path.join(dir, 'cache'));
  await raw.entries.put('stray', Buffer.from('{"storedAt":'));
  await raw.root.close();

  const second = openWithClock(dir);
  assert.deepEqual([second.cache.stats().entries, second.cache.stats().corrupt], [1, 1]);
  await second.cache.close();
  assert.deepEqual(await keysOnDisk(dir), { entries: ['good'], meta: ['good'] });
});

test('evictions and bytes are reported through the hooks, hits and misses in stats', async () => {
  const dir = tempDir();
  const seen = { evicted: 0, bytes: [] as number[] };
  const { cache } = openWithClock(dir, {
    maxBytes: 600,
    hooks: {
      onEvict: (count) => (seen.evicted += count),
      onBytes: (bytes) => seen.bytes.push(bytes),
    },
  });
  try {
    cache.get('nope');
    await cache.put('a', reply('reply-a'));
    cache.get('a');
    cache.get('a');
    for (const key of ['b', 'c', 'd', 'e']) await cache.put(key, reply(`reply-${key}`));
    const stats = cache.stats();
    assert.equal(seen.evicted, stats.evictions);
    assert.deepEqual([stats.hits, stats.misses], [2, 1]);
    assert.ok(stats.evictions > 0);
    assert.equal(seen.bytes[0], 0); // reported at open
    assert.equal(seen.bytes.at(-1), stats.bytes);
  } finally {
    await cache.close();
  }
});

test('an unreadable store is moved aside and the cache starts empty', async () => {
  const dir = tempDir();
  const cacheDir = path.join(dir, 'cache');
  fs.mkdirSync(cacheDir);
  fs.writeFileSync(path.join(cacheDir, 'data.mdb'), Buffer.alloc(16_384, 7));
  const { log, lines } = collectLog();
  const { cache } = openWithClock(dir, { log });
  try {
    assert.equal(cache.stats().entries, 0);
    await cache.put('k', reply('hello'));
    assert.deepEqual(cache.get('k'), reply('hello'));
    assert.deepEqual(
      lines.map((l) => [l.level, l.msg]),
      [['error', 'response cache store unreadable; starting empty']],
    );
    assert.deepEqual(fs.readFileSync(path.join(`${cacheDir}.corrupt`, 'data.mdb')), Buffer.alloc(16_384, 7));
  } finally {
    await cache.close();
  }
});

/** Opens the cache in a child process, stores `keys`, and dies by SIGKILL without closing it. */
function crashAfterPuts(dir: string, keys: string[]): void {
  const moduleUrl = new URL('../../src/cache/response-cache.js', import.meta.url).href;
  const code = `
    const { openResponseCache } = await import(${JSON.stringify(moduleUrl)});
    const cache = openResponseCache({ path: ${JSON.stringify(path.join(dir, 'cache'))}, ttlMs: 1e12, maxBytes: 1e8 });
    for (const key of ${JSON.stringify(keys)}) {
      await cache.put(key, { chunks: [key], finishReason: 'stop', usage: { promptTokens: 1, completionTokens: 1 }, model: 'dev-1', createdAt: 1 });
    }
    process.kill(process.pid, 'SIGKILL');
  `;
  const child = spawnSync(process.execPath, ['--input-type=module', '-e', code], { encoding: 'utf8' });
  assert.equal(child.signal, 'SIGKILL', child.stderr);
}

test('after a crash the store is verified and its entries are kept', async () => {
  const dir = tempDir();
  crashAfterPuts(dir, ['a', 'b']);
  const { log, lines } = collectLog();
  const cache = openResponseCache({ path: path.join(dir, 'cache'), ttlMs: 1e12, maxBytes: 1e8, log });
  try {
    assert.deepEqual(
      lines.map((l) => l.level),
      ['info'],
    );
    assert.equal(cache.stats().entries, 2);
    assert.deepEqual(cache.get('b')?.chunks, ['b']);
    assert.equal(fs.existsSync(path.join(dir, 'cache.corrupt')), false);
  } finally {
    await cache.close();
  }
});

test('after a crash that left damaged pages the store is rebuilt instead of crashing the server', async () => {
  const dir = tempDir();
  crashAfterPuts(
    dir,
    Array.from({ length: 50 }, (_, i) => `key-${i}`),
  );
  // Keep both meta pages (so the header check passes) and overwrite every page after them.
  const file = path.join(dir, 'cache', 'data.mdb');
  const pageSize = fs.readFileSync(file).readUInt32LE(48);
  const size = fs.statSync(file).size;
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, Buffer.alloc(size - 2 * pageSize, 0xab), 0, size - 2 * pageSize, 2 * pageSize);
  fs.closeSync(fd);

  const { log, lines } = collectLog();
  const cache = openResponseCache({ path: path.join(dir, 'cache'), ttlMs: 1e12, maxBytes: 1e8, log });
  try {
    assert.deepEqual(
      lines.map((l) => l.level),
      ['info', 'error'],
    );
    assert.equal(cache.stats().entries, 0);
    await cache.put('k', reply('hello'));
    assert.deepEqual(cache.get('k'), reply('hello'));
    assert.equal(fs.existsSync(path.join(dir, 'cache.corrupt', 'data.mdb')), true);
  } finally {
    await cache.close();
  }
});

/**
 * Runs `code` (an ES module body, with `openResponseCache`, `dir` and `reply(text)` in scope) in a child process
 * whose files may not grow past `maxFileBytes` (RLIMIT_FSIZE, set by prlimit): LMDB's writes past it fail with
 * EFBIG, as they would on a full disk. Returns what the child printed last, as JSON.
 */
function runWithFileLimit(dir: string, maxFileBytes: number, code: string): unknown {
  const moduleUrl = new URL('../../src/cache/response-cache.js', import.meta.url).href;
  const script = `
    const { openResponseCache } = await import(${JSON.stringify(moduleUrl)});
    const dir = ${JSON.stringify(path.join(dir, 'cache'))};
    const reply = (text) => ({ chunks: [text], finishReason: 'stop', usage: { promptTokens: 1, completionTokens: 1 }, model: 'dev-1', createdAt: 1 });
    ${code}
  `;
  const child = spawnSync('prlimit', [`--fsize=${maxFileBytes}`, process.execPath, '--input-type=module', '-e', script], { encoding: 'utf8' });
  assert.equal(child.status, 0, `${child.stderr}${child.error?.message ?? ''}`);
  return JSON.parse(child.stdout.trim().split('\n').at(-1) as string);
}

test('a put whose write fails keeps the entries it would have evicted: index, byte count and store agree', async (t) => {
  if (spawnSync('prlimit', ['--version']).status !== 0) {
    t.skip('needs prlimit (util-linux) to limit the file size');
    return;
  }
  const dir = tempDir();
  const options = { path: path.join(dir, 'cache'), ttlMs: 1e12, maxBytes: 64 * 1024 };
  const keys = Array.from({ length: 10 }, (_, i) => `k${i}`);
  const first = openResponseCache(options);
  for (const key of keys) await first.put(key, { ...reply('x'.repeat(5000)), chunks: [`${key} ${'x'.repeat(5000)}`] });
  const full = first.stats();
  await first.close();
  const fileBytes = fs.statSync(path.join(dir, 'cache', 'data.mdb')).size;

  // The new reply needs most of the bound: the put evicts the oldest entries, and its write needs pages past the
  // end of the file, which it may not grow. LMDB aborts the whole transaction, evictions included.
  const seen = runWithFileLimit(
    dir,
    fileBytes,
    `
    const cache = openResponseCache({ path: dir, ttlMs: 1e12, maxBytes: ${options.maxBytes} });
    const before = cache.stats();
    let error = null;
    try {
      await cache.put('big', reply('y'.repeat(40 * 1024)));
    } catch (err) {
      error = err.message;
    }
    const after = cache.stats();
    const big = cache.get('big') !== undefined;
    // Closed with the failed write as the last one (a hit would commit its access time first): close() settles,
    // and the open marker stays for the next open to check the store.
    let closeError = null;
    await cache.close().catch((err) => (closeError = err.message));
    const marker = (await import('node:fs')).existsSync(dir + '/chatwire-open');
    console.log(JSON.stringify({ error, before: [before.entries, before.bytes], after: [after.entries, after.bytes], big, closeError, marker }));
  `,
  );
  assert.deepEqual(seen, {
    error: 'Commit failed (see commitError for details)',
    before: [full.entries, full.bytes],
    after: [full.entries, full.bytes],
    big: false,
    closeError: null,
    marker: true,
  });

  // The next open checks the store (the marker) and finds every entry the failed put would have evicted.
  const again = openResponseCache(options);
  try {
    assert.deepEqual([again.stats().entries, again.stats().bytes], [full.entries, full.bytes]);
    assert.equal(again.get('big'), undefined);
    assert.deepEqual(
      keys.filter((key) => again.get(key)?.chunks[0]?.startsWith(`${key} `)),
      keys,
    );
  } finally {
    await again.close();
  }
});
