import { AppError, ClientMessageIdSchema } from '../protocol/index.js';
import type { RequestInfo } from './http-io.js';

/** The response header that marks the answer to a repeated Idempotency-Key (PROTOCOL.md, "Sync and idempotency"). */
export const REPLAYED_HEADER = 'idempotent-replayed';

/**
 * The request's `Idempotency-Key` (1..64 chars of A-Za-z0-9._:-), or undefined; a bad one is bad_request. `inBody`:
 * a clientMessageId the body carries too (POST /v1/chat), which must then be the same.
 */
export function idempotencyKey(info: RequestInfo, inBody?: string): string | undefined {
  const raw = info.headers.get('idempotency-key');
  if (raw === undefined || raw === '') return inBody;
  const parsed = ClientMessageIdSchema.safeParse(raw);
  if (!parsed.success) {
    throw new AppError('bad_request', 'Idempotency-Key: expected 1..64 chars of A-Za-z0-9._:-', {
      details: [{ path: 'Idempotency-Key', message: 'expected 1..64 chars of A-Za-z0-9._:-' }],
    });
  }
  if (inBody !== undefined && inBody !== parsed.data) {
    throw new AppError('bad_request', "the Idempotency-Key header and the body's clientMessageId differ", {
      details: [{ path: 'clientMessageId', message: 'differs from the Idempotency-Key header' }],
    });
  }
  return parsed.data;
}
