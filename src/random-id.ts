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
