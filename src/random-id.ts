import crypto from 'node:crypto';

/**
 * Random ids from a pooled CSPRNG buffer. crypto.randomBytes makes a
 * system call for every id (about 4 µs, four of them per chat); this fills
 * 4 KiB at a time, as crypto.randomUUID does internally, and hands out
 * slices. Each byte is used once.
 */
const POOL_BYTES = 4096;
const pool = Buffer.alloc(POOL_BYTES);
let offset = POOL_BYTES;

/** `bytes` random bytes (at most 256) as base64url. */
export function randomBase64url(bytes: number): string {
  if (!(bytes > 0 && bytes <= 256)) throw new RangeError(`randomBase64url: 1 to 256 bytes, got ${bytes}`);
  if (offset + bytes > POOL_BYTES) {
    crypto.randomFillSync(pool);
    offset = 0;
  }
  const id = pool.toString('base64url', offset, offset + bytes);
  offset += bytes;
  return id;
}

/**
 * `prefix`, the current time in milliseconds as 9 base-36 digits (sortable as
 * text until the year 5188), then `bytes` random bytes as base64url. Stored
 * keys that start with the time land at the right edge of their B-trees:
 * inserting one touches the page the previous insert touched, where a fully
 * random key touches a random leaf of an ever larger index (measured: a chat's
 * SQLite writes cost about half as much). The random part alone carries the
 * unguessability; the time part says only when the id was made, which every
 * record carrying such an id states anyway.
 */
export function timeOrderedId(prefix: string, bytes: number): string {
  const now = Date.now();
  if (now !== lastMs) {
    lastMs = now;
    lastTime = now.toString(36).padStart(9, '0');
  }
  return prefix + lastTime + randomBase64url(bytes);
}
let lastMs = -1;
let lastTime = '';
