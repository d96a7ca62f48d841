import crypto from 'node:crypto';
import type { KeysetPosition } from '../db/marketplace-store.js';
import { AppError } from '../protocol/index.js';

/**
 * Opaque keyset cursors: `<base64url(JSON [sortKey, id])>.<tag>`.
 *
 * The tag is a truncated SHA-256 of the lookup, its scope (the filters or the
 * consumer) and the payload. It is not a secret MAC: it makes a cursor that
 * was edited, truncated, or taken from another lookup or other filters fail
 * with bad_request instead of silently paging from somewhere else. A client
 * that forges a tag only gets another position inside a lookup it is already
 * allowed to read, so nothing needs a key (and cursors survive restarts).
 */
const TAG_CHARS = 12; // 72 bits
const CURSOR_RE = /^([A-Za-z0-9_-]{1,200})\.([A-Za-z0-9_-]{12})$/;

function tag(lookup: string, scope: string, body: string): string {
  return crypto.createHash('sha256').update(`${lookup}\u0000${scope}\u0000${body}`).digest('base64url').slice(0, TAG_CHARS);
}

export function encodeCursor(lookup: string, scope: string, position: KeysetPosition): string {
  const body = Buffer.from(JSON.stringify([position.sortKey, position.id])).toString('base64url');
  return `${body}.${tag(lookup, scope, body)}`;
}

function invalid(reason: string): AppError {
  return new AppError('bad_request', `invalid cursor: ${reason}`, { details: [{ path: 'cursor', message: reason }] });
}

const isPosInt = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;

/** The position a cursor of this lookup and scope stands for; anything else is bad_request. */
export function decodeCursor(cursor: string, lookup: string, scope: string): KeysetPosition {
  const m = CURSOR_RE.exec(cursor);
  if (!m) throw invalid('not a cursor');
  const [, body, given] = m as unknown as [string, string, string];
  if (tag(lookup, scope, body) !== given) throw invalid('not a cursor of this lookup (or it was changed)');
  let value: unknown;
  try {
    value = JSON.parse(Buffer.from(body, 'base64url').toString('utf8'));
  } catch {
    throw invalid('not a cursor');
  }
  if (!Array.isArray(value) || value.length !== 2 || !isPosInt(value[0]) || !isPosInt(value[1]) || value[1] < 1) {
    throw invalid('not a cursor');
  }
  return { sortKey: value[0], id: value[1] };
}
